"""GetExperimentReport: the report of one or every experiment as JSON, text and (optionally) a PNG plot."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from recsvc.errors import FailedPrecondition, InvalidArgument, NotFound


def render_report(aggregates, experiments, name: str, plot_metric: str, now_ms: int, n_items: int
                  ) -> tuple[dict[str, Any], str, bytes]:
    """(report as a JSON-safe dict, as text, PNG of ``plot_metric`` over time or b"")."""
    from recsvc.experiments import METRICS, plot_report, report, report_to_dict, report_to_text

    names = [e.name for e in experiments]
    if name and name not in names:
        raise NotFound(f"no experiment named {name!r}; known: {', '.join(names) or '(none)'}")
    if plot_metric and not name:
        raise InvalidArgument("a plot needs one experiment: set experiment")
    if plot_metric and plot_metric not in METRICS:
        raise InvalidArgument(f"unknown metric {plot_metric!r}; choose from {', '.join(METRICS)}")
    rep = report(aggregates, experiments, now_ms=now_ms, experiment=name or None, n_items=n_items)
    png = b""
    if plot_metric:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "plot.png"
                plot_report(aggregates, name, plot_metric, path, experiments=experiments)
                png = path.read_bytes()
        except ImportError as exc:
            raise FailedPrecondition(f"plots need matplotlib on the server: {exc}") from None
    return report_to_dict(rep), report_to_text(rep), png
