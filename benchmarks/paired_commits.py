"""Paired speed comparison of two commits in one run: ``Engine.recommend`` and durable feedback ingest.

    python benchmarks/paired_commits.py BASE_REF [--items 100000] [--blocks 30] [--calls 100]

Builds BASE_REF from a temporary git worktree into a directory of its own (its own compiled kernels), then starts one worker process
per side: this checkout and BASE_REF, each loading the same cached demo catalog and index and warming
the same state. The parent alternates timed blocks between them — A, B, B, A, ... — so both sides see
the same host over time (the machine is shared and noisy), and reports each side's median per call and
the ratio of medians, with the ratio's spread over pairs of blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = r'''
import json, os, sys, time, uuid
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np
sys.path.insert(0, sys.argv[1])
from recsvc.config import Config
from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery, load_catalog_and_index
from recsvc.state.store import LocalStateStore

n_items, state_dir = int(sys.argv[2]), sys.argv[3]
cfg = Config().with_overrides({"catalog": {"demo": {"n_items": n_items}}, "exploration": {"seed": 1},
                               "state": {"dir": state_dir}})
catalog, ann = load_catalog_and_index(cfg)
NOW = 1_795_910_400_000
engine = Engine(cfg, catalog, ann, store=LocalStateStore(state_dir, fsync=True), clock=lambda: NOW)
rng = np.random.default_rng(0)
events = [FeedbackEventIn(f"w{i}", f"u{i % 300}", catalog.item_ids[int(rng.integers(5000))], "click")
          for i in range(6000)]
for s in range(0, len(events), 1000):
    engine.feedback(events[s:s + 1000])
emb, cats = catalog.embeddings[: catalog.n_rows], catalog.categories[: catalog.n_rows]
users = []
for _ in range(64):
    liked = rng.choice(catalog.n_categories, size=rng.integers(1, 3), replace=False)
    pool = np.flatnonzero(np.isin(cats, liked))
    q = emb[rng.choice(pool, size=8, replace=False)].mean(axis=0)
    users.append((q / np.linalg.norm(q)).astype(np.float32).tolist())
ids = catalog.item_ids
counter = [0]

def recommend():
    i = counter[0] = counter[0] + 1
    engine.recommend(RecommendQuery(user_id=f"u{i % 300}", n=20, user_embedding=users[i % len(users)]))

def ingest():
    batch = [FeedbackEventIn(uuid.uuid4().hex, f"u{int(rng.integers(5000))}", ids[int(rng.integers(n_items))],
                             "click") for _ in range(100)]
    t = time.perf_counter_ns()
    assert engine.feedback(batch).accepted == 100
    return time.perf_counter_ns() - t

for _ in range(50):
    recommend()
print("ready", flush=True)
for line in sys.stdin:
    what, calls = line.split()
    out = []
    for _ in range(int(calls)):
        if what == "recommend":
            t = time.perf_counter_ns()
            recommend()
            out.append(time.perf_counter_ns() - t)
        else:
            out.append(ingest())
    print(json.dumps(out), flush=True)
engine.close(snapshot=False)
'''


def _install(ref: str, tmp: Path) -> Path:
    """BASE_REF built and installed (kernels compiled, code generated) into a directory of its own."""
    path, site = tmp / "base", tmp / "site"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(path)], check=True)
    return site


def _start(src: Path, n_items: int, state: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(src))
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(src), str(n_items), str(state)], cwd=src, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", f"worker for {src} did not start"
    return p


def _block(p: subprocess.Popen, what: str, calls: int) -> list[int]:
    p.stdin.write(f"{what} {calls}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="git ref to compare this checkout against (e.g. a commit before a change)")
    ap.add_argument("--items", type=int, default=100_000, help="demo catalog size (cached index)")
    ap.add_argument("--blocks", type=int, default=30, help="timed blocks per side and operation")
    ap.add_argument("--calls", type=int, default=100, help="calls per recommend block (ingest: a fifth)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="recsvc-paired-"))
    try:
        base_src = _install(args.base, tmp)
        workers = {"this": _start(ROOT, args.items, tmp / "state-this"),
                   "base": _start(base_src, args.items, tmp / "state-base")}
        report = {"base": args.base, "items": args.items, "at": time.strftime("%Y-%m-%d %H:%M")}
        for what, calls in (("recommend", args.calls), ("ingest", max(args.calls // 5, 1))):
            samples = {"this": [], "base": []}
            pair_ratios = []
            for b in range(args.blocks):
                order = ("this", "base") if b % 2 == 0 else ("base", "this")
                med = {}
                for side in order:
                    got = _block(workers[side], what, calls)
                    samples[side] += got
                    med[side] = statistics.median(got)
                pair_ratios.append(med["this"] / med["base"])
            m = {s: statistics.median(v) / 1e6 for s, v in samples.items()}
            q = statistics.quantiles(pair_ratios, n=4)
            report[what] = {"this_median_ms": round(m["this"], 4), "base_median_ms": round(m["base"], 4),
                            "ratio_this_over_base": round(m["this"] / m["base"], 3),
                            "pair_ratio_quartiles": [round(x, 3) for x in q]}
        for p in workers.values():
            p.stdin.close()
            p.wait(60)
        print(json.dumps(report, indent=2))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "base")],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
