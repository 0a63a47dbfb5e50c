"""The `edge-agent` command line: thin commands over the library."""

from edge_agent.cli.app import app, main

__all__ = ["app", "main"]
