"""Regenerate the README's measured numbers from the same commands a reader runs, with their seeds.

    python tools/readme_numbers.py [--data ../shared/data] [--only evaluate,ope,simulate,ranker-study]

Runs, each with a fixed seed (the commands' defaults unless shown):

- ``recsvc evaluate --data DATA/movielens-small --seed 0`` → the offline-evaluation table;
- ``recsvc ope --data DATA/obd-men`` → the OPE line (deterministic: no sampling);
- ``recsvc simulate --isolated --seed 0`` (40 rounds, 240 users) → the feedback-loop numbers;
- ``recsvc simulate --ranker-study --seed 0`` → the ranker-study numbers.

and prints them as the README shows them (Markdown), so a change in the code that moves a number shows up
as a diff against the README. Numbers depend on the machine only through floating-point summation order in
BLAS; with ``OPENBLAS_NUM_THREADS=1`` (set by the ``recsvc`` command) a run repeats itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

EVAL_ROWS = (("popularity", "popularity baseline"), ("ann", "ANN only"), ("full", "full pipeline (greedy)"),
             ("full_diversity", "full + MMR diversity"))
EVAL_COLS = ("ndcg", "map", "recall", "hit_rate", "mrr", "diversity", "coverage", "novelty", "gini")


def _run(*args: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "recsvc.cli", *args, "--json", str(out)]
    print("$", " ".join(["recsvc", *args]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _f(x: float, digits: int = 3) -> str:
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("0.") else text


def evaluate(data: Path, tmp: Path) -> str:
    rep = _run("evaluate", "--data", str(data / "movielens-small"), "--seed", "0", "--no-progress",
               out=tmp / "evaluate.json")
    lines = [f"On the full MovieLens small ({rep['users_evaluated']} test users, K = {rep['k']}, seed 0):", "",
             "| pipeline | NDCG@10 | MAP@10 | recall@10 | hit rate | MRR | diversity | coverage | novelty (bits) "
             "| Gini |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in EVAL_ROWS:
        m = rep["pipelines"][key]["metrics"]
        cells = [_f(m[c], 2) if c == "novelty" else _f(m[c]) for c in EVAL_COLS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ope(data: Path, tmp: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "recsvc.cli", "ope", "--data", str(data / "obd-men")],
                         check=True, capture_output=True, text=True).stdout
    return "recsvc ope --data obd-men:\n" + out


def simulate(tmp: Path) -> str:
    rep = _run("simulate", "--isolated", "--seed", "0", "--no-progress", out=tmp / "simulate.json")
    lines = ["recsvc simulate --isolated --seed 0 (40 rounds, 240 users):"]
    for name, v in rep["variants"].items():
        t = v["totals"]
        lines.append(f"  {name}: CTR {t['ctr']:.4f}, Gini {_f(t['gini_first_round'], 2)} -> "
                     f"{_f(t['gini_last_round'], 2)}, top-20 share {_f(t['top_share_first_round'], 2)} -> "
                     f"{_f(t['top_share_last_round'], 2)}, coverage {_f(t['coverage'], 2)}")
    return "\n".join(lines)


def ranker_study(tmp: Path) -> str:
    rep = _run("simulate", "--ranker-study", "--seed", "0", "--no-progress", out=tmp / "study.json")
    lines = ["recsvc simulate --ranker-study --seed 0:",
             f"  {rep['mode']}"]
    for name, v in rep["variants"].items():
        t = v["totals"]
        lines.append(f"  {name}: CTR {t['ctr']:.4f}, regret per slate {_f(t['regret_per_slate'])}, "
                     f"top-20 share at the end {_f(t['top_share_last_round'], 2)}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    p.add_argument("--only", default="evaluate,ope,simulate,ranker-study")
    args = p.parse_args()
    parts = args.only.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, fn in (("evaluate", lambda: evaluate(args.data, tmp)), ("ope", lambda: ope(args.data, tmp)),
                         ("simulate", lambda: simulate(tmp)), ("ranker-study", lambda: ranker_study(tmp))):
            if name in parts:
                print(fn(), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
