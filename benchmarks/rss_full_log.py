"""Resident memory of a serving process at 1M items, at start and with the served-slate log at its cap (issue 16).

    python benchmarks/rss_full_log.py [--items 1000000] [--slates 200000] [--n 20]

One fresh process: ``Engine.from_config`` on the cached demo catalog (embedded state, as ``recsvc serve`` runs
it) and its warm-up; VmRSS (anonymous and file-backed parts) is read from ``/proc/self/status``. Then the
served-slate log is filled to ``state.served_log_size`` (the default 200,000) through the feedback path's
``record_served`` — the path every Recommend takes — with copies of real slates of ``--n`` items (64 served by
the same engine to coherent users, each copy with its own uuid request id, user id and features, as a request
builds them), and VmRSS is read again. Targets: ≤ 1.0 GB at start, ≤ 1.2 GB with the log at its cap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_served_log import fresh_copy  # noqa: E402
from conftest import coherent_users  # noqa: E402


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--slates", type=int, default=None, help="default: state.served_log_size")
    ap.add_argument("--n", type=int, default=20, help="items per slate")
    args = ap.parse_args(argv)

    from recsvc.config import Config
    from recsvc.engine import Engine, RecommendQuery

    state_dir = tempfile.mkdtemp(prefix="recsvc-rss-")
    cfg = Config().with_overrides({"catalog": {"demo": {"n_items": args.items}}, "state": {"dir": state_dir},
                                   "exploration": {"seed": 1}})
    t = time.perf_counter()
    engine = Engine.from_config(cfg)
    engine.warm_up()
    ann = engine.requests.retriever.ann if hasattr(engine.requests, "retriever") else None
    while ann is not None and getattr(ann.huge_pages, "collapsing", False):
        time.sleep(0.05)
    started_s = time.perf_counter() - t
    gc.collect()
    at_start = status()
    users = coherent_users(engine.catalog, 64)
    templates = []
    for i in range(64):
        rec = engine.recommend(RecommendQuery(user_id=f"u{i}", n=args.n, user_embedding=users[i]))
        templates.append(engine.state.served_slate(rec.request_id, features=True))
    cap = args.slates or cfg.state.served_log_size
    t = time.perf_counter()
    for i in range(cap):
        engine.feedback_path.record_served(fresh_copy(templates[i % 64], i))
    fill_s = time.perf_counter() - t
    gc.collect()
    full = status()
    report = {"items": args.items, "slate_items": args.n, "served_slates": engine.state.n_served(),
              "start_s": round(started_s, 1), "fill_s": round(fill_s, 1), "at_start_mib": at_start,
              "with_full_log_mib": full, "log_mib": full["VmRSS"] - at_start["VmRSS"],
              "bytes_per_slate": round((full["RssAnon"] - at_start["RssAnon"]) * 1024 * 1024 / cap)}
    print(json.dumps(report, indent=2))
    engine.close(snapshot=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
