"""The served-slate log in compact columns (recsvc.state.served_ring): the feature codec against its twin and
known values, a slate read back as it was recorded, eviction and the request-id lookup against the
representation it replaced (an OrderedDict of ServedSlate objects), cuts, and snapshots in the old format."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict

import numpy as np
import pytest

from recsvc.state.records import EventType, ServedSlate, encode_served
from recsvc.state.served_ring import ServedRing, decode_features, encode_features

NATIVE = [True, False]


def slate(rng: np.random.Generator, k: int = 10, f: int = 19, rid: str | None = None, **kw) -> ServedSlate:
    rows = rng.choice(100_000, k, replace=False).tolist()
    X = np.zeros((k, f), np.float32)
    if f:
        X[:, 0] = rng.normal(size=k)
        X[:, 1] = rng.uniform(0, 12, k)
        X[:, 2 % f] = rng.integers(0, 2, k)
        sparse = rng.uniform(size=k)
        sparse[rng.random(k) < 0.7] = 0.0
        X[:, 3 % f] = sparse  # a source score: zero where the source did not propose the item
        X[:, 4 % f] = 0.25  # a context feature: constant over the slate
    d = dict(request_id=rid or uuid.UUID(int=int(rng.integers(2**62))).hex, user_id=f"u{int(rng.integers(50))}",
             variant="treatment", arms=[("exp", "treatment")], rows=rows,
             propensities=(rng.integers(1, 129, k) / 129).tolist(),
             served_at_ms=1_700_000_000_000 + int(rng.integers(10**6)),
             features=X.tobytes() if f else b"", feature_names=[f"f{j}" for j in range(f)],
             diversity=float(rng.uniform()), novelty=None, random_slice=bool(rng.integers(2)),
             random_p=float(rng.uniform()) if rng.integers(2) else None)
    if d["random_slice"]:  # the main policy's propensities, 0 allowed, on the slice's slates only
        d["target_propensities"] = (rng.integers(0, 3, k) * rng.integers(1, 129, k) / 258).tolist()
    d.update(kw)
    return ServedSlate(**d)


def quantised(s: ServedSlate) -> ServedSlate:
    """What the log gives back: the same slate with its features rounded to float16."""
    k, f = len(s.rows), len(s.feature_names)
    feats = s.features
    if feats and k and f and len(feats) == 4 * k * f:
        block = np.frombuffer(feats, np.float32)
        if not (np.abs(block) > 65504).any():  # beyond float16: kept as float32
            feats = block.astype(np.float16).astype(np.float32).tobytes()
    return ServedSlate(s.request_id, s.user_id, s.variant, list(s.arms), list(s.rows), list(s.propensities),
                       s.served_at_ms, feats, list(s.feature_names), s.diversity, s.novelty, dict(s.outcome),
                       dict(s.counted), s.random_slice, s.random_p, list(s.target_propensities))


# -- the feature codec ---------------------------------------------------------------------------------
def random_block(rng: np.random.Generator) -> np.ndarray:
    k, f = int(rng.integers(1, 30)), int(rng.integers(1, 45))
    X = (rng.normal(size=(k, f)) * rng.choice([1e-6, 1.0, 100.0, 1e4], size=f)).astype(np.float32)
    for j in range(f):
        kind = rng.integers(6)
        if kind == 0:
            X[:, j] = X[0, j]
        elif kind == 1:
            X[:, j] = rng.integers(0, 2, k)
        elif kind == 2:
            X[rng.random(k) < 0.8, j] = 0.0
        elif kind == 3:
            X[rng.random(k) < 0.3, j] = -0.0
        elif kind == 4:
            X[rng.random(k) < 0.2, j] = np.nan
    return X


@pytest.mark.parametrize("use_native", NATIVE)
def test_features_read_back_as_float16_bit_for_bit(use_native):
    rng = np.random.default_rng(3)
    for _ in range(500):
        X = random_block(rng)
        enc = encode_features(X, use_native=use_native)
        got = decode_features(enc, *X.shape, use_native=use_native)
        want = X.astype(np.float16).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_feature_kernel_and_twin_write_the_same_bytes():
    rng = np.random.default_rng(4)
    for _ in range(500):
        X = random_block(rng)
        a, b = encode_features(X, use_native=True), encode_features(X, use_native=False)
        assert a == b
        k, f = X.shape
        assert np.array_equal(decode_features(a, k, f, use_native=False).view(np.uint32),
                              decode_features(a, k, f, use_native=True).view(np.uint32))


def test_feature_encoding_known_values():
    # columns: constant 0.5, 0/1, sparse (one non-zero of 4), dense
    X = np.array([[0.5, 1, 0, 1.0], [0.5, 0, 0, 2.0], [0.5, 1, 3.0, 3.0], [0.5, 0, 0, 4.0]], np.float32)
    enc = encode_features(X)
    h = lambda v: np.float16(v).tobytes()  # noqa: E731
    assert enc == (bytes([0b10000000, 0b01000000, 0b00100000]) + h(0.5)
                   + bytes([0b10100010]) + h(3.0) + h(1.0) + h(2.0) + h(3.0) + h(4.0))
    np.testing.assert_array_equal(decode_features(enc, 4, 4), X)


def test_feature_error_is_float16_rounding():
    """The stated error: relative at most 2^-11 for normal values, absolute at most 2^-25 below 2^-14."""
    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(size=(50, 8)) * 10.0 ** rng.integers(-7, 4, 8)]).astype(np.float32)
    got = decode_features(encode_features(X), *X.shape)
    err = np.abs(got.astype(np.float64) - X)
    assert (err <= np.maximum(2.0 ** -11 * np.abs(X), 2.0 ** -25)).all()
    assert err.max() > 0  # it is lossy, and the bound is what holds


@pytest.mark.parametrize("use_native", NATIVE)
def test_features_beyond_float16_are_refused_and_kept_exact(use_native):
    X = np.ones((3, 2), np.float32)
    X[1, 1] = 70_000.0
    assert encode_features(X, use_native=use_native) is None
    X[1, 1] = -np.inf
    assert encode_features(X, use_native=use_native) is None
    ring = ServedRing(10)
    s = slate(np.random.default_rng(0), k=3, f=2, features=X.tobytes())
    ring.append(s)
    assert ring.get(s.request_id) == s  # float32 bytes as they came


def test_damaged_feature_bytes_raise_value_error():
    enc = encode_features(np.arange(12, dtype=np.float32).reshape(3, 4))
    for use_native in NATIVE:
        with pytest.raises(ValueError, match="do not match a 3 x 4 block"):
            decode_features(enc[:-1], 3, 4, use_native=use_native)
        with pytest.raises(ValueError, match="do not match a 4 x 4 block"):
            decode_features(enc, 4, 4, use_native=use_native)


# -- one slate -----------------------------------------------------------------------------------------
def test_a_slate_reads_back_as_it_was_recorded():
    rng = np.random.default_rng(1)
    ring = ServedRing(100)
    cases = [slate(rng), slate(rng, k=20, f=40), slate(rng, f=0), slate(rng, k=0),
             slate(rng, rid="r-not-a-uuid"), slate(rng, rid=uuid.uuid4().hex.upper()),
             slate(rng, features=b"\x00\x01\x02"),  # not a [k, F] block: kept as it came
             slate(rng, feature_names=[], features=np.ones(10, np.float32).tobytes()),
             slate(rng, propensities=[1 / 3] * 10, diversity=None, novelty=float("nan"), variant="", arms=[])]
    cases.append(slate(rng, outcome={}, counted={}))
    s = cases[-1]
    s.outcome, s.counted = {s.rows[2]: 2, s.rows[5]: 1}, {s.rows[2]: 7}
    for s in cases:
        ring.append(s)
    for s in cases:
        got = ring.get(s.request_id)
        want = quantised(s)
        assert json.dumps(encode_served(got, True)) == json.dumps(encode_served(want, True))  # (nan == nan)
        assert got.outcome == want.outcome and got.counted == want.counted
        assert ring.get(s.request_id, features=False).features == b""
    assert ring.get("nope") is None and len(ring) == len(cases)


def test_propensities_are_exact():
    """Monte-Carlo shares such as 44/129 are not float32 values: they read back bit for bit."""
    ring = ServedRing(10)
    s = slate(np.random.default_rng(2), propensities=[44 / 129, 0.1, 1 / 3, 1.0, 1e-300, 0.5, 0.7, 0.9, 0.2, 0.3])
    ring.append(s)
    assert ring.get(s.request_id).propensities == s.propensities


def test_target_propensities_read_back_exactly_and_only_where_logged():
    """The random slice's per-item main-policy propensities (a sparse column: only slates that carry them pay)
    read back bit for bit, through the ring, the log's codec and a cut; a slate without them reads back []."""
    from recsvc.state.records import decode, encode

    rng = np.random.default_rng(3)
    ring = ServedRing(10, block_size=64)
    with_tp = slate(rng, k=5, random_slice=True, target_propensities=[0.0, 44 / 129, 1.0, 1e-300, 0.5])
    without = slate(rng, k=5, random_slice=False, target_propensities=[])
    for s in (without, with_tp, without, with_tp):  # (the same ids again: replaced)
        ring.append(s)
    assert ring.get(with_tp.request_id).target_propensities == with_tp.target_propensities
    assert ring.get(without.request_id).target_propensities == []
    assert [s.target_propensities for s in ring.cut()] == [[], with_tp.target_propensities]
    assert decode(encode(with_tp)).target_propensities == with_tp.target_propensities
    assert "tp" not in encode(without)
    old = encode(with_tp)
    del old["tp"]  # a record written before the field existed
    assert decode(old).target_propensities == []
    with pytest.raises(ValueError, match="2 target propensities for 5 items"):
        ring.append(slate(rng, k=5, target_propensities=[0.5, 0.5]))


def test_outcomes_apply_to_every_position_of_a_row():
    ring = ServedRing(10)
    s = slate(np.random.default_rng(2), k=4, rows=[5, 6, 5, 7])
    ring.append(s)
    seq = ring.locate(s.request_id)
    ring.set_outcome(seq, 5, outcome=1)
    ring.set_outcome(seq, 5, counted=3)
    assert ring.outcome_at(seq, 5) == (1, 3) and ring.outcome_at(seq, 6) == (0, 0)
    assert ring.outcome_at(seq, 99) == (0, 0)
    got = ring.get(s.request_id)
    assert got.outcome == {5: 1} and got.counted == {5: 3}
    with pytest.raises(ValueError, match="out of range"):
        ring.set_outcome(seq, 6, outcome=3)


# -- many slates: against the representation it replaced --------------------------------------------------
class ObjectLog:
    """The representation before: an OrderedDict of ServedSlate, oldest evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.d = capacity, OrderedDict()

    def append(self, s: ServedSlate) -> None:
        self.d.pop(s.request_id, None)  # (the ring moves a repeated id to the end; see the ring's docstring)
        self.d[s.request_id] = s
        while len(self.d) > self.capacity:
            self.d.popitem(last=False)


@pytest.mark.parametrize("capacity,block", [(1, None), (7, 64), (300, 64), (5000, None)])
def test_eviction_and_lookup_match_the_object_log(capacity, block):
    rng = np.random.default_rng(capacity)
    ring, ref = ServedRing(capacity, block_size=block), ObjectLog(capacity)
    ids: list[str] = []
    for step in range(3000):
        if ids and rng.random() < 0.05:  # the same request id again (a replayed record)
            rid = ids[int(rng.integers(max(0, len(ids) - 2 * capacity), len(ids)))]
        elif rng.random() < 0.1:
            rid = f"other-{step}"
        else:
            rid = uuid.UUID(int=int(rng.integers(2**62)) << 64 | int(rng.integers(2**62))).hex
        s = slate(rng, k=int(rng.integers(0, 25)), f=int(rng.choice([0, 3, 19])), rid=rid)
        ids.append(rid)
        ring.append(s)
        ref.append(quantised(s))
        if rng.random() < 0.3:  # feedback on a remembered slate
            target = next(reversed(ref.d.values())) if rng.random() < 0.5 else next(iter(ref.d.values()))
            if target.rows:
                row = target.rows[int(rng.integers(len(target.rows)))]
                target.outcome[row] = 1
                ring.set_outcome(ring.locate(target.request_id), row, outcome=1)
        assert len(ring) == len(ref.d)
        if step % 97 == 0:
            for rid in ids[-min(3 * capacity, 400) - 5:]:
                got, want = ring.get(rid), ref.d.get(rid)
                assert (got is None) == (want is None), rid
                if want is not None:
                    assert encode_served(got, True) == encode_served(want, True)
    assert [encode_served(s, True) for s in ring.cut()] == [encode_served(s, True) for s in ref.d.values()]
    assert len(ring._blocks) <= capacity // ring._block_size + 2  # evicted blocks were released


def test_a_cut_does_not_change_with_the_ring():
    rng = np.random.default_rng(9)
    ring = ServedRing(100, block_size=64)
    slates = [slate(rng) for _ in range(90)]
    for s in slates:
        ring.append(s)
    cut = ring.cut()
    before = [encode_served(s, True) for s in cut]
    ring.set_outcome(ring.locate(slates[-1].request_id), slates[-1].rows[0], outcome=2)
    ring.set_outcome(ring.locate(slates[3].request_id), slates[3].rows[0], counted=1)
    for _ in range(150):
        ring.append(slate(rng))
    assert [encode_served(s, True) for s in cut] == before and len(cut) == 90
    assert cut[-1].request_id == slates[-1].request_id and [s.request_id for s in cut[-3:]] == \
        [s.request_id for s in slates[-3:]]
    assert ring.get(slates[3].request_id) is None and len(ring) == 100


def test_memory_per_slate_is_a_few_hundred_bytes():
    """The columns of 20,000 slates of 10 items with 19 features (strings excluded): well under 1 KB each
    (issue 16's budget: the default 200,000 slates well under 200 MB)."""
    rng = np.random.default_rng(0)
    ring = ServedRing(20_000)
    for _ in range(20_000):
        ring.append(slate(rng))
    user_strings = 20_000 * 53
    per = (ring.nbytes() - user_strings) / 20_000
    assert per < 400, per


# -- the read model: feedback, counting and snapshots -----------------------------------------------------
def test_read_model_counts_once_per_slate_and_item(cfg):
    from recsvc.state.online import ReadModel
    from recsvc.state.records import FeedbackEvent

    st = ReadModel(cfg, 1000)
    s = slate(np.random.default_rng(0), served_at_ms=1000)
    st.remember_served(s)
    row = s.rows[1]
    ev = lambda i, t: FeedbackEvent(f"e{i}", s.user_id, "x", row, t, 1.0, 2000, s.request_id)  # noqa: E731
    assert st.apply_feedback([ev(0, EventType.CLICK)]) == [(("exp", "treatment"),)]
    assert st.served_slate(s.request_id).outcome == {row: 2}
    assert st.count_for_experiment(s.request_id, row, EventType.CLICK) == ("impression", "click")
    assert st.count_for_experiment(s.request_id, row, EventType.IMPRESSION) == ()
    assert st.count_for_experiment(s.request_id, row, EventType.CONVERSION) == ("conversion",)
    assert st.count_for_experiment("unknown", row, EventType.CLICK) == ()
    assert st.served_slate(s.request_id).counted == {row: 7}
    assert st.bandit_evidence(np.array([row]))[0][0] == 1.0


def test_a_snapshot_written_by_the_object_log_loads(tmp_path, cfg):
    """online.json as the code before issue 16 wrote it (float32 features in base64, outcomes as dicts): loaded
    into the columns and written back in the same format, features rounded to float16."""
    from recsvc.state.online import ReadModel

    rng = np.random.default_rng(5)
    slates = [slate(rng) for _ in range(30)]
    slates[4].outcome, slates[4].counted = {slates[4].rows[0]: 1, slates[4].rows[3]: 2}, {slates[4].rows[3]: 3}
    old = ReadModel(cfg, 1000)
    np.savez(tmp_path / "online.npz", popularity_acc=np.zeros(10), successes=np.zeros(10), failures=np.zeros(10),
             item_events=np.zeros(10), top_popular=np.zeros(0, np.int32))
    doc = {"pop_t0_ms": 0.0, "total_impressions": 0.0, "applied_lsn": 7, "cooc": {}, "histories": {},
           "served": [encode_served(s, with_outcome=True) for s in slates], "seen_events": []}
    (tmp_path / "online.json").write_text(json.dumps(doc))
    old.read_snapshot(tmp_path)
    assert old.n_served() == 30
    assert [encode_served(s, True) for s in old.served_slates()] == \
        [encode_served(quantised(s), True) for s in slates]
    out = tmp_path / "again"
    out.mkdir()
    old.write_snapshot(out)
    again = json.loads((out / "online.json").read_text())["served"]
    assert again == [encode_served(quantised(s), True) for s in slates]
    back = ReadModel(cfg, 1000)
    back.read_snapshot(out)
    assert [encode_served(s, True) for s in back.served_slates()] == again


def test_a_snapshot_without_target_propensities_loads(tmp_path, cfg):
    """online.json written before the random slice logged the main policy's propensities (no ``tp``): loads,
    the slice's slates with none; one written now keeps them across a write and a read."""
    from recsvc.state.online import ReadModel

    rng = np.random.default_rng(6)
    slates = [slate(rng, random_slice=bool(i % 2)) for i in range(20)]
    np.savez(tmp_path / "online.npz", popularity_acc=np.zeros(10), successes=np.zeros(10), failures=np.zeros(10),
             item_events=np.zeros(10), top_popular=np.zeros(0, np.int32))
    served = [encode_served(s, with_outcome=True) for s in slates]
    assert sum("tp" in d for d in served) == 10
    old = [{k: v for k, v in d.items() if k != "tp"} for d in served]
    doc = {"pop_t0_ms": 0.0, "total_impressions": 0.0, "applied_lsn": 7, "cooc": {}, "histories": {},
           "served": old, "seen_events": []}
    (tmp_path / "online.json").write_text(json.dumps(doc))
    rm = ReadModel(cfg, 1000)
    rm.read_snapshot(tmp_path)
    assert [s.target_propensities for s in rm.served_slates()] == [[]] * 20
    doc["served"] = served
    (tmp_path / "online.json").write_text(json.dumps(doc))
    rm.read_snapshot(tmp_path)
    out = tmp_path / "again"
    out.mkdir()
    rm.write_snapshot(out)
    back = ReadModel(cfg, 1000)
    back.read_snapshot(out)
    assert [s.target_propensities for s in back.served_slates()] == [s.target_propensities for s in slates]


def test_a_snapshot_with_an_impossible_outcome_is_refused(tmp_path, cfg):
    from recsvc.state.online import ReadModel
    from recsvc.state.store import SnapshotDamaged

    s = slate(np.random.default_rng(5))
    d = encode_served(s, with_outcome=True)
    d["o"] = {str(s.rows[0]): 9}
    np.savez(tmp_path / "online.npz", popularity_acc=np.zeros(10), successes=np.zeros(10), failures=np.zeros(10),
             item_events=np.zeros(10), top_popular=np.zeros(0, np.int32))
    (tmp_path / "online.json").write_text(json.dumps({"pop_t0_ms": 0.0, "total_impressions": 0.0, "applied_lsn": 1,
                                                      "cooc": {}, "histories": {}, "served": [d],
                                                      "seen_events": []}))
    with pytest.raises(SnapshotDamaged, match="out of range"):
        ReadModel(cfg, 1000).read_snapshot(tmp_path)


def test_request_ids_sharing_a_half_spread_over_the_lookup_table():
    """The table was keyed by an id's first 8 bytes: ids sharing them (uuid1-like, or made by a client)
    probed one long run, 20,000 of them took minutes. Both halves are hashed now: probe runs stay short."""
    from recsvc.state.served_ring import _home

    ring = ServedRing(20_000)
    rng = np.random.default_rng(0)
    for half in ("lo", "hi"):
        for i in range(10_000):
            v = int(rng.integers(2**62))
            rid = uuid.UUID(int=v if half == "lo" else v << 64).hex
            ring.append(slate(rng, k=1, f=0, rid=rid))
    table, mask = ring._table, ring._table.size - 1
    longest = 0
    for pos in np.flatnonzero(table >= 0).tolist():
        b, i = ring._at(int(table[pos]))
        lo, hi = b.record(i)[:2]
        longest = max(longest, (pos - _home(lo, hi, mask)) & mask)
    assert longest < 64, longest


def test_a_slate_recorded_between_the_bandit_and_the_experiment_count_cannot_lose_the_count(tmp_path):
    """Feedback and Recommend run side by side (the ingest and the served locks differ). A slate recorded while
    a feedback batch is being applied may evict the slate the batch was attributed to; the experiment count
    must be settled in the same look-up as the bandit's, not in a second one that finds the slate gone."""
    from conftest import NOW_MS, FakeClock, small_config
    from test_experiment_cuped import EXPERIMENTS_TOML

    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery

    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS_TOML.format(start=NOW_MS - 86_400_000))
    cfg = small_config(tmp_path, experiments={"file": str(path)}, state={"served_log_size": 4})
    eng = Engine.from_config(cfg, clock=FakeClock(NOW_MS))
    try:
        rec = eng.recommend(RecommendQuery(user_id="u1", n=3))
        assert rec.variant
        model = eng.feedback_path.state
        rng = np.random.default_rng(0)
        for name in ("apply_feedback", "apply_feedback_counted"):  # whichever the feedback path calls
            if hasattr(model, name):
                applied = getattr(model, name)

                def then_serve_more(events, applied=applied):
                    out = applied(events)
                    for _ in range(5):  # recorded meanwhile: the attributed slate leaves the log
                        model.remember_served(slate(rng, k=3))
                    return out

                setattr(model, name, then_serve_more)
        eng.feedback([FeedbackEventIn("c1", "u1", rec.items[0].item_id, "click", request_id=rec.request_id)])
        arm = eng.aggregates.arm_data(*rec.variant.split(":"))  # "policy:control"
        assert arm.totals["clicks"] == 1 and arm.totals["impressions"] == 1
    finally:
        eng.close(snapshot=False)
