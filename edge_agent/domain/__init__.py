"""The pure core: events, state, and the rules that connect them.

No I/O, no asyncio, no clock, no randomness: everything here is a function of
its arguments, so replay is exact and the rules are easy to test.
"""

from edge_agent.domain.commands import Command
from edge_agent.domain.decide import decide
from edge_agent.domain.events import Event, Recorded
from edge_agent.domain.evolve import evolve, fold
from edge_agent.domain.state import Stage, State

__all__ = ["Command", "Event", "Recorded", "Stage", "State", "decide", "evolve", "fold"]
