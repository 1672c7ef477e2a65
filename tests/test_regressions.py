"""Regression tests, each named after what broke (found in review)."""

import numpy as np
import pytest

from recsvc.catalog import Catalog, ItemRecord
from recsvc.engine import Engine, FeedbackEventIn, ItemIn, RecommendQuery
from recsvc.errors import FailedPrecondition, InvalidArgument
from recsvc.retrieval.sources import RowFilter

from conftest import small_config


def test_live_catalog_survives_a_second_restart(tmp_path, clock):
    """A snapshot after a restart dropped the live catalog (its change counter restarted at 0)."""
    cfg = small_config(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    v = np.ones(eng.catalog.dim, np.float32)
    eng.upsert_items([ItemIn("new-1", v.tolist(), "c")])
    eng.feedback([FeedbackEventIn("e1", "u", "new-1", "click")])
    eng.close()  # snapshot with the catalog
    for _ in range(3):  # restart, snapshot again without changes, restart ...
        eng = Engine.from_config(cfg, clock=clock)
        assert "new-1" in eng.catalog.row_of
        assert len(eng.recommend(RecommendQuery(user_id="u2", n=5)).items) == 5
        eng.feedback([FeedbackEventIn(f"e-{clock()}", "u3", "new-1", "click")])
        clock.advance(1)
        eng.close()


@pytest.mark.parametrize("items, match", [
    ([ItemIn("dup", [1.0] * 16), ItemIn("dup", [2.0] * 16)], "appears twice"),
    ([ItemIn("zero", [0.0] * 16)], "finite, non-zero"),
    ([ItemIn("overflow", [1e39] * 16)], "float32 range"),
    ([ItemIn("\x00deleted:1", [1.0] * 16)], "NUL"),
    ([ItemIn("big-maturity", [1.0] * 16, maturity=2**40)], "maturity"),
])
def test_rejected_upsert_never_reaches_the_log(tmp_path, clock, items, match):
    """A rejected upsert used to be logged first and then crash every restart on replay."""
    cfg = small_config(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    lsn = eng.store.lsn
    with pytest.raises(InvalidArgument, match=match):
        eng.upsert_items(items)
    assert eng.store.lsn == lsn
    eng.close(snapshot=False)
    Engine.from_config(cfg, clock=clock).close(snapshot=False)  # starts fine


def test_huge_embedding_keeps_its_direction(tmp_path, clock):
    """float32 norms overflowed to inf and the item was stored as a zero vector."""
    eng = Engine.from_config(small_config(tmp_path), clock=clock)
    big = np.zeros(16)
    big[3] = 1e20
    eng.upsert_items([ItemIn("big", big.tolist())])
    stored = eng.catalog.embeddings[eng.catalog.row_of["big"]]
    assert stored[3] == pytest.approx(1.0)
    eng.upsert_items([ItemIn("tiny", [1e-30] * 16)])  # underflowed to a zero norm in float32
    assert np.linalg.norm(eng.catalog.embeddings[eng.catalog.row_of["tiny"]]) == pytest.approx(1.0)
    eng.close(snapshot=False)


def test_category_created_during_a_filtered_request():
    """Category masks sized at request start raised IndexError for a brand-new category code."""
    cat = Catalog(dim=2)
    cat.upsert([ItemRecord("a", np.ones(2), "old")])
    flt = RowFilter(np.array([True]), np.array([False]), 18, np.empty(0, np.int32))
    cat.upsert([ItemRecord("b", np.ones(2), "brand-new")])  # code 1, beyond the masks
    ok = flt.eligible(cat, np.array([0, 1], np.int32))
    assert ok.tolist() == [True, False]


def test_unknown_allowed_categories_are_invalid_argument(engine):
    with pytest.raises(InvalidArgument, match="none of \\['no-such-category'\\] is a category"):
        engine.recommend(RecommendQuery(user_id="u", allowed_categories=["no-such-category"]))


def test_broken_ranker_file_refuses_reload_and_keeps_serving(tmp_path, clock):
    from recsvc.ranking import Ranker

    path = tmp_path / "r.json"
    Ranker.default().save(path)
    eng = Engine.from_config(small_config(tmp_path, ranking={"model_path": str(path)}), clock=clock)
    assert len(eng.recommend(RecommendQuery(user_id="u", n=3)).items) == 3
    path.write_text("{not json")
    with pytest.raises(FailedPrecondition, match="reload refused"):
        eng.reload_ranker()
    assert len(eng.recommend(RecommendQuery(user_id="u", n=3)).items) == 3
    eng.close(snapshot=False)


def test_catalog_without_catalog_json_reuses_its_index(tmp_path, small_catalog, clock):
    """A random version per load made the index look stale on every start."""
    small_catalog.save_jsonl(tmp_path / "cat")
    (tmp_path / "cat" / "catalog.json").unlink()
    first = Catalog.load(tmp_path / "cat")
    second = Catalog.load(tmp_path / "cat")
    assert first.version == second.version and first.version.startswith("content-")


def test_in_process_feedback_refuses_empty_and_unusable_batches_like_grpc(engine):
    """The empty/all-rejected policy lived in the gRPC servicer: in-process callers got OK with nothing done."""
    from recsvc.feedback import FeedbackRejected

    with pytest.raises(InvalidArgument, match="events must not be empty"):
        engine.feedback([])
    with pytest.raises(FeedbackRejected, match=r"no event accepted: events\[0\]: unknown item_id") as err:
        engine.feedback([FeedbackEventIn("e1", "u", "no-such-item", "click"),
                         FeedbackEventIn("e2", "u", "no-such-item", "like")])
    assert [r.index for r in err.value.result.rejected] == [0, 1]
    assert "unknown event type 'like'" in err.value.result.rejected[1].reason


def test_served_log_reader_applies_the_attribution_window(tmp_path, clock):
    """The read-only served-log reader (train-ranker, ope) counted clicks that came after the attribution
    window, which the live state ignores: training saw successes the bandit never did."""
    from recsvc.state.served_log import read_served_impressions

    cfg = small_config(tmp_path, exploration={"policy": "greedy"})
    eng = Engine.from_config(cfg, clock=clock)
    window_ms = int(cfg.state.attribution_window_s * 1000)
    rec = eng.recommend(RecommendQuery(user_id="w", n=3))
    a, b = rec.items[0].item_id, rec.items[1].item_id
    eng.feedback([FeedbackEventIn("i-a", "w", a, "impression", request_id=rec.request_id),
                  FeedbackEventIn("i-b", "w", b, "impression", request_id=rec.request_id)])
    clock.advance(window_ms + 1)
    eng.feedback([FeedbackEventIn("late", "w", a, "click", request_id=rec.request_id)])
    clock.advance(-window_ms)
    eng.feedback([FeedbackEventIn("in-time", "w", b, "click", request_id=rec.request_id,
                                  timestamp_ms=clock() + 10)])
    rows = np.array([eng.catalog.row_of[a], eng.catalog.row_of[b]])
    assert eng.state.bandit_evidence(rows)[0].tolist() == [0.0, 1.0]  # the live state: a late, b in time
    imp = read_served_impressions(cfg.state.dir, cfg.state.attribution_window_s)
    clicked = dict(zip(imp.rows.tolist(), imp.clicked.tolist()))
    assert clicked == {int(rows[0]): 0.0, int(rows[1]): 1.0}
    eng.close(snapshot=False)
