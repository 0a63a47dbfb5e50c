"""edge-agent: a durable, event-sourced controller for a small factory cell."""

__version__ = "0.2.0"
__all__ = ["__version__"]
