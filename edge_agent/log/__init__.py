"""The SQLite event log: the agent's single source of truth."""

from edge_agent.log.journal import Journal, replay
from edge_agent.log.store import EventLog

__all__ = ["EventLog", "Journal", "replay"]
