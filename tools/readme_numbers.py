"""Regenerate the README's measured numbers from the same commands a reader runs, with their seeds.

    python tools/readme_numbers.py [--data ../shared/data] [--only evaluate,ope,simulate,ranker-study]

Runs, each with a fixed seed (the commands' defaults unless shown):

- ``recsvc evaluate --data DATA/movielens-small --seed 0`` → the offline-evaluation tables (test, validation,
  the long-tail boost rule and the targets' ratios; ``--evaluate-json FILE`` formats that command's ``--json``
  report instead of running it again, ``--seed N`` runs another seed);
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

EVAL_ROWS = (("popularity", "popularity baseline"), ("ann", "ANN only"),
             ("full_default", "full pipeline, shipped hand-set ranker"), ("full", "**full pipeline, learned ranker**"),
             ("full_thompson", "full, learned, Thompson sampling"),
             ("full_diversity", "**full, learned + MMR (λ = {mmr}) + ≤ 3 per category**"))
EVAL_COLS = ("ndcg", "map", "recall", "hit_rate", "mrr", "diversity", "coverage", "novelty", "gini")
VAL_COLS = ("ndcg", "recall", "diversity", "coverage")


def _run(*args: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "recsvc.cli", *args, "--json", str(out)]
    print("$", " ".join(["recsvc", *args]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _f(x: float, digits: int = 3) -> str:
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("0.") else text


def evaluate(data: Path, tmp: Path, report: Path | None = None, seed: int = 0) -> str:
    """The evaluate tables: from ``report`` (the ``--json`` of that same command) when given, else by running it."""
    if report is not None:
        rep = json.loads(Path(report).read_text())
    else:
        rep = _run("evaluate", "--data", str(data / "movielens-small"), "--seed", str(seed), "--no-progress",
                   out=tmp / "evaluate.json")
    return format_evaluate(rep, seed)


def _cells(m: dict, cols: tuple[str, ...], digits: int = 3) -> str:
    return " | ".join(_f(m[c], 2) if c == "novelty" else _f(m[c], digits) for c in cols)


def format_evaluate(rep: dict, seed: int = 0) -> str:
    """The README's evaluate tables (test, bootstrap, validation, targets) from a ``recsvc evaluate`` report."""
    choices = rep.get("choices", {})
    mmr = choices.get("full_diversity.mmr_lambda", {}).get("value")
    lam = choices.get("ease_lambda", {}).get("value")
    fact = rep["data"]["factorization"]
    als = f"ALS ({fact['factors']} factors, reg {fact['regularization']:g}, α {fact['alpha']:g})"
    labels = {"ease": f"EASE (λ = {lam:g}, chosen on validation)" if lam is not None else "EASE", "als": als}
    lines = [f"`recsvc evaluate --data ../shared/data/movielens-small --seed {seed}` on the full MovieLens small "
             f"({rep['users_evaluated']} test users, K = {rep['k']}):", "",
             "| test | NDCG@10 | MAP@10 | recall@10 | hit rate | MRR | diversity | coverage | novelty (bits) | Gini |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("popularity", EVAL_ROWS[0][1], rep["pipelines"])]
    rows += [(n, labels.get(n, n.upper()), rep.get("baselines", {})) for n in rep.get("baselines", {})]
    rows += [(k, label.format(mmr=_f(mmr, 2) if mmr is not None else "?"), rep["pipelines"])
             for k, label in EVAL_ROWS[1:]]
    for key, label, part in rows:
        if key in part:
            lines.append(f"| {label} | " + _cells(part[key]["metrics"], EVAL_COLS) + " |")
    boot = rep.get("bootstrap", {})
    if boot:
        lines += ["", f"Paired bootstrap over the {rep['users_evaluated']} users, NDCG@10: " + "; ".join(
            f"{name.replace('full_diversity', 'full + MMR').replace('ease', 'EASE').replace('als', 'ALS')} "
            f"{b['mean']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]" for name, b in boot.items()) + "."]
    val = rep.get("validation", {})
    boost = choices.get("long_tail_boost", {})
    if val.get("pipelines"):
        lines += ["", f"| validation window ({rep.get('validation_users', 0)} users; learned rows cross-fitted) | "
                  "NDCG@10 | recall@10 | diversity | coverage |", "|---|---|---|---|---|"]
        short = {"ease": f"EASE (λ = {lam:g})" if lam is not None else "EASE", "als": "ALS"}
        vrows = [(n, short.get(n, n.upper()), val.get("baselines", {})) for n in val.get("baselines", {})]
        vrows += [("full_default", "full pipeline, shipped hand-set ranker", val["pipelines"]),
                  ("full", f"full pipeline, learned ranker (long-tail boost {_f(boost['value'], 3)})"
                   if boost else "full pipeline, learned ranker", val["pipelines"]),
                  ("full_diversity", "full, learned + MMR", val["pipelines"])]
        for key, label, part in vrows:
            if key in part:
                m = part[key]["metrics"]
                lines.append(f"| {label} | {_f(m['ndcg'], 4)} | " + _cells(m, VAL_COLS[1:]) + " |")
    if "rule" in boost and boost.get("reference"):
        tried = ", ".join(f"{_f(float(b), 3)}: {v['ndcg']:.4f} / {v['coverage_ratio']:.2f}×"
                          for b, v in boost["validation"].items() if v.get("coverage_ratio") is not None)
        lines += ["", f"Long-tail boost rule (validation only): coverage ≥ "
                  f"{boost['coverage_factor'] * boost['coverage_margin']:g}× and NDCG ≥ {boost['ndcg_factor']:g}× "
                  f"{str(boost['reference']).upper()}'s; {boost['rule']} → {_f(boost['value'], 3)}. "
                  f"Tried (validation NDCG / coverage over {str(boost['reference']).upper()}'s): {tried}."]
    for split, t in rep.get("targets", {}).items():
        if t.get("reference"):
            lines.append(
                f"Targets on {split}: full NDCG {t['full_ndcg_ratio']:.3f}× {t['reference'].upper()} (≥ 1.05), "
                f"coverage {t['full_coverage_ratio']:.3f}× (≥ 2; "
                + ", ".join(f"{n.upper()} {r:.2f}×" for n, r in t["full_coverage_ratio_by_baseline"].items()) + ")"
                + (f", MMR NDCG {t['mmr_ndcg_vs_full']:.3f}× full (≥ 0.95) at diversity {t['mmr_diversity']:.3f} "
                   f"(≥ 0.70)" if "mmr_ndcg_vs_full" in t else "") + ".")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluate run (the README shows 0)")
    p.add_argument("--evaluate-json", type=Path, default=None,
                   help="format this `recsvc evaluate --json` report instead of running the command again")
    args = p.parse_args()
    parts = args.only.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, fn in (("evaluate", lambda: evaluate(args.data, tmp, args.evaluate_json, args.seed)), ("ope", lambda: ope(args.data, tmp)),
                         ("simulate", lambda: simulate(tmp)), ("ranker-study", lambda: ranker_study(tmp))):
            if name in parts:
                print(fn(), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
