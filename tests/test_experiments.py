"""Experiment definitions, assignment, aggregates, reports."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from recsvc.config import Config, ConfigError
from recsvc.experiments import (
    N_BUCKETS,
    ExperimentAggregates,
    ExperimentSet,
    bucket_of,
    format_variant,
    parse_variant,
    plot_report,
    report,
    report_to_dict,
    report_to_text,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "experiments.toml"
DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

TWO_LAYERS = """
[[experiment]]
name = "policy"
salt = "policy-salt"
  [[experiment.variant]]
  name = "control"
  weight = 50
  [[experiment.variant]]
  name = "greedy"
  weight = 30
  overrides = { exploration = { policy = "greedy" }, reranking = { mmr_lambda = 0.1 } }
  [[experiment.variant]]
  name = "ucb"
  weight = 20
  overrides = { exploration = { policy = "ucb1" } }

[[experiment]]
name = "mmr"
salt = "mmr-salt"
start = 2026-01-05T00:00:00Z
stop = 1768176000000            # 2026-01-12T00:00:00Z as epoch ms
  [[experiment.variant]]
  name = "off"
  weight = 1
  [[experiment.variant]]
  name = "on"
  weight = 1
  overrides = { reranking = { mmr_lambda = 0.4 } }
"""


def _write(tmp_path: Path, text: str, name: str = "experiments.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def layered(tmp_path) -> ExperimentSet:
    return ExperimentSet.load(_write(tmp_path, TWO_LAYERS), Config())


USERS = [f"user-{i}" for i in range(100_000)]


# --------------------------------------------------------------------------- the hash


def test_bucket_is_the_documented_sha256_construction():
    for uid in ["u1", "ÿser-ß", "", "12345"]:
        digest = hashlib.sha256(f"my-salt:{uid}".encode("utf-8")).digest()
        assert bucket_of("my-salt", uid) == int.from_bytes(digest[:8], "big") % 10_000
    assert bucket_of("explore-policy-2026-01", "u1") == 6650  # pinned: other systems reproduce this


def test_bucket_boundaries_follow_cumulative_weights_in_declared_order(layered):
    policy = layered.get("policy")
    assert [v.buckets for v in policy.variants] == [(0, 5000), (5000, 8000), (8000, 10_000)]
    thirds = ExperimentSet.from_dict(
        {"experiment": [{"name": "t", "salt": "s", "variant": [
            {"name": "a", "weight": 1}, {"name": "b", "weight": 1}, {"name": "c", "weight": 1}]}]},
        Config(),
    )
    assert [v.buckets for v in thirds.get("t").variants] == [(0, 3333), (3333, 6666), (6666, 10_000)]


def test_assignment_follows_the_buckets(layered):
    policy = layered.get("policy")
    for uid in USERS[:2000]:
        b = bucket_of("policy-salt", uid)
        expected = "control" if b < 5000 else "greedy" if b < 8000 else "ucb"
        assert policy.variant_for(uid).name == expected


# --------------------------------------------------------------------------- assignment


def test_assignment_proportions_over_100k_ids(layered):
    policy = layered.get("policy")
    counts = np.bincount([policy.variant_index(u) for u in USERS], minlength=3)
    shares = counts / len(USERS)
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.006)  # > 4 binomial SDs
    assert stats.chisquare(counts, len(USERS) * np.array([0.5, 0.3, 0.2])).pvalue > 1e-3


def test_same_id_always_gets_the_same_variant_across_restarts(tmp_path, layered):
    now = T0 + 6 * DAY
    first = [layered.assign(u, now).variant for u in USERS[:3000]]
    again = [layered.assign(u, now).variant for u in USERS[:3000]]
    restarted = ExperimentSet.load(_write(tmp_path, TWO_LAYERS, "copy.toml"), Config())
    assert first == again == [restarted.assign(u, now).variant for u in USERS[:3000]]


def test_experiments_with_different_salts_assign_independently(layered):
    a, b = layered.get("policy"), layered.get("mmr")
    table = np.zeros((3, 2), dtype=np.int64)
    for u in USERS:
        table[a.variant_index(u), b.variant_index(u)] += 1
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_start_and_stop_are_respected(layered):
    before, during, at_stop = T0 + 4 * DAY - 1, T0 + 4 * DAY, T0 + 11 * DAY
    assert [e for e, _ in layered.assign("u7", before).arms] == ["policy"]
    assert [e for e, _ in layered.assign("u7", during).arms] == ["policy", "mmr"]
    assert [e for e, _ in layered.assign("u7", at_stop).arms] == ["policy"]  # stop is exclusive
    assert layered.get("mmr").is_active(during) and not layered.get("mmr").is_active(at_stop)


def test_layered_config_applies_every_active_arm_in_file_order(layered):
    cfg = layered.config_for([("mmr", "on"), ("policy", "greedy")])
    assert cfg.exploration.policy == "greedy"
    assert cfg.reranking.mmr_lambda == 0.4  # the later experiment wins a shared key
    assert cfg.reranking.max_per_category == Config().reranking.max_per_category
    user = next(u for u in USERS if layered.get("policy").variant_for(u).name == "greedy"
                and layered.get("mmr").variant_for(u).name == "off")
    a = layered.assign(user, T0 + 6 * DAY)
    assert a.variant == "policy:greedy,mmr:off"
    assert a.arms == (("policy", "greedy"), ("mmr", "off"))
    assert a.config.exploration.policy == "greedy" and a.config.reranking.mmr_lambda == 0.1
    assert parse_variant(a.variant) == a.arms and format_variant(a.arms) == a.variant


def test_assignment_configs_are_cached_per_arm_combination(layered):
    now = T0 + 6 * DAY
    by_variant = {}
    for u in USERS[:500]:
        a = layered.assign(u, now)
        assert by_variant.setdefault(a.variant, a.config) is a.config
    assert len(by_variant) == 6


def test_no_experiments_gives_the_base_config_and_an_empty_variant():
    base = Config().with_overrides({"recommend": {"default_n": 7}})
    a = ExperimentSet.empty(base).assign("u1", T0)
    assert a.variant == "" and a.arms == () and a.config is base
    assert len(ExperimentSet.empty()) == 0


def test_example_file_loads():
    experiments = ExperimentSet.load(EXAMPLE, Config())
    assert [e.name for e in experiments] == ["explore_policy", "diversity"]
    assert experiments.config_for([("explore_policy", "ucb")]).exploration.ucb_c == 0.5


# --------------------------------------------------------------------------- invalid definitions


def _variant(name="a", weight=1, extra=""):
    return f'[[experiment.variant]]\nname = "{name}"\nweight = {weight}\n{extra}\n'


def _exp(name="e", salt="s", extra="", variants=None):
    body = variants if variants is not None else _variant("a") + _variant("b")
    return f'[[experiment]]\nname = "{name}"\nsalt = "{salt}"\n{extra}\n{body}'


@pytest.mark.parametrize(
    "text, message",
    [
        (_exp("e") + _exp("e", salt="t"), "experiment.e.name: duplicate experiment name"),
        (_exp(variants=_variant("a") + _variant("a")), "experiment.e.variant.a.name: duplicate variant name"),
        (_exp(variants=""), "experiment.e.variant: at least one [[experiment.variant]] is required"),
        (_exp(variants=_variant("a", 0)), "experiment.e.variant.a.weight: must be a positive number (got 0)"),
        (_exp(variants=_variant("a", -2) + _variant("b")), "experiment.e.variant.a.weight: must be a positive"),
        (_exp(variants=_variant("a", '"1"')), "experiment.e.variant.a.weight: must be a positive number (got '1')"),
        (
            _exp(variants=_variant("a", 1) + _variant("b", 1e-9) + _variant("c", 2)),
            "experiment.e.variant.b.weight: too small: gets none of the 10000 buckets",
        ),
        (
            _exp(variants=_variant("a") + _variant("b", extra='overrides = { exploration = { policy = "bogus" } }')),
            "x.toml: experiment.e.variant.b.overrides: exploration.policy: Input should be",
        ),
        (
            _exp(variants=_variant("a") + _variant("b", extra="overrides = { reranking = { mmr_lambda = 3 } }")),
            "experiment.e.variant.b.overrides: reranking.mmr_lambda: Input should be less than or equal to 1",
        ),
        (
            _exp(variants=_variant("a") + _variant("b", extra="overrides = { ranking = { nope = 1 } }")),
            "experiment.e.variant.b.overrides: ranking.nope: unknown key",
        ),
        (
            _exp(variants=_variant("a") + _variant("b", extra="overrides = { server = { port = 1 } }")),
            "experiment.e.variant.b.overrides.server: not a per-request config section",
        ),
        (_exp(variants=_variant("a", extra="colour = 1")), "experiment.e.variant.a.colour: unknown key"),
        (_exp(extra="owner = 1"), "experiment.e.owner: unknown key"),
        (_exp(name="a:b"), "experiment[0].name: must match"),
        (_exp(salt=""), "experiment.e.salt: must be a non-empty string"),
        (_exp("e") + _exp("f", salt="s"), "experiment.f.salt: same salt as experiment 'e'"),
        (_exp(extra="start = 2026-01-05T00:00:00"), "experiment.e.start: datetime needs a UTC offset"),
        (_exp(extra='start = "yesterday"'), "experiment.e.start: not an RFC 3339 datetime"),
        (_exp(extra="start = 2000\nstop = 1000"), "experiment.e.stop: must be after start"),
        ("[experiments]\nname = 1\n", "experiments: unknown key"),
    ],
)
def test_invalid_files_raise_errors_naming_the_key(tmp_path, text, message):
    path = _write(tmp_path, text, "x.toml")
    with pytest.raises(ConfigError) as exc:
        ExperimentSet.load(path, Config())
    assert message in str(exc.value)
    assert str(exc.value).startswith(f"{path}: ")


def test_overrides_that_conflict_only_in_combination_fail_at_load(tmp_path):
    more_n = _variant("b", extra="overrides = { recommend = { default_n = 40 } }")
    fewer_max = _variant("b", extra="overrides = { recommend = { max_n = 30 } }")
    text = _exp("e", "s1", variants=_variant("a") + more_n) + _exp("f", "s2", variants=_variant("a") + fewer_max)
    with pytest.raises(ConfigError, match=r"experiment\.e\.variant\.b \+ experiment\.f\.variant\.b .*default_n"):
        ExperimentSet.load(_write(tmp_path, text), Config())


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        ExperimentSet.load(tmp_path / "nope.toml", Config())
    with pytest.raises(ConfigError, match="not valid TOML"):
        ExperimentSet.load(_write(tmp_path, "[[experiment]\n"), Config())


def test_parse_variant_rejects_malformed_strings():
    with pytest.raises(ValueError, match="expected 'experiment:variant"):
        parse_variant("policy")


# --------------------------------------------------------------------------- aggregates

ARMS = (("policy", "greedy"), ("mmr", "on"))


def test_aggregates_count_users_events_and_per_user_moments():
    agg = ExperimentAggregates()
    agg.record_served(ARMS, "u1", np.array([3, 4, 5], np.int32), T0, diversity=0.5, novelty=6.0)
    agg.record_served(ARMS, "u1", np.array([3, 9], np.int64), T0 + 10)
    agg.record_served(ARMS, "u2", [4], T0 + DAY, diversity=0.7)
    for uid, kind, value in [("u1", "impression", 0), ("u1", "impression", 0), ("u1", "click", 0),
                             ("u1", "conversion", 4.0), ("u2", "impression", 0), ("u2", "conversion", 2.5),
                             ("u2", "click", 1.5)]:
        agg.record_event(ARMS, uid, kind, value, T0 + DAY)
    d = agg.arm_data("policy", "greedy")
    t = d.totals
    assert (t["users"], t["slates"], t["items_served"]) == (2, 3, 6)
    assert (t["impressions"], t["clicks"], t["conversions"], t["value"]) == (3, 2, 2, 8.0)
    assert t["diversity_sum"] / t["diversity_n"] == pytest.approx(0.6) and t["novelty_n"] == 1
    assert sorted(d.exposure.tolist()) == [1, 1, 2, 2]  # rows 5, 9 once; 3, 4 twice
    # running moments equal the per-user sums
    pu = d.per_user
    assert t["value_sq"] == pytest.approx(float((pu["value"] ** 2).sum()))
    assert t["clicks_x_impressions"] == float((pu["clicks"] * pu["impressions"]).sum())
    assert t["impressions_sq"] == float((pu["impressions"] ** 2).sum())
    # the other layer saw the same traffic; unknown arms read as zeros
    assert agg.arm_data("mmr", "on").totals == t
    assert agg.arm_data("policy", "control").totals["users"] == 0


def test_aggregates_daily_series_is_cumulative_per_day():
    agg = ExperimentAggregates()
    for day, n in [(0, 2), (1, 3), (3, 1)]:
        for k in range(n):
            agg.record_event(ARMS, f"u{day}-{k}", "impression", 0.0, T0 + day * DAY + k)
    agg.record_event(ARMS, "late", "impression", 0.0, T0)  # late: counted in the latest day
    d = agg.arm_data("policy", "greedy")
    assert (d.days - T0 // DAY).tolist() == [0, 1, 3]
    assert d.daily["impressions"].tolist() == [2, 5, 7]
    assert d.daily["users"].tolist() == [2, 5, 7]


def test_aggregates_snapshot_round_trips_through_json():
    agg = ExperimentAggregates()
    rng = np.random.default_rng(0)
    for i in range(300):
        arms = (("policy", ["control", "greedy"][i % 2]),)
        now = T0 + int(rng.integers(0, 5)) * DAY
        agg.record_served(arms, f"u{i % 70}", rng.integers(0, 50, 5), now, diversity=float(rng.uniform()))
        agg.record_event(arms, f"u{i % 70}", "impression", 0.0, now)
        agg.record_event(arms, f"u{i % 70}", "conversion", float(rng.exponential()), now)
    restored = ExperimentAggregates.from_dict(json.loads(json.dumps(agg.to_dict(), allow_nan=False)))
    assert restored.to_dict() == agg.to_dict()
    for v in ("control", "greedy"):
        a, b = agg.arm_data("policy", v), restored.arm_data("policy", v)
        assert a.totals == b.totals and np.array_equal(a.days, b.days)
        np.testing.assert_array_equal(a.per_user["value"], b.per_user["value"])
    restored.record_event((("policy", "control"),), "u0", "click", 0.0, T0 + 9 * DAY)  # still writable


def test_aggregates_from_dict_rejects_other_versions():
    with pytest.raises(ValueError, match="unsupported version 99"):
        ExperimentAggregates.from_dict({"version": 99, "arms": []})


def test_aggregates_are_thread_safe():
    agg = ExperimentAggregates()

    def work(k: int) -> None:
        for i in range(2000):
            agg.record_event(ARMS, f"u{i % 50}", "impression", 0.0, T0)
            agg.record_event(ARMS, f"u{i % 50}", "conversion", 1.0, T0)
            agg.record_served(ARMS, f"t{k}", [i % 7], T0)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t = agg.arm_data("policy", "greedy").totals
    assert (t["impressions"], t["conversions"], t["value"], t["slates"], t["users"]) == (8000, 8000, 8000.0, 8000, 54)
    # each of u0..u49 has 160 conversions of value 1: Σ value² = 50 · 160²
    assert t["value_sq"] == 50 * 160.0**2


def test_aggregates_reject_bad_input_with_clear_messages():
    agg = ExperimentAggregates()
    with pytest.raises(ValueError, match="event_type must be one of impression, click, conversion; got 'view'"):
        agg.record_event(ARMS, "u", "view", 0.0, T0)
    with pytest.raises(ValueError, match="value must be a finite number, got nan"):
        agg.record_event(ARMS, "u", "click", float("nan"), T0)
    with pytest.raises(ValueError, match="item_rows must be a 1-D integer array"):
        agg.record_served(ARMS, "u", np.array([1.5]), T0)
    with pytest.raises(ValueError, match="item_rows must be non-negative"):
        agg.record_served(ARMS, "u", [-1], T0)
    with pytest.raises(ValueError, match="arms must be \\(experiment, variant\\) string pairs"):
        agg.record_event(["policy:greedy"], "u", "click", 0.0, T0)
    agg.record_event((), "u", "click", 0.0, T0)  # no experiment: nothing to count
    assert agg.arms() == []


# --------------------------------------------------------------------------- reports


def _simulate(experiments: ExperimentSet, n_users: int, ctr: dict[str, float], seed: int,
              days: int = 10, per_user: int = 4, assign=None) -> ExperimentAggregates:
    """Users arrive over `days`; each is served one slate and sees `per_user` impressions;
    clicks at the arm's CTR; a clicking user converts with probability 0.3, with an exponential value."""
    rng = np.random.default_rng(seed)
    agg = ExperimentAggregates()
    arrivals = (np.sort(rng.integers(0, days * DAY, n_users)) + T0).tolist()
    uids = [f"sim-{seed}-{i}" for i in range(n_users)]
    uniform = rng.uniform(size=n_users)
    arms = [assign(uid, uniform[i]) if assign else experiments.assign(uid, arrivals[i]).arms
            for i, uid in enumerate(uids)]
    clicks = rng.binomial(per_user, [ctr[a[0][1]] for a in arms]).tolist()
    converts = (rng.uniform(size=n_users) < 0.3).tolist()
    values = rng.exponential(20.0, n_users).tolist()
    rows = rng.integers(0, 500, (n_users, 10))
    for i, (uid, now, a) in enumerate(zip(uids, arrivals, arms)):
        agg.record_served(a, uid, rows[i], now, diversity=0.5, novelty=7.0)
        for _ in range(per_user):
            agg.record_event(a, uid, "impression", 0.0, now)
        for _ in range(clicks[i]):
            agg.record_event(a, uid, "click", 0.0, now)
        if clicks[i] and converts[i]:
            agg.record_event(a, uid, "conversion", values[i], now)
    return agg


@pytest.fixture(scope="module")
def ab() -> ExperimentSet:
    return ExperimentSet.from_dict(
        {"experiment": [{"name": "ab", "salt": "ab-salt", "variant": [
            {"name": "control", "weight": 1},
            {"name": "treatment", "weight": 1, "overrides": {"exploration": {"policy": "greedy"}}}]}]},
        Config(),
    )


def test_report_detects_a_planted_lift_and_holm_adjusts(ab):
    agg = _simulate(ab, 20_000, {"control": 0.05, "treatment": 0.065}, seed=1)
    rep = report(agg, ab, now_ms=T0 + 11 * DAY, n_items=500)
    (e,) = rep.experiments
    assert e.srm is not None and not e.srm.flagged
    ctr = next(c for c in e.comparisons if c.metric == "ctr")
    assert ctr.significant and ctr.sequential_significant
    assert ctr.ci_low < 0.015 < ctr.ci_high and ctr.cs_low < 0.015 < ctr.cs_high
    assert ctr.cs_high - ctr.cs_low > ctr.ci_high - ctr.ci_low  # always-valid costs width
    assert ctr.p_holm == pytest.approx(min(1.0, ctr.p_value * 3), rel=1e-9)  # the smallest of 3 p-values
    assert e.looks == 10
    control, treatment = e.arms
    assert control.users + treatment.users == 20_000 and control.catalog_coverage == 1.0
    assert treatment.ctr_design_effect == pytest.approx(1.0, abs=0.1)


def test_report_flags_a_planted_srm_first_and_passes_a_fair_split(ab):
    def skewed(uid, uniform):
        return (("ab", "control" if uniform < 0.52 else "treatment"),)

    bad = report(_simulate(ab, 20_000, {"control": 0.05, "treatment": 0.05}, seed=2, per_user=1, assign=skewed),
                 ab, now_ms=T0 + 11 * DAY)
    assert bad.srm_flagged == ("ab",) and bad.experiments[0].srm.p_value < 1e-3
    text = report_to_text(bad)
    assert text.index("SAMPLE RATIO MISMATCH") < text.index("variant  ")
    assert "!!! SRM:" in text and bad.experiments[0].warnings[0].startswith("SAMPLE RATIO MISMATCH")

    good = report(_simulate(ab, 20_000, {"control": 0.05, "treatment": 0.05}, seed=3, per_user=1),
                  ab, now_ms=T0 + 11 * DAY)
    assert good.srm_flagged == () and "SRM check: ok" in report_to_text(good)


def test_report_warns_about_small_samples_and_stopped_experiments(layered):
    agg = _simulate(layered, 120, {"control": 0.05, "greedy": 0.05, "ucb": 0.05}, seed=4, days=2)
    rep = report(agg, layered, now_ms=T0 + 20 * DAY)
    policy, mmr = rep.experiments
    assert any("too little data in 'greedy'" in w and "impressions < 1000" in w for w in policy.warnings)
    assert mmr.status == "ended" and any("experiment is ended" in w for w in mmr.warnings)
    assert len(policy.comparisons) == 6  # 2 variants × 3 metrics


def test_report_to_dict_is_json_safe_and_text_is_readable(ab):
    agg = _simulate(ab, 400, {"control": 0.1, "treatment": 0.1}, seed=5)
    rep = report(agg, ab, now_ms=T0 + 11 * DAY, experiment="ab")
    d = json.loads(json.dumps(report_to_dict(rep), allow_nan=False))
    assert d["experiments"][0]["experiment"] == "ab" and d["srm_flagged"] == []
    assert {c["metric"] for c in d["experiments"][0]["comparisons"]} == {"ctr", "conversion_rate", "value_per_user"}
    text = report_to_text(rep)
    assert "=== ab — running — control: control" in text and "value_per_user" in text
    with pytest.raises(KeyError, match="unknown experiment 'nope'"):
        report(agg, ab, now_ms=T0, experiment="nope")


def test_report_without_events_is_well_formed(ab):
    rep = report(ExperimentAggregates(), ab, now_ms=T0)
    (e,) = rep.experiments
    assert e.srm is None and all(c.p_value is None for c in e.comparisons)
    assert "SRM check: n/a" in report_to_text(rep)
    assert "No experiments defined." in report_to_text(report(ExperimentAggregates(), ExperimentSet.empty(), now_ms=T0))


def test_report_exposure_gini_known_values(ab):
    agg = ExperimentAggregates()
    for u in range(4):  # control: four slates of items 0-2; treatment: windows 0-2, 1-3, 2-4, 3-5
        agg.record_served((("ab", "control"),), f"c{u}", np.array([0, 1, 2]), T0)
        agg.record_served((("ab", "treatment"),), f"t{u}", np.array([u, u + 1, u + 2]), T0)
    # over a 20-item catalog (unserved items count as zeros)
    control, treatment = report(agg, ab, now_ms=T0, n_items=20).experiments[0].arms
    assert control.exposure_gini == pytest.approx(0.85, rel=1e-12)
    assert treatment.exposure_gini == pytest.approx(184 / 240, rel=1e-12)
    # catalog size unknown: over the served items only ([4, 4, 4] and [1, 2, 3, 3, 2, 1])
    control, treatment = report(agg, ab, now_ms=T0).experiments[0].arms
    assert control.exposure_gini == 0.0
    assert treatment.exposure_gini == pytest.approx(16 / 72, rel=1e-12)
    # nothing served: undefined, None (not NaN) in the report
    control, _ = report(ExperimentAggregates(), ab, now_ms=T0, n_items=20).experiments[0].arms
    assert control.exposure_gini is None


def test_plot_report_writes_a_png(ab, tmp_path):
    pytest.importorskip("matplotlib")
    agg = _simulate(ab, 600, {"control": 0.05, "treatment": 0.07}, seed=6)
    for metric in ("ctr", "value_per_user"):
        out = plot_report(agg, "ab", metric, tmp_path / f"{metric}.png", experiments=ab)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="metric must be one of ctr, conversion_rate, value_per_user; got 'cr'"):
        plot_report(agg, "ab", "cr", tmp_path / "x.png")


def test_plot_report_without_matplotlib_says_how_to_get_it(ab, tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plot_report needs matplotlib, an optional dependency"):
        plot_report(ExperimentAggregates(), "ab", "ctr", tmp_path / "x.png", experiments=ab)


def test_n_buckets_is_documented_value():
    assert N_BUCKETS == 10_000


def test_report_with_an_arm_nobody_reached_yet(tmp_path):
    """Regression: the daily-series alignment indexed into an empty arm."""
    from recsvc.config import Config
    from recsvc.experiments import ExperimentAggregates, ExperimentSet, report, report_to_text

    path = tmp_path / "e.toml"
    path.write_text('[[experiment]]\nname = "e"\nsalt = "s"\n'
                    '[[experiment.variant]]\nname = "a"\nweight = 1\n'
                    '[[experiment.variant]]\nname = "b"\nweight = 1\n')
    exps = ExperimentSet.load(path, Config())
    agg = ExperimentAggregates()
    agg.record_served([("e", "a")], "u1", [1, 2], 1_000)
    agg.record_event([("e", "a")], "u1", "impression", 0.0, 1_000)
    rep = report(agg, exps, now_ms=2_000)
    assert "e" in report_to_text(rep)


@pytest.mark.parametrize("days", [1, 10])
def test_plot_report_reads_at_a_glance_with_one_look_or_many(ab, tmp_path, days, monkeypatch):
    """One daily look: bars with interval whiskers on a one-day axis (a line through one point drew no band on
    a 2025-2029 axis). Many looks: lines with bands on an axis spanning the looks, not years."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    agg = _simulate(ab, 300, {"control": 0.05, "treatment": 0.07}, seed=6, days=days)
    plot_report(agg, "ab", "ctr", tmp_path / "ctr.png", experiments=ab)
    top, bottom = figures[0].axes
    if days == 1:
        assert len(top.patches) == 2 and len(bottom.patches) == 1  # a bar per variant, one lift bar
        assert [t.get_text() for t in bottom.get_xticklabels()] == ["2026-01-01"]
        assert "lift vs control" in bottom.get_title()
    else:
        assert len(top.lines) == 2 and len(top.collections) == 2  # a line and a band per variant
        lo, hi = bottom.get_xlim()
        assert hi - lo < days + 1  # days on the axis, not years
