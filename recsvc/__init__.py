"""recsvc: a multi-stage recommendation service with a compiled hot path.

In-process use::

    from recsvc import Engine, load_config
    engine = Engine.from_config(load_config())
    slate = engine.recommend(RecommendQuery(user_id="u1", n=10))

Over gRPC: ``recsvc serve`` or ``recsvc.server.add_to_server(server, engine)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Engine", "Config", "load_config", "RecommendQuery", "FeedbackEventIn", "ItemIn"]

if TYPE_CHECKING:  # pragma: no cover
    from recsvc.config import Config, load_config
    from recsvc.engine import Engine, FeedbackEventIn, ItemIn, RecommendQuery


def __getattr__(name: str) -> Any:
    # Lazy, so `import recsvc.config` (e.g. from the CLI's --help) stays light.
    if name in ("Config", "load_config"):
        from recsvc import config

        return getattr(config, name)
    if name in ("Engine", "RecommendQuery", "FeedbackEventIn", "ItemIn"):
        from recsvc import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'recsvc' has no attribute {name!r}")
