"""Re-ranking: selection kernels (parity, known values) and the rules (properties)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.config import RerankingConfig
from recsvc.reranking import Slate, mmr_select, rerank, rerank_planned, select_with_quotas, selection_plan

NOW_MS = 1_750_000_000_000
DAY_MS = 86_400_000


def unit_rows(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    e = rng.normal(size=(m, d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# --------------------------------------------------------------------------
# select_with_quotas


def test_select_with_quotas_known_values() -> None:
    categories = np.array([0, 0, 1, 0, 2, 1, -1, -1], np.int32)
    order = np.arange(8, dtype=np.int32)
    out = np.empty(6, np.int32)
    n = select_with_quotas(order, categories, 2, 6, out)
    # index 3 is the third of category 0: skipped; -1 is never limited
    assert out[:n].tolist() == [0, 1, 2, 4, 5, 6]


def test_select_with_quotas_counts_what_is_already_in_the_slate() -> None:
    categories = np.array([0, 1, 0, 1], np.int32)
    counts = np.array([1, 0], np.int32)  # one category-0 item is already placed
    out = np.empty(4, np.int32)
    n = select_with_quotas(np.arange(4, dtype=np.int32), categories, 1, 4, out, counts=counts)
    assert out[:n].tolist() == [1]
    assert counts.tolist() == [1, 1]


def test_select_with_quotas_zero_means_no_quota() -> None:
    out = np.empty(3, np.int32)
    n = select_with_quotas(np.array([2, 0, 1], np.int32), np.zeros(3, np.int32), 0, 3, out)
    assert out[:n].tolist() == [2, 0, 1]


@pytest.mark.parametrize("seed", range(8))
def test_select_with_quotas_parity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 400))
    C = int(rng.integers(1, 12))
    categories = rng.integers(-1, C, m).astype(np.int32)
    order = rng.permutation(m).astype(np.int32)[: int(rng.integers(0, m + 1))]
    q, k = int(rng.integers(0, 5)), int(rng.integers(0, 60))
    init = rng.integers(0, 3, C).astype(np.int32)
    results = []
    for use_native in (True, False):
        out, counts = np.full(k, -7, np.int32), init.copy()
        n = select_with_quotas(order, categories, q, k, out, counts=counts, use_native=use_native)
        results.append((out[:n].tolist(), counts.tolist()))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: select_with_quotas([0, 5], [0, 1], 1, 2, np.empty(2, np.int32)), r"order entries must be candidate indices in \[0, 2\)"),
        (lambda: select_with_quotas([0], [0], 1, 3, np.empty(2, np.int32)), "out has room for 2 items but k = 3"),
        (lambda: select_with_quotas([0], [0], 1, 1, np.empty(2, np.int64)), "out must be a writable, C-contiguous int32"),
        (lambda: select_with_quotas([0], [0], 1, -1, np.empty(2, np.int32)), "k must be >= 0"),
        (lambda: select_with_quotas([0.5], [0], 1, 1, np.empty(2, np.int32)), "order must hold integers"),
    ],
)
def test_select_with_quotas_errors(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------
# MMR


def test_mmr_skips_a_near_duplicate() -> None:
    emb = np.array([[1, 0, 0], [0.999, 0.0447, 0], [0, 1, 0]], np.float32)
    scores = np.array([0.9, 0.85, 0.5], np.float32)
    out = np.empty(2, np.int32)
    assert mmr_select(scores, emb, 0.5, 2, np.zeros(3, np.int32), 0, out) == 2
    assert out.tolist() == [0, 2]  # 1 scores higher than 2 but is a copy of 0
    assert mmr_select(scores, emb, 0.0, 2, np.zeros(3, np.int32), 0, out) == 2
    assert out.tolist() == [0, 1]  # lambda 0: relevance only


def test_mmr_with_lambda_zero_is_greedy_with_quotas() -> None:
    rng = np.random.default_rng(7)
    m = 200
    scores = rng.random(m).astype(np.float32)
    categories = rng.integers(0, 5, m).astype(np.int32)
    a, b = np.empty(20, np.int32), np.empty(20, np.int32)
    na = mmr_select(scores, unit_rows(rng, m, 16), 0.0, 20, categories, 3, a)
    nb = select_with_quotas(np.argsort(-scores, kind="stable").astype(np.int32), categories, 3, 20, b)
    assert na == nb == 15  # five categories, three each
    assert a[:na].tolist() == b[:nb].tolist()


def test_mmr_normalises_rows_and_seeds_from_max_sim() -> None:
    emb = np.array([[3, 0], [0, 0.5], [2, 2]], np.float32)  # not unit-norm
    scores = np.array([0.5, 0.5, 0.5], np.float32)
    max_sim = np.array([-np.inf, 0.9, -np.inf], np.float32)  # 1 is similar to something already placed
    out = np.empty(3, np.int32)
    n = mmr_select(scores, emb, 0.5, 3, np.zeros(3, np.int32), 0, out, max_sim=max_sim)
    assert out[:n].tolist() == [0, 2, 1]
    # 0 then 2 were chosen (each then similar to itself); 1 keeps its seed 0.9 > cos(1, 2) = 0.707
    np.testing.assert_allclose(max_sim, [1.0, 0.9, 1.0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_mmr_parity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.choice([1, 7, 33, 45, 130, 301]))
    d = int(rng.choice([1, 5, 8, 17, 64]))
    lam = float(rng.choice([0.0, 0.2, 0.5, 0.9, 1.0]))
    C = int(rng.integers(1, 8))
    scores = rng.random(m).astype(np.float32)
    emb = rng.normal(size=(m, d)).astype(np.float32)  # normalised inside
    emb[rng.random(m) < 0.05] = 0.0  # a few zero rows
    categories = rng.integers(-1, C, m).astype(np.int32)
    q, k = int(rng.integers(0, 4)), int(rng.integers(0, 25))
    outs = []
    for use_native in (True, False):
        out, counts = np.full(k, -1, np.int32), np.zeros(C, np.int32)
        max_sim = np.full(m, -np.inf, np.float32)
        n = mmr_select(scores, emb, lam, k, categories, q, out, counts=counts, max_sim=max_sim, use_native=use_native)
        outs.append((out[:n].tolist(), counts.tolist(), max_sim))
    assert outs[0][:2] == outs[1][:2]
    np.testing.assert_allclose(outs[0][2], outs[1][2], rtol=1e-5, atol=1e-6)


def test_mmr_respects_quotas() -> None:
    rng = np.random.default_rng(3)
    m = 300
    categories = rng.integers(0, 4, m).astype(np.int32)
    out = np.empty(10, np.int32)
    n = mmr_select(rng.random(m).astype(np.float32), unit_rows(rng, m, 8), 0.6, 10, categories, 2, out)
    assert n == 8  # 4 categories * 2
    assert max(Counter(categories[out[:n]].tolist()).values()) == 2


def test_mmr_errors() -> None:
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got 1.5"):
        mmr_select([0.1], [[1.0]], 1.5, 1, [0], 0, np.empty(1, np.int32))
    with pytest.raises(ValueError, match=r"emb must have shape \(m, d\) = \(2, d\)"):
        mmr_select([0.1, 0.2], [[1.0]], 0.5, 1, [0, 0], 0, np.empty(1, np.int32))
    with pytest.raises(ValueError, match="scores contains NaN or infinity at index 1"):
        mmr_select([0.1, np.nan], [[1.0], [1.0]], 0.5, 1, [0, 0], 0, np.empty(1, np.int32))


# --------------------------------------------------------------------------
# rerank: a small catalog


class Catalog:
    """N items with ids 'i<row>'; unknown ids resolve to None."""

    def __init__(self, seed: int, N: int = 40, d: int = 6, C: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.N = N
        self.embeddings = unit_rows(rng, N, d)
        self.categories = rng.integers(-1, C, N).astype(np.int32)
        self.maturity = rng.choice([0, 7, 13, 18], N).astype(np.int32)
        self.created_at_ms = (NOW_MS - rng.integers(0, 60 * DAY_MS, N)).astype(np.int64)
        self.popularity_percentile = rng.random(N).astype(np.float32)
        self.blocked: set[int] = set()

    def row_of(self, item_id: str) -> int | None:
        if item_id.startswith("i") and item_id[1:].isdigit() and int(item_id[1:]) < self.N:
            return int(item_id[1:])
        return None

    def kwargs(self, max_maturity: int = 18) -> dict:
        return dict(
            embeddings=self.embeddings,
            categories=self.categories,
            maturity=self.maturity,
            created_at_ms=self.created_at_ms,
            now_ms=NOW_MS,
            popularity_percentile=self.popularity_percentile,
            row_of=self.row_of,
            eligible=lambda row: row not in self.blocked,
            max_maturity=max_maturity,
            freshness_half_life_days=14.0,
        )


def ranked(rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(rows, np.int32), np.linspace(1.0, 0.1, len(rows)).astype(np.float32)


def test_plain_rerank_keeps_the_order() -> None:
    cat = Catalog(0)
    cat.maturity[:] = 0
    cat.categories[:] = np.arange(cat.N)  # all different: quotas never bind
    rows, scores = ranked([5, 3, 9, 1])
    slate = rerank(rows, scores, 3, RerankingConfig(), **cat.kwargs())
    assert slate.rows.tolist() == [5, 3, 9]
    assert slate.pool_index.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(slate.scores, scores[:3])
    assert not slate.sponsored.any() and not slate.pinned.any()


def test_maturity_filter_is_the_stricter_of_config_and_request() -> None:
    cat = Catalog(0)
    cat.categories[:] = -1
    cat.maturity[:] = 0
    cat.maturity[[2, 4]] = [18, 13]
    rows, scores = ranked([2, 4, 6, 8])
    assert rerank(rows, scores, 4, RerankingConfig(max_maturity=18), **cat.kwargs(max_maturity=12)).rows.tolist() == [6, 8]
    assert rerank(rows, scores, 4, RerankingConfig(max_maturity=13), **cat.kwargs(max_maturity=18)).rows.tolist() == [4, 6, 8]


def test_pinned_and_sponsored_slots() -> None:
    cat = Catalog(1)
    cat.maturity[:] = 0
    cat.categories[:] = -1
    rows, scores = ranked([10, 11, 12, 13, 14, 15, 16])
    rules = RerankingConfig(
        pinned={"i14": 0, "i30": 3},  # 14 is in the pool, 30 is not
        sponsored_items=["nope", "i12", "i31"],
        sponsored_positions=[2, 5, 9],
    )
    slate = rerank(rows, scores, 6, rules, **cat.kwargs())
    assert slate.rows.tolist() == [14, 10, 12, 30, 11, 31]
    assert slate.pinned.tolist() == [True, False, False, True, False, False]
    assert slate.sponsored.tolist() == [False, False, True, False, False, True]
    assert slate.pool_index.tolist() == [4, 0, 2, -1, 1, -1]
    assert slate.scores[0] == scores[4] and np.isnan(slate.scores[3]) and np.isnan(slate.scores[5])


def test_reserved_items_that_cannot_be_served_are_skipped() -> None:
    cat = Catalog(1)
    cat.maturity[:] = 0
    cat.categories[:] = -1
    cat.maturity[20] = 18
    cat.blocked.add(21)
    rows, scores = ranked([10, 11, 12])
    rules = RerankingConfig(
        max_maturity=13,
        pinned={"i20": 0, "i21": 1, "i22": 1, "unknown": 2},  # i22 takes position 1 after i21 fails
        sponsored_items=["i20", "i21", "i23"],
        sponsored_positions=[1, 2],  # 1 is pinned already
    )
    slate = rerank(rows, scores, 4, rules, **cat.kwargs())
    assert slate.rows.tolist() == [10, 22, 23, 11]
    assert slate.sponsored.tolist() == [False, False, True, False]


def test_first_pin_wins_a_contested_position() -> None:
    cat = Catalog(1)
    cat.maturity[:] = 0
    rows, scores = ranked([10, 11])
    slate = rerank(rows, scores, 3, RerankingConfig(pinned={"i20": 1, "i21": 1}), **cat.kwargs())
    assert slate.rows[1] == 20 and 21 not in slate.rows


def test_short_pool_moves_reserved_items_up() -> None:
    cat = Catalog(1)
    cat.maturity[:] = 0
    rows, scores = ranked([10])
    slate = rerank(rows, scores, 5, RerankingConfig(pinned={"i20": 4}), **cat.kwargs())
    assert slate.rows.tolist() == [10, 20]
    assert slate.pinned.tolist() == [False, True]


def test_quota_falls_back_to_score_order_when_it_cannot_fill() -> None:
    cat = Catalog(2)
    cat.maturity[:] = 0
    cat.categories[:] = 0
    cat.categories[[3, 7]] = 1
    rows, scores = ranked([0, 1, 2, 3, 4, 5, 7])
    for lam in (0.0, 0.5):
        slate = rerank(rows, scores, 5, RerankingConfig(max_per_category=2, mmr_lambda=lam), **cat.kwargs())
        assert len(slate) == 5
        if lam == 0.0:
            # quota first: 0, 1 (cat 0), 3, 7 (cat 1); then the best remaining by score
            assert slate.rows.tolist() == [0, 1, 3, 7, 2]


def test_reserved_items_count_toward_the_quota() -> None:
    cat = Catalog(2)
    cat.maturity[:] = 0
    cat.categories[:] = np.arange(cat.N) % 2
    rows, scores = ranked([0, 2, 4, 1, 3, 5])  # evens = category 0, ranked first
    slate = rerank(rows, scores, 4, RerankingConfig(max_per_category=2, pinned={"i8": 0}), **cat.kwargs())
    assert slate.rows.tolist() == [8, 0, 1, 3]


def test_duplicate_pool_rows_are_served_once() -> None:
    cat = Catalog(2)
    cat.maturity[:] = 0
    cat.categories[:] = -1
    rows, scores = ranked([4, 5, 4, 6])
    slate = rerank(rows, scores, 4, RerankingConfig(), **cat.kwargs())
    assert slate.rows.tolist() == [4, 5, 6]
    assert slate.pool_index.tolist() == [0, 1, 3]


@pytest.mark.parametrize("rules", [RerankingConfig(), RerankingConfig(max_per_category=1, pinned={"i5": 1}),
                                   RerankingConfig(mmr_lambda=0.5)])
def test_distinct_rows_skips_only_the_duplicate_check(rules) -> None:
    """The request path's candidates never repeat a row: ``distinct_rows=True`` serves what the check would."""
    cat = Catalog(3)
    cat.maturity[:] = 0
    cat.categories[:] = np.arange(cat.N) % 3
    rows, scores = ranked([9, 4, 5, 2, 7, 1, 8])
    want = rerank(rows, scores, 4, rules, **cat.kwargs())
    got = rerank(rows, scores, 4, rules, **cat.kwargs(), distinct_rows=True)
    for field in ("rows", "scores", "sponsored", "pool_index", "pinned"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_boosts_reorder() -> None:
    cat = Catalog(3)
    cat.maturity[:] = 0
    cat.categories[:] = -1
    cat.created_at_ms[:] = NOW_MS - 365 * DAY_MS
    cat.created_at_ms[7] = NOW_MS  # brand new
    cat.popularity_percentile[:] = 1.0
    cat.popularity_percentile[8] = 0.0  # long tail
    rows = np.array([5, 6, 7, 8], np.int32)
    scores = np.array([0.50, 0.45, 0.40, 0.35], np.float32)
    assert rerank(rows, scores, 1, RerankingConfig(), **cat.kwargs()).rows.tolist() == [5]
    assert rerank(rows, scores, 1, RerankingConfig(freshness_boost=0.2), **cat.kwargs()).rows.tolist() == [7]
    assert rerank(rows, scores, 1, RerankingConfig(long_tail_boost=0.2), **cat.kwargs()).rows.tolist() == [8]


def test_mmr_diversifies_against_pinned_items() -> None:
    cat = Catalog(4, d=2)
    cat.maturity[:] = 0
    cat.categories[:] = -1
    cat.embeddings[:] = [1.0, 0.0]
    cat.embeddings[6] = [0.0, 1.0]
    rows = np.array([5, 6], np.int32)
    scores = np.array([0.6, 0.5], np.float32)
    rules = RerankingConfig(mmr_lambda=0.5, pinned={"i9": 0})  # i9 looks like 5
    assert rerank(rows, scores, 2, rules, **cat.kwargs()).rows.tolist() == [9, 6]
    assert rerank(rows, scores, 2, RerankingConfig(pinned={"i9": 0}), **cat.kwargs()).rows.tolist() == [9, 5]


def test_k_zero_and_empty_pool() -> None:
    cat = Catalog(5)
    rows, scores = ranked([1, 2])
    assert len(rerank(rows, scores, 0, RerankingConfig(), **cat.kwargs())) == 0
    empty = rerank(np.empty(0, np.int32), np.empty(0, np.float32), 3, RerankingConfig(), **cat.kwargs())
    assert isinstance(empty, Slate) and len(empty) == 0


@pytest.mark.parametrize(
    "rows, scores, message",
    [
        ([1, 2], [0.5, np.nan], "scores contains NaN or infinity at index 1"),
        ([1, 99], [0.5, 0.4], r"rows must be catalog rows in \[0, 40\); got \[99\]"),
        ([1, 2], [0.5], "scores has 1 entries but rows has 2"),
        ([1.5, 2], [0.5, 0.4], "rows must hold integers"),
    ],
)
def test_rerank_rejects_bad_inputs(rows, scores, message) -> None:
    with pytest.raises(ValueError, match=message):
        rerank(rows, scores, 2, RerankingConfig(), **Catalog(0).kwargs())


def test_rerank_rejects_mismatched_catalog_arrays() -> None:
    kwargs = Catalog(0).kwargs()
    kwargs["maturity"] = kwargs["maturity"][:-1]
    with pytest.raises(ValueError, match=r"maturity must have shape \(40,\) like categories"):
        rerank([1], [0.5], 1, RerankingConfig(), **kwargs)


# --------------------------------------------------------------------------
# properties


@st.composite
def scenarios(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    cat = Catalog(seed, N=draw(st.integers(1, 30)), C=draw(st.integers(1, 5)))
    rng = np.random.default_rng(seed)
    m = draw(st.integers(0, 30))
    rows = rng.integers(0, cat.N, m).astype(np.int32)  # duplicates allowed
    scores = np.sort(rng.random(m).astype(np.float32))[::-1].copy()
    cat.blocked = {int(r) for r in rng.integers(0, cat.N, draw(st.integers(0, 5)))}
    ids = st.one_of(st.integers(0, cat.N + 3).map(lambda r: f"i{r}"), st.just("ghost"))
    rules = RerankingConfig(
        max_per_category=draw(st.integers(0, 3)),
        mmr_lambda=draw(st.sampled_from([0.0, 0.3, 1.0])),
        freshness_boost=draw(st.sampled_from([0.0, 0.5])),
        long_tail_boost=draw(st.sampled_from([0.0, 0.5])),
        max_maturity=draw(st.sampled_from([0, 7, 13, 18])),
        pinned=draw(st.dictionaries(ids, st.integers(0, 12), max_size=4)),
        sponsored_items=draw(st.lists(ids, max_size=4)),
        sponsored_positions=draw(st.lists(st.integers(0, 12), max_size=3)),
    )
    k = draw(st.integers(0, 12))
    max_maturity = draw(st.sampled_from([7, 13, 18]))
    return cat, rows, scores, rules, k, max_maturity


def check_slate(cat: Catalog, rows, scores, rules: RerankingConfig, k: int, max_maturity: int, slate: Slate) -> None:
    ceiling = min(rules.max_maturity, max_maturity)
    served = slate.rows.tolist()
    n = len(served)
    reserved = slate.pinned | slate.sponsored
    # no duplicates, never more than k, never too mature
    assert len(set(served)) == n <= k
    assert all(cat.maturity[r] <= ceiling for r in served)
    assert not (slate.pinned & slate.sponsored).any()
    # reserved items passed the request's filters; organic ones come from the pool
    assert all(r not in cat.blocked for r in slate.rows[reserved])
    organic_idx = slate.pool_index[~reserved]
    assert (organic_idx >= 0).all() and (rows[organic_idx] == slate.rows[~reserved]).all()
    in_pool = slate.pool_index >= 0
    assert (rows[slate.pool_index[in_pool]] == slate.rows[in_pool]).all()
    # size: k whenever the pool alone holds k servable items
    available = {int(r) for r in rows if cat.maturity[r] <= ceiling}
    assert n >= min(k, len(available))
    if len(available) >= k:
        assert n == k
    if n == k:
        # pinned positions honoured: the first servable pin of each position is there
        claimed: dict[int, int] = {}
        for item, pos in sorted(rules.pinned.items(), key=lambda kv: kv[1]):
            row = cat.row_of(item)
            if pos < k and pos not in claimed and row is not None and row not in cat.blocked and cat.maturity[row] <= ceiling:
                claimed[pos] = row
        for pos, row in claimed.items():
            assert served[pos] == row and slate.pinned[pos]
        # sponsored items sit in sponsored positions
        sponsored_rows = {cat.row_of(i) for i in rules.sponsored_items}
        for pos in np.flatnonzero(slate.sponsored):
            assert pos in rules.sponsored_positions and served[pos] in sponsored_rows
    # quotas: never exceeded when the organic pool could fill the slate within them
    q = rules.max_per_category
    if q > 0:
        reserved_cats = Counter(int(cat.categories[r]) for r in slate.rows[reserved])
        organic = available - set(slate.rows[reserved].tolist())
        by_cat = Counter(int(cat.categories[r]) for r in organic)
        fillable = sum(c for cc, c in by_cat.items() if cc < 0) + sum(
            min(c, max(0, q - reserved_cats[cc])) for cc, c in by_cat.items() if cc >= 0
        )
        if fillable >= k - int(reserved.sum()):
            counts = Counter(int(cat.categories[r]) for r in served)
            for cc, c in counts.items():
                if cc >= 0:
                    assert c <= max(q, reserved_cats[cc])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_rerank_properties(scenario) -> None:
    cat, rows, scores, rules, k, max_maturity = scenario
    slates = [
        rerank(rows, scores, k, rules, **cat.kwargs(max_maturity), use_native=use_native) for use_native in (True, False)
    ]
    for slate in slates:
        check_slate(cat, rows, scores, rules, k, max_maturity, slate)
    # the compiled and the numpy paths agree on the slate
    assert slates[0].rows.tolist() == slates[1].rows.tolist()
    assert slates[0].sponsored.tolist() == slates[1].sponsored.tolist()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.booleans(), st.booleans())
def test_rerank_planned_serves_reranks_slate_bit_for_bit(scenario, ties, shuffled) -> None:
    """One selection plan per request: the served round re-ranked from the candidates' plan (candidate order)
    is rerank's slate of the explored order, every field and every bit, boosts and reserved slots included."""
    cat, _, _, rules, k, max_maturity = scenario
    rules = rules.model_copy(update={"mmr_lambda": 0.0})  # MMR re-ranks with rerank itself
    rng = np.random.default_rng(k * 7919 + len(rules.pinned))
    m = int(rng.integers(0, cat.N + 1))
    rows = rng.choice(cat.N, m, replace=False).astype(np.int32)  # candidates: each row once
    scores = rng.random(m).astype(np.float32)
    if ties:
        scores = np.round(scores * 4).astype(np.float32) / 4
    order = rng.permutation(m) if shuffled else np.argsort(-scores, kind="stable")
    kw = cat.kwargs(max_maturity)
    plan = selection_plan(rows, k, rules, **kw, distinct_rows=True)
    for use_native in (True, False):
        want = rerank(rows[order], scores[order], k, rules, **kw, distinct_rows=True, use_native=use_native)
        got = rerank_planned(plan, rows[order], scores[order], order, use_native=use_native)
        for field in ("rows", "scores", "sponsored", "pool_index", "pinned"):
            a, b = getattr(want, field), getattr(got, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field


def test_rerank_planned_refuses_mmr_and_hand_made_plans() -> None:
    cat = Catalog(1)
    rows, scores = ranked([5, 3, 9, 1])
    order = np.arange(4)
    plan = selection_plan(rows, 3, RerankingConfig(mmr_lambda=0.5), **cat.kwargs())
    with pytest.raises(ValueError, match="MMR"):
        rerank_planned(plan, rows, scores, order)
    plan = selection_plan(rows, 3, RerankingConfig(), **cat.kwargs())
    with pytest.raises(ValueError, match="the plan's 4 entries"):
        rerank_planned(plan, rows[:3], scores[:3], order[:3])
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs a plan from selection_plan"):
        rerank_planned(replace(plan, k=-1), rows, scores, order)


@pytest.mark.parametrize("impl", ["native", "twin"])
def test_kernels_report_bad_indices_instead_of_reading_out_of_bounds(impl) -> None:
    from recsvc._fastpath import _reranking
    from recsvc._fastpath.twins import reranking as twin

    kernels = _reranking if impl == "native" else twin
    f32 = np.zeros(2, np.float32)
    cats = np.zeros(2, np.int32)
    with pytest.raises(IndexError, match="outside the candidate pool"):
        kernels.select_with_quotas(np.array([0, 2], np.int32), cats, 1, 2, np.zeros(1, np.int32), np.empty(2, np.int32))
    with pytest.raises(IndexError, match="outside the candidate pool or the embeddings"):
        kernels.mmr_select(
            f32, np.ones((2, 3), np.float32), np.array([0, 5], np.int32), 0.5, 1, cats, 0,
            np.zeros(1, np.int32), np.full(2, -np.inf, np.float32), np.empty((3, 2), np.float32),
            np.empty(3, np.float32), np.empty(2, np.uint8), np.empty(1, np.int32),
        )  # fmt: skip
