"""JSON output of evaluation reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np


def json_safe(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf (a metric defined for nobody) become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_outputs(report: dict[str, Any], json_path: Path | None, plot_path: Path | None,
                  plot: Callable[[dict[str, Any], Path], Any]) -> None:
    """The ``--json`` and ``--plot`` outputs of ``recsvc evaluate`` and ``recsvc simulate``."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        print(f"wrote {json_path}")
    if plot_path:
        plot(report, plot_path)
        print(f"wrote {plot_path}")
