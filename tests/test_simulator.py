"""Closed-loop simulator: reproducibility, the greedy popularity loop, regret, and the gRPC mode."""

from __future__ import annotations

import argparse
import json
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

from recsvc.config import Config
from recsvc.evaluation import simulator as sim
from recsvc.evaluation._json import json_safe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "simulate_experiments.toml"
GREEDY_ONLY = {"experiment": [{"name": "only", "salt": "only-1", "variant": [
    {"name": "greedy", "weight": 1, "overrides": {"exploration": {"policy": "greedy"}}}]}]}
SMALL = dict(items=600, users=50, rounds=12)


def as_json(report: dict) -> str:
    return json.dumps(json_safe(report), sort_keys=True)


@pytest.fixture(scope="module")
def ab_report():
    return sim.simulate_in_process(sim.SimulationSettings(items=500, users=40, rounds=6, seed=3))


def test_same_seed_same_report_and_another_seed_differs(ab_report):
    again = sim.simulate_in_process(sim.SimulationSettings(items=500, users=40, rounds=6, seed=3))
    assert as_json(again) == as_json(ab_report)
    other = sim.simulate_in_process(sim.SimulationSettings(items=500, users=40, rounds=6, seed=4))
    assert as_json(other) != as_json(ab_report)


def test_ab_report_covers_every_variant(ab_report):
    variants = ab_report["variants"]
    assert list(variants) == ["greedy", "thompson", "epsilon_greedy", "greedy_long_tail"]
    assert sum(v["users"] for v in variants.values()) == 40
    for v in variants.values():
        pr, t = v["per_round"], v["totals"]
        assert len(pr["ctr"]) == 6 and t["slates"] == 6 * v["users"]
        assert 0.0 <= t["ctr"] <= 1.0 and 0.0 < t["coverage"] <= 1.0 and 0.0 <= t["gini_all_rounds"] <= 1.0
    assert "sim_policy" in ab_report["experiment_report"]["text"]


def test_regret_is_non_negative_and_cumulative_regret_never_decreases(ab_report):
    for v in ab_report["variants"].values():
        pr = v["per_round"]
        assert min(pr["regret_per_slate"]) >= 0.0
        cum = np.asarray(pr["cumulative_regret_per_user"])
        assert (np.diff(cum) >= 0).all() and cum[-1] > 0
        # regret = oracle - served, both in expected clicks per slate
        np.testing.assert_allclose(np.asarray(pr["oracle_clicks_per_slate"]) - pr["expected_clicks_per_slate"],
                                   pr["regret_per_slate"], atol=1e-9)


def test_greedy_exposure_concentrates_over_rounds():
    """The popularity feedback loop: under greedy serving the same items take ever more of the slots."""
    report = sim.simulate_in_process(sim.SimulationSettings(**SMALL, seed=0), experiments=GREEDY_ONLY)
    pr = report["variants"]["greedy"]["per_round"]
    gini = np.asarray(pr["gini"])
    assert gini[-3:].mean() > gini[:3].mean() + 0.02
    assert pr["top_share"][-1] > pr["top_share"][0]


def test_population_ctr_and_oracle():
    s = sim.SimulationSettings(items=50, users=3, slate=4, eta=1.0)
    emb = np.random.default_rng(0).standard_normal((50, 8))
    pop = sim.UserPopulation(emb, s, np.random.default_rng(1))
    assert pop.ctr.shape == (3, 50) and ((pop.ctr > 0) & (pop.ctr < 1)).all()
    np.testing.assert_allclose(pop.exam, [1, 1 / 2, 1 / 3, 1 / 4])
    best = np.sort(pop.ctr[0])[::-1][:4]
    assert pop.oracle_value(0, 4) == pytest.approx(float(pop.exam @ best))
    pop.consumed[0, np.argmax(pop.ctr[0])] = True  # a consumed item is worth nothing
    assert pop.oracle_value(0, 4) < float(pop.exam @ best)


class _FixedSlates:
    """A target that serves fixed catalog rows, ``SLATES[round][user]``, and ignores feedback."""

    stamps_events = True
    SLATES = ([[0, 1, 2]] * 4,  # everybody the same three items
              [[u, u + 1, u + 2] for u in range(4)],  # overlapping windows
              [[3 * u, 3 * u + 1, 3 * u + 2] for u in range(4)])  # twelve distinct items

    def __init__(self, catalog) -> None:
        self.catalog = catalog
        self.requests = 0  # the simulator asks for user 0, 1, 2, 3 in every round

    def recommend(self, user_id: str, n: int) -> sim.Served:
        rows = self.SLATES[self.requests // 4][self.requests % 4]
        self.requests += 1
        c = self.catalog
        return sim.Served(f"req-{self.requests}", "", [c.item_ids[r] for r in rows],
                          [c.category_names[c.categories[r]] for r in rows])

    def feedback(self, events) -> None:
        pass

    def set_time(self, now_ms: int) -> None:
        pass


def test_exposure_gini_known_values():
    """Gini over the 20-item catalog: round 0 = 0.85, round 1 = 184/240, round 2 = 0.4, all rounds = 476/720."""
    settings = sim.SimulationSettings(items=20, users=4, rounds=3, slate=3, categories=4, topics=2, clusters=2)
    catalog = sim.build_world(settings)
    report = sim.simulate(_FixedSlates(catalog), catalog, settings)
    arm = report["variants"]["(none)"]
    assert arm["per_round"]["gini"] == pytest.approx([0.85, 184 / 240, 0.4], rel=1e-12)
    assert arm["totals"]["gini_all_rounds"] == pytest.approx(476 / 720, rel=1e-12)
    assert arm["totals"]["gini_first_round"] == pytest.approx(0.85, rel=1e-12)
    assert arm["totals"]["gini_last_round"] == pytest.approx(0.4, rel=1e-12)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="impressions must be 'examined' or 'shown'"):
        sim.SimulationSettings(impressions="all")
    with pytest.raises(ValueError, match=r"slate \(20\) cannot exceed items \(10\)"):
        sim.SimulationSettings(items=10, slate=20)


def test_default_experiment_matches_the_example_file():
    with EXAMPLE.open("rb") as fh:
        assert tomllib.load(fh) == sim.DEFAULT_EXPERIMENTS


def test_cli_writes_json_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    args = parser.parse_args(["--items", "300", "--users", "12", "--rounds", "3", "--no-progress",
                              "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert sim.run(args) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["settings"]["rounds"] == 3 and data["variants"]
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
    assert "cum.regret/u" in capsys.readouterr().out


# -- gRPC mode -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    from recsvc.server import serve

    tmp = tmp_path_factory.mktemp("simsrv")
    settings = sim.SimulationSettings(items=400, users=10, rounds=3, seed=1)
    cfg = Config().with_overrides({
        "server": {"port": 0, "grace_period_s": 0.5},
        "catalog": {"cache_dir": str(tmp / "cache"), "demo": {
            "n_items": settings.items, "dim": settings.dim, "n_categories": settings.categories,
            "n_topics": settings.topics, "seed": settings.catalog_seed}},
        "index": {"build_threads": 1, "ef_construction": 50},
        "retrieval": {"n_candidates": 200, "shares": {"ann": 120, "cooccurrence": 40, "popular": 20, "fresh": 20}},
        "state": {"dir": str(tmp / "state"), "fsync": "none"},
        "experiments": {"file": str(EXAMPLE)},
    })
    stop, started, ready = threading.Event(), threading.Event(), {}

    def on_ready(port):
        ready["port"] = port
        started.set()

    t = threading.Thread(target=serve, args=(cfg,), kwargs={"on_ready": on_ready, "stop_event": stop}, daemon=True)
    t.start()
    assert started.wait(60), "server did not become ready"
    yield settings, f"127.0.0.1:{ready['port']}"
    stop.set()
    t.join(30)


def test_grpc_mode_smoke(live_server):
    settings, address = live_server
    report = sim.simulate_grpc(settings, address)
    variants = report["variants"]
    assert set(variants) <= {"greedy", "thompson", "epsilon_greedy", "greedy_long_tail"}
    assert sum(v["users"] for v in variants.values()) == settings.users
    assert sum(v["totals"]["slates"] for v in variants.values()) == settings.users * settings.rounds
    assert all(min(v["per_round"]["regret_per_slate"]) >= 0 for v in variants.values())
    # a second run against the same server starts from fresh users and event ids
    again = sim.simulate_grpc(settings, address)
    assert sum(v["totals"]["slates"] for v in again["variants"].values()) == settings.users * settings.rounds


def test_grpc_mode_reports_a_catalog_mismatch(live_server):
    settings, address = live_server
    other = sim.SimulationSettings(items=400, users=2, rounds=1, catalog_seed=8)
    with pytest.raises(ValueError, match="not in the simulator's catalog"):
        sim.simulate_grpc(other, address)


def test_ranker_study_trains_on_the_log_and_serves_each_ranker():
    from recsvc.evaluation.simulator import SimulationSettings, ranker_study

    settings = SimulationSettings(users=30, rounds=3, items=400, dim=8, seed=2)
    rep = ranker_study(settings, log_rounds=4, log_epsilon=0.3)
    assert set(rep["variants"]) == {"default", "trained_naive", "trained_ips"}
    assert rep["training"]["trained_ips"] and rep["training"]["trained_naive"]
    for v in rep["variants"].values():
        assert v["totals"]["slates"] == 30 * 3
        assert v["totals"]["regret_per_slate"] >= 0


def test_pre_rounds_give_every_user_a_pre_period_that_cuped_adjusts_with():
    """--pre-rounds: the experiment starts after them (whole days here: 12 two-hour rounds), so each user's
    first exposure has a pre-period of activity, and the experiment report's CUPED section uses it."""
    settings = sim.SimulationSettings(items=500, users=40, rounds=6, seed=3, pre_rounds=12, round_minutes=120)
    report = sim.simulate_in_process(settings)
    none = report["variants"]["(none)"]["per_round"]["slates"]
    assert none[:12] == [40] * 12 and sum(none[12:]) == 0  # before the start nobody is in the experiment
    assert sum(v["users"] for k, v in report["variants"].items() if k != "(none)") == 40
    text = report["experiment_report"]["text"]
    assert "adjusted with each user's value in the 14 days before their first exposure (40 of 40 users" in text
    with pytest.raises(ValueError, match="pre_rounds must be >= 0, got -1"):
        sim.SimulationSettings(pre_rounds=-1)


def test_pre_rounds_keep_an_experiment_s_own_start():
    data = {"experiment": [dict(GREEDY_ONLY["experiment"][0], start=1)]}
    out = sim._starting_after_pre_rounds(None, data, sim.SimulationSettings(pre_rounds=5))
    assert out["experiment"][0]["start"] == 1 and "start" not in GREEDY_ONLY["experiment"][0]
    default = sim._starting_after_pre_rounds(None, None, sim.SimulationSettings(pre_rounds=5))
    assert default["experiment"][0]["start"] == sim.START_MS + 5 * 3_600_000
    assert "start" not in sim.DEFAULT_EXPERIMENTS["experiment"][0]
