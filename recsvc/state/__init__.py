"""Online state (``online``) and its durable stores (``store``)."""

from recsvc.state.online import OnlineState, ServedSlate
from recsvc.state.store import LocalStateStore, MemoryStateStore, StateStore

__all__ = ["OnlineState", "ServedSlate", "StateStore", "LocalStateStore", "MemoryStateStore"]
