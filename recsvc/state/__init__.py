"""The online state: its interface, its typed log records, the embedded read model and the durable log."""

from recsvc.state.interface import OnlineState, OnlineStateReader, OnlineStateWriter
from recsvc.state.online import ReadModel
from recsvc.state.records import EventType, FeedbackEvent, ServedSlate
from recsvc.state.store import LocalStateStore, MemoryStateStore, StateStore

__all__ = ["OnlineState", "OnlineStateReader", "OnlineStateWriter", "ReadModel", "EventType", "FeedbackEvent",
           "ServedSlate", "StateStore", "LocalStateStore", "MemoryStateStore"]
