"""Closed-loop simulation: synthetic users with known tastes click on what the service shows them.

``recsvc simulate`` (the lead registers :func:`add_arguments` / :func:`run`) runs many rounds of
recommend -> position-biased clicks -> feedback against the Engine in process (default) or a live
server over gRPC (``--target host:port``), and compares the variants of an A/B experiment::

    recsvc simulate --rounds 40 --users 240 --seed 1 --json sim.json --plot sim.png

**World.** The catalog is a small demo catalog (:func:`recsvc.catalog.demo_catalog`, 2,000 items x 16
dims by default, deterministic for ``--catalog-seed``) with its Zipf-like initial popularity removed
(``--initial-popularity none``, the default), so every bit of popularity is earned in the simulation.
Users have latent tastes in the catalog's embedding space, clustered: ``--clusters`` centres are
random catalog items, a user is a centre plus Gaussian noise (``--taste-noise``), unit-normalised.
The true click probability of user u on item i is ``ctr = sigmoid(a * taste_u . item_i + b)``
(``--affinity a``, ``--bias b``; item embeddings are unit vectors), so the best items of a user have
a CTR of a few tens of percent and a random item well under 1%. An item a user already clicked is
consumed: its CTR for that user becomes 0.

**Click model** (position-based). Position p (0-based) is examined with probability
``1 / (1 + p) ** eta`` (``--eta``); an examined item is clicked with probability ``ctr``.
Feedback per slate: an IMPRESSION for every examined item (``--impressions examined``, the default,
what a viewport tracker logs) or for every served item (``shown``), and a CLICK for every click,
all with the slate's request id, so bandit posteriors and experiment aggregates are updated.
Before round 0 every user makes ``--warmup-clicks`` organic clicks (no request id) on items drawn in
proportion to their CTR: a history to personalise from, and the seed of popularity.

**Rounds.** In each round every user asks for one slate of ``--slate`` items; then all the round's
feedback is sent at once. In process the engine's clock is simulated: a round is an hour
(``--round-minutes``), events are stamped 1 s after their slate; over gRPC the server's own clock is
used (events carry no timestamp). ``--pre-rounds R`` first runs R rounds before the experiments start
(in process, each experiment without a ``start`` starts after them; their slates report as ``(none)``):
the users' pre-period, which the experiment report's CUPED adjustment uses (``experiments.cuped_pre_days``
whole UTC days before each user's first exposure; 24 one-hour rounds make a day).

**Variants.** By default one experiment, ``sim_policy`` (:data:`DEFAULT_EXPERIMENTS`, the same as
``examples/simulate_experiments.toml``), splits users by the A/B hash into ``greedy`` (control),
``thompson``, ``epsilon_greedy`` (epsilon 0.1) and ``greedy_long_tail`` (greedy + long-tail boost
0.1); ``--experiments FILE`` loads another file. Variants of one A/B test **share online state**
(popularity, co-occurrence, bandit evidence), as in production: exploration in one arm also feeds the
others (interference). ``--isolated`` instead runs every variant of the first experiment in its own
engine with all users (the same users, seeds and clicks model): the counterfactual comparison.
Over gRPC the server's experiments decide, and the report groups by the responses' ``variant``.

**Metrics per variant** (users are split by the variant they were served):

- ``ctr``: clicks / served items, per round;
- ``regret``: per slate, the expected clicks of the oracle slate (the user's n highest-CTR unconsumed
  items in CTR order, which maximises expected clicks under the position model) minus the expected
  clicks of the served slate, both with the known CTRs and examination probabilities; non-negative by
  construction. ``cumulative_regret`` is its running sum per user (divided by the variant's users);
- ``coverage``: share of the catalog served at least once so far (cumulative);
- ``gini``: Gini of exposure of the round's impressions over the catalog, and over all rounds;
- ``top_share``: share of the round's impressions that went to the 20 items most shown in it.

``--seed`` makes an in-process run reproducible (users, clicks and the engine's exploration draws):
the same seed gives an identical report, a different seed a different one. gRPC runs depend on the
server's seeds and clock.

Output: a text table (totals and first/last-rounds values), ``--json``, ``--plot`` (PNG, matplotlib
imported only then) and a tqdm progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recsvc.evaluation._json import write_outputs
from recsvc.evaluation.metrics import gini

__all__ = [
    "DEFAULT_EXPERIMENTS",
    "EngineTarget",
    "GrpcTarget",
    "Served",
    "SimEvent",
    "SimulationSettings",
    "UserPopulation",
    "add_arguments",
    "build_world",
    "format_table",
    "plot_report",
    "run",
    "simulate",
    "simulate_in_process",
]

HOUR_MS = 3_600_000
#: The simulation starts at the demo catalog's anchor (2026-11-29), after every item's creation.
START_MS = 1_795_910_400_000
TOP_N_SHARE = 20

#: The default A/B experiment (kept identical to ``examples/simulate_experiments.toml``).
DEFAULT_EXPERIMENTS: dict[str, Any] = {
    "experiment": [
        {
            "name": "sim_policy",
            "salt": "sim-policy-1",
            "description": "Exploration and long-tail boosts against the popularity feedback loop of greedy serving.",
            "variant": [
                {"name": "greedy", "weight": 1, "overrides": {"exploration": {"policy": "greedy"}}},
                {"name": "thompson", "weight": 1, "overrides": {"exploration": {"policy": "thompson"}}},
                {"name": "epsilon_greedy", "weight": 1,
                 "overrides": {"exploration": {"policy": "epsilon_greedy", "epsilon": 0.1}}},
                {"name": "greedy_long_tail", "weight": 1,
                 "overrides": {"exploration": {"policy": "greedy"}, "reranking": {"long_tail_boost": 0.1}}},
            ],
        }
    ]
}


# --------------------------------------------------------------------------------------------------
# Settings and the synthetic world
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationSettings:
    """Every knob of a run (recorded in the report)."""

    users: int = 240
    rounds: int = 40
    items: int = 2000
    dim: int = 16
    categories: int = 12
    topics: int = 6
    catalog_seed: int = 7
    initial_popularity: str = "none"  # "none" or "catalog" (the demo catalog's Zipf popularity)
    slate: int = 10
    clusters: int = 8
    taste_noise: float = 0.6
    affinity: float = 6.0
    bias: float = -5.5
    eta: float = 1.0
    impressions: str = "examined"  # or "shown"
    warmup_clicks: int = 3
    round_minutes: float = 60.0
    seed: int = 0
    #: rounds served before the experiments start (in process): every user's pre-period, which CUPED
    #: adjusts with (the engine keeps experiments.cuped_pre_days whole UTC days before each first exposure)
    pre_rounds: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "rounds", "items", "dim", "slate", "clusters", "categories", "topics"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_clicks < 0:
            raise ValueError(f"warmup_clicks must be >= 0, got {self.warmup_clicks}")
        if self.pre_rounds < 0:
            raise ValueError(f"pre_rounds must be >= 0, got {self.pre_rounds}")
        if self.slate > self.items:
            raise ValueError(f"slate ({self.slate}) cannot exceed items ({self.items})")
        if self.impressions not in ("examined", "shown"):
            raise ValueError(f"impressions must be 'examined' or 'shown', got {self.impressions!r}")
        if self.initial_popularity not in ("none", "catalog"):
            raise ValueError(f"initial_popularity must be 'none' or 'catalog', got {self.initial_popularity!r}")
        if self.eta < 0 or self.taste_noise < 0 or self.round_minutes <= 0:
            raise ValueError("eta and taste_noise must be >= 0 and round_minutes > 0")


def build_world(settings: SimulationSettings) -> Any:
    """The simulation's demo catalog (embeddings unit-norm, as a cosine index stores them)."""
    from recsvc.catalog import demo_catalog
    from recsvc.config import DemoCatalogConfig

    catalog = demo_catalog(DemoCatalogConfig(
        n_items=settings.items, dim=settings.dim, n_categories=settings.categories,
        n_topics=settings.topics, seed=settings.catalog_seed))
    if settings.initial_popularity == "none":
        catalog.base_popularity[:] = 0.0
    return catalog


class UserPopulation:
    """Clustered latent tastes and their true click probabilities over the catalog."""

    def __init__(self, embeddings: np.ndarray, settings: SimulationSettings, rng: np.random.Generator,
                 user_prefix: str = "u") -> None:
        emb = np.asarray(embeddings, np.float64)
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        n, d = settings.users, emb.shape[1]
        centres = emb[rng.choice(emb.shape[0], size=settings.clusters, replace=False)]
        self.cluster = rng.integers(0, settings.clusters, size=n)
        taste = centres[self.cluster] + settings.taste_noise * rng.standard_normal((n, d)) / math.sqrt(d)
        self.taste = taste / np.linalg.norm(taste, axis=1, keepdims=True)
        #: float64[U, N]: true click probability of each user on each item (before consumption).
        self.ctr = 1.0 / (1.0 + np.exp(-(settings.affinity * self.taste @ emb.T + settings.bias)))
        self.consumed = np.zeros(self.ctr.shape, bool)
        self.ids = [f"{user_prefix}{u:05d}" for u in range(n)]
        self.exam = 1.0 / (1.0 + np.arange(settings.slate)) ** settings.eta

    def available_ctr(self, u: int) -> np.ndarray:
        return np.where(self.consumed[u], 0.0, self.ctr[u])

    def oracle_value(self, u: int, n: int) -> float:
        """Expected clicks of the best slate of ``n`` unconsumed items (highest CTR first)."""
        ctr = self.available_ctr(u)
        top = np.sort(np.partition(ctr, ctr.size - n)[ctr.size - n:])[::-1]
        return float(self.exam[:n] @ top)


# --------------------------------------------------------------------------------------------------
# Targets: the engine in process, or a live server
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    request_id: str
    variant: str
    item_ids: list[str]
    categories: list[str]


@dataclass(frozen=True)
class SimEvent:
    event_id: str
    user_id: str
    item_id: str
    type: str  # "impression" | "click"
    request_id: str = ""
    timestamp_ms: int = 0


class Target(Protocol):
    def recommend(self, user_id: str, n: int) -> Served: ...
    def feedback(self, events: Sequence[SimEvent]) -> None: ...
    def set_time(self, now_ms: int) -> None: ...
    def close(self) -> None: ...


class _Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


class EngineTarget:
    """The in-process :class:`~recsvc.engine.Engine` with a simulated clock."""

    stamps_events = True

    def __init__(self, cfg: Any, catalog: Any, experiments: Any = None, now_ms: int = START_MS) -> None:
        from recsvc.engine import Engine
        from recsvc.retrieval.ann import AnnIndex
        from recsvc.state.store import MemoryStateStore

        self.clock = _Clock(now_ms)
        ann = AnnIndex.build(catalog.embeddings[: catalog.n_rows], catalog.alive_rows(), cfg.index)
        self.engine = Engine(cfg, catalog, ann, store=MemoryStateStore(), clock=self.clock,
                             experiments=experiments)

    def recommend(self, user_id: str, n: int) -> Served:
        from recsvc.engine import RecommendQuery

        rec = self.engine.recommend(RecommendQuery(user_id=user_id, n=n))
        return Served(rec.request_id, rec.variant, [it.item_id for it in rec.items],
                      [it.category for it in rec.items])

    def feedback(self, events: Sequence[SimEvent]) -> None:
        from recsvc.engine import FeedbackEventIn

        batch = self.engine.cfg.server.max_batch
        for start in range(0, len(events), batch):
            chunk = events[start:start + batch]
            result = self.engine.feedback([FeedbackEventIn(e.event_id, e.user_id, e.item_id, e.type, e.request_id,
                                                           timestamp_ms=e.timestamp_ms) for e in chunk])
            _check_rejections(result.rejected, chunk, lambda r: (r.index, r.reason))

    def set_time(self, now_ms: int) -> None:
        self.clock.now_ms = int(now_ms)

    def experiment_report(self, name: str) -> tuple[dict[str, Any], str]:
        data, text, _ = self.engine.experiment_report(name)
        return data, text

    def close(self) -> None:
        self.engine.close(snapshot=False)


class GrpcTarget:
    """A live recsvc server, through the generated stubs (events carry no timestamp: server time)."""

    stamps_events = False

    def __init__(self, target: str, timeout: float = 10.0, max_batch: int = 5000, client: Any = None) -> None:
        import grpc

        from recsvc.config import ClientConfig
        from recsvc.server.security import client_channel, normalise_target
        from recsvc.v1 import recommender_pb2 as pb
        from recsvc.v1 import recommender_pb2_grpc as pb_grpc

        self._pb = pb
        self.timeout = timeout
        self.max_batch = max_batch
        target = normalise_target(target)
        self.channel = client_channel(client if client is not None else ClientConfig(), target)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ConnectionError(f"no recsvc server answered at {target} within {timeout:g} s") from None
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def recommend(self, user_id: str, n: int) -> Served:
        resp = self.stub.Recommend(self._pb.RecommendRequest(user_id=user_id, n=n), timeout=self.timeout)
        return Served(resp.request_id, resp.variant, [it.item_id for it in resp.items],
                      [it.category for it in resp.items])

    def feedback(self, events: Sequence[SimEvent]) -> None:
        pb = self._pb
        types = {"impression": pb.IMPRESSION, "click": pb.CLICK}
        for start in range(0, len(events), self.max_batch):
            chunk = events[start:start + self.max_batch]
            resp = self.stub.Feedback(pb.FeedbackRequest(events=[
                pb.FeedbackEvent(event_id=e.event_id, request_id=e.request_id, user_id=e.user_id,
                                 item_id=e.item_id, type=types[e.type]) for e in chunk]), timeout=self.timeout)
            _check_rejections(resp.rejected, chunk, lambda r: (r.index, r.reason))

    def set_time(self, now_ms: int) -> None:  # the server keeps its own clock
        return None

    def experiment_report(self, name: str) -> tuple[dict[str, Any], str]:
        resp = self.stub.GetExperimentReport(self._pb.GetExperimentReportRequest(experiment=name),
                                             timeout=self.timeout)
        return json.loads(resp.report_json or "{}"), resp.report_text

    def close(self) -> None:
        self.channel.close()


def _check_rejections(rejected: Sequence[Any], chunk: Sequence[SimEvent], fields: Callable[[Any], tuple]) -> None:
    if rejected:
        index, reason = fields(rejected[0])
        raise RuntimeError(f"{len(rejected)} simulated feedback event(s) rejected, e.g. "
                           f"{chunk[index].event_id}: {reason}")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _ArmLog:
    users: set[int] = field(default_factory=set)
    slates: list[int] = field(default_factory=list)
    served: list[int] = field(default_factory=list)
    clicks: list[int] = field(default_factory=list)
    regret: list[float] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)
    gini: list[float] = field(default_factory=list)
    top_share: list[float] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    round_exposure: np.ndarray | None = None
    total_exposure: np.ndarray | None = None


def _variant_label(variant: str) -> str:
    """``"exp:var,exp2:var2"`` -> ``"var+var2"``; no experiment -> ``"(none)"``."""
    if not variant:
        return "(none)"
    return "+".join(part.partition(":")[2] or part for part in variant.split(","))


def simulate(
    target: Any,
    catalog: Any,
    settings: SimulationSettings,
    *,
    label: Callable[[str], str] = _variant_label,
    run_tag: str = "",
    user_prefix: str = "u",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``settings.pre_rounds + settings.rounds`` rounds against ``target``; returns the per-variant report
    (slates served before an experiment started count under ``"(none)"``)."""
    rng = np.random.default_rng([settings.seed, 0])
    click_rng = np.random.default_rng([settings.seed, 1])
    n_items = catalog.n_rows
    pop = UserPopulation(catalog.embeddings[:n_items], settings, rng, user_prefix)
    n = settings.slate
    round_ms = int(settings.round_minutes * 60_000)
    stamp = getattr(target, "stamps_events", True)
    row_of = catalog.row_of
    tag = run_tag or f"s{settings.seed}"

    # Warm-up: organic clicks, drawn in proportion to each user's CTR.
    t_warm = START_MS - HOUR_MS
    target.set_time(t_warm)
    warm: list[SimEvent] = []
    for u in range(settings.users):
        if settings.warmup_clicks:
            p = pop.ctr[u] / pop.ctr[u].sum()
            picks = rng.choice(n_items, size=settings.warmup_clicks, replace=False, p=p)
            for j, row in enumerate(picks.tolist()):
                pop.consumed[u, row] = True
                warm.append(SimEvent(f"{tag}-w-{u}-{j}", pop.ids[u], catalog.item_ids[row], "click",
                                     timestamp_ms=t_warm + j if stamp else 0))
    if warm:
        target.set_time(t_warm + settings.warmup_clicks + 1)
        target.feedback(warm)

    arms: dict[str, _ArmLog] = {}
    for r in range(settings.pre_rounds + settings.rounds):
        t_round = START_MS + r * round_ms
        target.set_time(t_round)
        events: list[SimEvent] = []
        for arm in arms.values():
            arm.round_exposure = np.zeros(n_items, np.int64)
        round_stats: dict[str, list[float]] = {}
        for u in range(settings.users):
            served = target.recommend(pop.ids[u], n)
            name = label(served.variant)
            arm = arms.get(name)
            if arm is None:
                arm = arms[name] = _ArmLog()
                # an arm first seen in a later round gets empty earlier rounds
                for _ in range(r):
                    for lst in (arm.slates, arm.served, arm.clicks):
                        lst.append(0)
                    for lst in (arm.regret, arm.expected, arm.oracle):
                        lst.append(0.0)
                    for lst in (arm.gini, arm.top_share, arm.coverage):
                        lst.append(float("nan"))
                arm.round_exposure = np.zeros(n_items, np.int64)
                arm.total_exposure = np.zeros(n_items, np.int64)
            arm.users.add(u)
            rows = []
            for item_id, category in zip(served.item_ids, served.categories):
                row = row_of.get(item_id)
                if row is None or catalog.category_names[catalog.categories[row]] != category:
                    raise ValueError(
                        f"the target served item {item_id!r} ({category!r}), which is not in the simulator's "
                        f"catalog: start the server with the same catalog (catalog.demo = n_items "
                        f"{settings.items}, dim {settings.dim}, n_categories {settings.categories}, n_topics "
                        f"{settings.topics}, seed {settings.catalog_seed}) or pass --catalog DIR")
                rows.append(row)
            rows_a = np.asarray(rows, np.int64)
            ctr = pop.available_ctr(u)[rows_a]
            exam_p = pop.exam[: rows_a.size]
            expected = float(exam_p @ ctr)
            # The oracle maximises expected clicks over the same unconsumed items, so the difference is
            # >= 0 up to float rounding of two different sums; clamp that rounding away.
            oracle = pop.oracle_value(u, n)
            regret = max(0.0, oracle - expected)
            examined = click_rng.random(rows_a.size) < exam_p
            clicked = examined & (click_rng.random(rows_a.size) < ctr)
            arm.round_exposure[rows_a] += 1
            st = round_stats.setdefault(name, [0, 0, 0, 0.0, 0.0, 0.0])
            st[0] += 1
            st[1] += rows_a.size
            st[2] += int(clicked.sum())
            st[3] += regret
            st[4] += expected
            st[5] += oracle
            ts = t_round + 1000 if stamp else 0
            for pos, row in enumerate(rows):
                if examined[pos] or settings.impressions == "shown":
                    events.append(SimEvent(f"{tag}-{r}-{u}-{pos}-i", pop.ids[u], served.item_ids[pos], "impression",
                                           served.request_id, ts))
                if clicked[pos]:
                    events.append(SimEvent(f"{tag}-{r}-{u}-{pos}-c", pop.ids[u], served.item_ids[pos], "click",
                                           served.request_id, ts))
                    pop.consumed[u, row] = True
            if progress:
                progress(1)
        target.set_time(t_round + 2000)
        if events:
            target.feedback(events)
        for name, arm in arms.items():
            slates, served_n, clicks, regret, expected, oracle = round_stats.get(name, [0, 0, 0, 0.0, 0.0, 0.0])
            arm.slates.append(int(slates))
            arm.served.append(int(served_n))
            arm.clicks.append(int(clicks))
            arm.regret.append(float(regret))
            arm.expected.append(float(expected))
            arm.oracle.append(float(oracle))
            exp_r = arm.round_exposure
            arm.total_exposure += exp_r
            total = int(exp_r.sum())
            arm.gini.append(gini(exp_r))
            arm.top_share.append(float(np.sort(exp_r)[::-1][:TOP_N_SHARE].sum() / total) if total else float("nan"))
            arm.coverage.append(float((arm.total_exposure > 0).mean()))

    return _report(arms, settings, n_items)


def _report(arms: dict[str, _ArmLog], settings: SimulationSettings, n_items: int) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for name in sorted(arms, key=_arm_order):
        a = arms[name]
        served = np.asarray(a.served, np.float64)
        clicks = np.asarray(a.clicks, np.float64)
        n_users = max(len(a.users), 1)
        cum_regret = np.cumsum(a.regret) / n_users
        tail = max(1, settings.rounds // 4)
        variants[name] = {
            "users": len(a.users),
            "per_round": {
                "slates": a.slates,
                "ctr": _ratio(clicks, served).tolist(),
                "expected_ctr": _ratio(np.asarray(a.expected), served).tolist(),
                "expected_clicks_per_slate": _ratio(np.asarray(a.expected), np.asarray(a.slates, np.float64)).tolist(),
                "oracle_clicks_per_slate": _ratio(np.asarray(a.oracle), np.asarray(a.slates, np.float64)).tolist(),
                "regret_per_slate": _ratio(np.asarray(a.regret), np.asarray(a.slates, np.float64)).tolist(),
                "cumulative_regret_per_user": cum_regret.tolist(),
                "gini": a.gini,
                "top_share": a.top_share,
                "coverage": a.coverage,
            },
            "totals": {
                "slates": int(np.sum(a.slates)),
                "clicks": int(clicks.sum()),
                "ctr": float(clicks.sum() / served.sum()) if served.sum() else float("nan"),
                "ctr_last_quarter": float(clicks[-tail:].sum() / served[-tail:].sum()) if served[-tail:].sum()
                else float("nan"),
                "cumulative_regret_per_user": float(cum_regret[-1]) if cum_regret.size else 0.0,
                "regret_per_slate": float(np.sum(a.regret) / max(np.sum(a.slates), 1)),
                "coverage": float(a.coverage[-1]) if a.coverage else 0.0,
                "gini_all_rounds": gini(a.total_exposure) if a.total_exposure is not None else float("nan"),
                "gini_first_round": _first_finite(a.gini),
                "gini_last_round": a.gini[-1] if a.gini else float("nan"),
                "top_share_first_round": _first_finite(a.top_share),
                "top_share_last_round": a.top_share[-1] if a.top_share else float("nan"),
            },
        }
    return {"settings": asdict(settings), "n_items": n_items, "variants": variants}


def _arm_order(name: str) -> tuple[int, str]:
    order = [v["name"] for v in DEFAULT_EXPERIMENTS["experiment"][0]["variant"]]
    return (order.index(name), name) if name in order else (len(order), name)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.full(a.shape, np.nan), where=b > 0)


def _first_finite(values: Sequence[float]) -> float:
    return next((float(v) for v in values if math.isfinite(v)), float("nan"))


# --------------------------------------------------------------------------------------------------
# Runs: in process (A/B or isolated) and over gRPC
# --------------------------------------------------------------------------------------------------


def base_config(settings: SimulationSettings, config_path: Path | None = None) -> Any:
    """The in-process engine's config: ``config_path`` (or defaults) + what a small, reproducible
    simulation needs (candidate counts for 2,000 items, one index build thread, seeded exploration,
    unlimited budgets so no response is degraded by a busy machine)."""
    from recsvc.config import load_config

    return load_config(config_path, {
        "catalog": {"demo": {"n_items": settings.items, "dim": settings.dim, "n_categories": settings.categories,
                             "n_topics": settings.topics, "seed": settings.catalog_seed}},
        "index": {"build_threads": 1, "ef_construction": 100},
        "retrieval": {"n_candidates": 300, "shares": {"ann": 180, "cooccurrence": 60, "popular": 30, "fresh": 30}},
        "exploration": {"seed": settings.seed},
        "budgets": {"total_ms": 1e9, "candidates_ms": 1e9, "ranking_ms": 1e9, "reranking_ms": 1e9},
        "state": {"fsync": "none"},
    })


def load_experiments(path: Path | None, cfg: Any, data: dict[str, Any] | None = None) -> Any:
    """``path`` (TOML), else ``data`` (parsed TOML), else :data:`DEFAULT_EXPERIMENTS`, validated on ``cfg``."""
    from recsvc.experiments import ExperimentSet

    if path is not None:
        return ExperimentSet.load(path, cfg)
    return ExperimentSet.from_dict(data if data is not None else DEFAULT_EXPERIMENTS, cfg,
                                   source="recsvc.evaluation.simulator")


def simulate_in_process(
    settings: SimulationSettings,
    *,
    experiments_path: Path | None = None,
    experiments: dict[str, Any] | None = None,
    config_path: Path | None = None,
    isolated: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The whole in-process run: world, engine(s), rounds; returns the report.

    The experiment comes from ``experiments_path`` (TOML), else ``experiments`` (parsed TOML), else
    :data:`DEFAULT_EXPERIMENTS`.
    """
    cfg = base_config(settings, config_path)
    if settings.pre_rounds:
        experiments = _starting_after_pre_rounds(experiments_path, experiments, settings)
        experiments_path = None
    experiments = load_experiments(experiments_path, cfg, experiments)
    catalog = build_world(settings)
    bar = None
    if isolated:
        if not len(experiments):
            raise ValueError("--isolated needs an experiment with variants")
        exp = experiments.experiments[0]
        bar = _bar(progress, (settings.pre_rounds + settings.rounds) * settings.users * len(exp.variants))
        variants: dict[str, Any] = {}
        try:
            for v in exp.variants:
                target = EngineTarget(experiments.config_for([(exp.name, v.name)]), catalog)
                try:
                    rep = simulate(target, catalog, settings, label=lambda _s, _n=v.name: _n,
                                   progress=bar.update if bar is not None else None)
                finally:
                    target.close()
                variants.update(rep["variants"])
        finally:
            if bar is not None:
                bar.close()
        report = {"settings": asdict(settings), "n_items": catalog.n_rows, "variants": variants}
        report["mode"] = f"isolated: one engine per variant of {exp.name!r}, all users each"
        return report
    bar = _bar(progress, (settings.pre_rounds + settings.rounds) * settings.users)
    target = EngineTarget(cfg, catalog, experiments)
    try:
        report = simulate(target, catalog, settings, progress=bar.update if bar is not None else None)
        report["mode"] = "in-process A/B: one engine, users split by the experiment hash, shared online state"
        report["experiments"] = [
            {"name": e.name, "variants": [{"name": v.name, "share": v.share, "overrides": _thaw(v.overrides)}
                                          for v in e.variants]} for e in experiments]
        if len(experiments):
            name = experiments.experiments[0].name
            _, text = target.experiment_report(name)
            report["experiment_report"] = {"name": name, "text": text}
    finally:
        target.close()
        if bar is not None:
            bar.close()
    return report


def _starting_after_pre_rounds(path: Path | None, data: dict[str, Any] | None,
                               settings: SimulationSettings) -> dict[str, Any]:
    """The experiment definitions with every experiment that has no start starting after the pre-rounds."""
    import copy
    import tomllib

    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    data = copy.deepcopy(data if data is not None else DEFAULT_EXPERIMENTS)
    start = START_MS + settings.pre_rounds * int(settings.round_minutes * 60_000)
    for exp in data.get("experiment", []):
        exp.setdefault("start", start)
    return data


def ranker_study(settings: SimulationSettings, *, log_rounds: int = 20, log_epsilon: float = 0.3,
                 config_path: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Do rankers trained on the service's own log counter the feedback loop?

    1. Logging: an engine serves the users with epsilon-greedy exploration
       (``log_epsilon``) for ``log_rounds`` rounds; every served item carries its
       propensity and every examined item an impression.
    2. Training: two rankers from that served-slate log — plain logistic
       regression and the inverse-propensity-weighted fit (``recsvc.training``).
    3. Serving: a fresh engine per ranker (default weights, naive, IPS) serves the
       same users greedily for ``settings.rounds`` rounds.
    """
    import dataclasses
    import tempfile

    from recsvc.state.served_log import impressions_from_state
    from recsvc.training import train_ranker

    cfg = base_config(settings, config_path)
    catalog = build_world(settings)
    n_eval = len(("default", "trained_naive", "trained_ips"))
    bar = _bar(progress, (log_rounds + n_eval * settings.rounds) * settings.users)
    tick = bar.update if bar is not None else None
    try:
        logger = EngineTarget(cfg.with_overrides({"exploration": {"policy": "epsilon_greedy",
                                                                   "epsilon": log_epsilon}}), catalog)
        try:
            log_settings = dataclasses.replace(settings, rounds=log_rounds)
            log_report = simulate(logger, catalog, log_settings, label=lambda _v: "logging", run_tag="log",
                                  progress=tick)
            imp = impressions_from_state(logger.engine.state)
        finally:
            logger.close()
        trained: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            paths: dict[str, str | None] = {"default": None}
            for name, ipw in (("trained_naive", False), ("trained_ips", True)):
                ranker, metrics = train_ranker(imp.features, imp.clicked, imp.propensity, ipw=ipw,
                                               feature_names=imp.feature_names, seed=settings.seed)
                path = Path(tmp) / f"{name}.json"
                ranker.save(path)
                paths[name] = str(path)
                trained[name] = {k: metrics[k] for k in metrics if isinstance(metrics[k], (int, float))}
            variants: dict[str, Any] = {}
            for name, path in paths.items():
                overrides: dict[str, Any] = {"exploration": {"policy": "greedy"}}
                if path is not None:
                    overrides["ranking"] = {"model_path": path}
                target = EngineTarget(cfg.with_overrides(overrides), catalog)
                try:
                    rep = simulate(target, catalog, settings, label=lambda _v, _n=name: _n, run_tag=name,
                                   progress=tick)
                finally:
                    target.close()
                variants.update(rep["variants"])
    finally:
        if bar is not None:
            bar.close()
    return {
        "settings": asdict(settings), "n_items": catalog.n_rows, "variants": variants,
        "mode": (f"ranker study: {log_rounds} logging rounds with epsilon-greedy ({log_epsilon}), "
                 f"{len(imp)} logged impressions ({int(imp.clicked.sum())} clicks); then greedy serving "
                 "with each ranker on its own engine"),
        "logging": log_report["variants"].get("logging", {}).get("totals", {}),
        "training": trained,
    }


def simulate_grpc(settings: SimulationSettings, target_address: str, *, catalog_dir: Path | None = None,
                  timeout: float = 10.0, progress: bool = False, config: Any = None) -> dict[str, Any]:
    """Against a live server: the server's experiments and clock; users and event ids carry a random
    run tag so that repeated runs against one server start from clean users.

    The simulated users need the server's catalog (its embeddings): ``catalog_dir``, else the catalog of
    ``config`` (the server's config: its ``catalog.path``, or the demo catalog its ``catalog.demo`` settings
    make, from the same cache), else the simulator's own demo world (``settings``). ``config``'s ``[client]``
    section gives the TLS and token settings of the calls.
    """
    from recsvc.catalog import Catalog

    if catalog_dir is not None:
        catalog = Catalog.load(catalog_dir)
    elif config is not None:
        from recsvc.recovery import load_catalog_and_index

        catalog = load_catalog_and_index(config, progress=progress)[0]
    else:
        catalog = build_world(settings)
    tag = uuid.uuid4().hex[:8]
    bar = _bar(progress, settings.rounds * settings.users)
    target = GrpcTarget(target_address, timeout=timeout, client=config.client if config is not None else None)
    try:
        report = simulate(target, catalog, settings, run_tag=tag, user_prefix=f"sim-{tag}-u",
                          progress=bar.update if bar is not None else None)
    finally:
        target.close()
        if bar is not None:
            bar.close()
    report["mode"] = f"gRPC against {target_address} (server clock and experiments; run tag {tag})"
    return report


def _thaw(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="simulate", unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    pre = f" (after {s['pre_rounds']} pre-experiment rounds)" if s.get("pre_rounds") else ""
    lines = [f"simulation: {s['users']} users x {s['rounds']} rounds{pre}, slate {s['slate']}, "
             f"{report['n_items']} items, seed {s['seed']} — {report.get('mode', '')}"]
    head = (f"{'variant':<18}{'users':>6}{'CTR':>8}{'CTR@end':>9}{'regret/slate':>13}{'cum.regret/u':>13}"
            f"{'coverage':>9}{'Gini r1':>9}{'Gini end':>9}{'Gini all':>9}{'top20 r1':>9}{'top20 end':>10}")
    lines += [head, "-" * len(head)]
    for name, v in report["variants"].items():
        t = v["totals"]
        lines.append(
            f"{name:<18}{v['users']:>6}{t['ctr']:>8.4f}{t['ctr_last_quarter']:>9.4f}{t['regret_per_slate']:>13.4f}"
            f"{t['cumulative_regret_per_user']:>13.3f}{t['coverage']:>9.3f}{t['gini_first_round']:>9.3f}"
            f"{t['gini_last_round']:>9.3f}{t['gini_all_rounds']:>9.3f}{t['top_share_first_round']:>9.3f}"
            f"{t['top_share_last_round']:>10.3f}")
    lines.append("CTR = clicks / served items; CTR@end = last quarter of the rounds; regret in expected clicks "
                 "vs the oracle slate; Gini/top20 = exposure in one round (r1 = first, end = last), all = "
                 "all rounds; coverage = share of the catalog served so far")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path, window: int = 3) -> Path:
    """CTR, cumulative regret per user, Gini of exposure and coverage over rounds, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Every axis starts at 0 (and Gini and coverage end at 1) so that a small gap looks small.
    panels = [("ctr", f"CTR (clicks / served, {window}-round moving mean), higher is better"),
              ("cumulative_regret_per_user", "cumulative regret per user (expected clicks lost), lower is better"),
              ("gini", "Gini of exposure per round (0 = even, 1 = one item), lower = less concentrated"),
              ("coverage", "catalog coverage (cumulative share ever served), higher is better")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, title) in zip(axes.ravel(), panels):
        for name, v in report["variants"].items():
            y = np.asarray(v["per_round"][key], np.float64)
            if key == "ctr" and window > 1 and y.size >= window:
                y = np.convolve(np.nan_to_num(y), np.ones(window) / window, mode="valid")
                x = np.arange(window, window + y.size)
            else:
                x = np.arange(1, y.size + 1)
            ax.plot(x, y, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key in ("gini", "coverage"):
            ax.set_ylim(0.0, 1.0)
        else:
            ax.set_ylim(bottom=0.0, top=max(ax.get_ylim()[1], 1e-9))
    axes[0, 0].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"recsvc closed-loop simulation: {s['users']} users, {report['n_items']} items, seed {s['seed']}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``recsvc simulate``."""
    d = SimulationSettings()
    parser.add_argument("--rounds", type=int, default=d.rounds, help="rounds (default: %(default)s)")
    parser.add_argument("--users", type=int, default=d.users, help="synthetic users (default: %(default)s)")
    parser.add_argument("--items", type=int, default=d.items, help="demo catalog items (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=d.dim, help="demo catalog dimension (default: %(default)s)")
    parser.add_argument("--catalog-seed", type=int, default=d.catalog_seed, help="demo catalog seed")
    parser.add_argument("--initial-popularity", choices=("none", "catalog"), default=d.initial_popularity,
                        help="start from zero popularity (default) or the demo catalog's Zipf popularity")
    parser.add_argument("--slate", type=int, default=d.slate, help="items per slate (default: %(default)s)")
    parser.add_argument("--clusters", type=int, default=d.clusters, help="taste clusters (default: %(default)s)")
    parser.add_argument("--taste-noise", type=float, default=d.taste_noise, help="spread of tastes around a centre")
    parser.add_argument("--affinity", type=float, default=d.affinity, help="a in ctr = sigmoid(a taste.item + b)")
    parser.add_argument("--bias", type=float, default=d.bias, help="b in ctr = sigmoid(a taste.item + b)")
    parser.add_argument("--eta", type=float, default=d.eta, help="examination 1 / (1 + position) ** eta")
    parser.add_argument("--impressions", choices=("examined", "shown"), default=d.impressions,
                        help="send impressions for examined items (default) or for every served item")
    parser.add_argument("--warmup-clicks", type=int, default=d.warmup_clicks,
                        help="organic clicks per user before round 0 (default: %(default)s)")
    parser.add_argument("--round-minutes", type=float, default=d.round_minutes, help="simulated time per round")
    parser.add_argument("--seed", type=int, default=d.seed, help="users, clicks and exploration draws")
    parser.add_argument("--pre-rounds", type=int, default=d.pre_rounds,
                        help="rounds before the experiments start (in process): the users' pre-period, which the "
                             "experiment report's CUPED adjustment uses; 24 one-hour rounds = one day "
                             "(default: %(default)s)")
    parser.add_argument("--experiments", type=Path,
                        help="experiment file (default: the built-in sim_policy, see examples/simulate_experiments.toml)")
    parser.add_argument("--config", type=Path, help="base config TOML for the in-process engine; with --target: "
                        "the server's config (its catalog, and its [client] section for TLS and tokens)")
    parser.add_argument("--isolated", action="store_true",
                        help="one engine per variant of the first experiment, all users each (no shared state)")
    parser.add_argument("--target", help="host:port of a live recsvc server (default: the engine in process)")
    parser.add_argument("--catalog", type=Path, help="with --target: the server's catalog directory "
                                                     "(default: the demo catalog of --items/--dim/--catalog-seed)")
    parser.add_argument("--timeout", type=float, default=10.0, help="gRPC timeout in seconds")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of CTR, regret, Gini and coverage over rounds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ranker-study", action="store_true",
                        help="log under epsilon-greedy, train naive and IPS-weighted rankers from the log, then "
                             "serve each greedily (does IPS training counter the feedback loop?)")
    parser.add_argument("--log-rounds", type=int, default=20, help="with --ranker-study: logging rounds")
    parser.add_argument("--log-epsilon", type=float, default=0.3, help="with --ranker-study: logging epsilon")


def settings_from_args(args: argparse.Namespace) -> SimulationSettings:
    return SimulationSettings(
        users=args.users, rounds=args.rounds, items=args.items, dim=args.dim, catalog_seed=args.catalog_seed,
        initial_popularity=args.initial_popularity, slate=args.slate, clusters=args.clusters,
        taste_noise=args.taste_noise, affinity=args.affinity, bias=args.bias, eta=args.eta,
        impressions=args.impressions, warmup_clicks=args.warmup_clicks, round_minutes=args.round_minutes,
        seed=args.seed, pre_rounds=args.pre_rounds)


def run(args: argparse.Namespace) -> int:
    """``recsvc simulate``: prints the table; writes ``--json`` / ``--plot`` when given."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.ranker_study:
        report = ranker_study(settings, log_rounds=args.log_rounds, log_epsilon=args.log_epsilon,
                              config_path=args.config, progress=not args.no_progress)
    elif args.target:
        from recsvc.config import load_config

        if args.isolated or args.experiments:
            print("note: --isolated/--experiments apply in process only; the server's own config and "
                  "experiments decide over gRPC", file=sys.stderr)
        d = SimulationSettings()
        if args.catalog is None and (args.items, args.dim, args.catalog_seed) != (d.items, d.dim, d.catalog_seed):
            print("note: with --target the catalog is the server's (from --config, or the default demo "
                  "catalog); --items/--dim/--catalog-seed are ignored", file=sys.stderr)
        # the server's catalog: --catalog, else the one --config (the server's config file) names or makes
        config = load_config(args.config)
        try:
            report = simulate_grpc(settings, args.target, catalog_dir=args.catalog, timeout=args.timeout,
                                   progress=not args.no_progress, config=config)
        except (ConnectionError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        report = simulate_in_process(settings, experiments_path=args.experiments, config_path=args.config,
                                     isolated=args.isolated, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print(format_table(report))
    if "experiment_report" in report:
        print()
        print(report["experiment_report"]["text"].rstrip())
    print(f"({elapsed:.1f} s)")
    write_outputs(report, args.json, args.plot, plot_report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - `python -m` convenience
    parser = argparse.ArgumentParser(prog="recsvc simulate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
