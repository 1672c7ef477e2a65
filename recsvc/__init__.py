"""recsvc: a multi-stage recommendation service with a compiled hot path.

In-process use::

    from recsvc import Engine, RecommendQuery, load_config
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


def _explained(exc: ImportError) -> ImportError:
    """A missing compiled kernel or generated module, said with its cause: Python imported recsvc from a
    source tree (e.g. the current directory is the repository root) where they were never built."""
    missing = exc.name or ""
    if not (missing.startswith("recsvc._fastpath") or missing.startswith("recsvc.v1") or "_fastpath" in str(exc)):
        return exc
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    return ImportError(
        f"{exc}: recsvc was imported from {here}, a source tree whose compiled kernels (or generated gRPC "
        "code) were never built there. Run from another directory (the installed package is then used), "
        "or build in place: pip install -e .", name=exc.name)


def __getattr__(name: str) -> Any:
    # Lazy, so `import recsvc.config` (e.g. from the CLI's --help) stays light.
    if name in ("Config", "load_config"):
        from recsvc import config

        return getattr(config, name)
    if name in ("Engine", "RecommendQuery", "FeedbackEventIn", "ItemIn"):
        try:
            from recsvc import engine
        except ImportError as exc:
            raise _explained(exc) from exc
        return getattr(engine, name)
    raise AttributeError(f"module 'recsvc' has no attribute {name!r}")
