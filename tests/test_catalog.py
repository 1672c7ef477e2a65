import numpy as np
import pytest

from recsvc.catalog import Catalog, CatalogError, ItemRecord, demo_catalog
from recsvc.config import DemoCatalogConfig, IndexConfig
from recsvc.retrieval.ann import AnnIndex


def test_demo_catalog_is_deterministic_and_shaped(small_catalog):
    again = demo_catalog(DemoCatalogConfig(n_items=3000, dim=16, n_categories=20, n_topics=6, seed=7))
    np.testing.assert_array_equal(small_catalog.embeddings, again.embeddings)
    assert small_catalog.item_ids == again.item_ids
    assert small_catalog.n_categories == 20
    # unit norm (cosine space)
    norms = np.linalg.norm(small_catalog.embeddings[: small_catalog.n_rows], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # some maturity-rated items, Zipf-like popularity, a year of creation times
    assert (small_catalog.maturity[:3000] > 0).mean() > 0.05
    pop = np.sort(small_catalog.base_popularity[:3000])[::-1]
    assert pop[0] > 100 * pop[len(pop) // 2]
    span_days = np.ptp(small_catalog.created_at_ms[:3000]) / 86_400_000
    assert 300 < span_days <= 365


def test_demo_embeddings_cluster_by_category(small_catalog):
    e = small_catalog.embeddings[:3000]
    c = small_catalog.categories[:3000]
    sims = e[:300] @ e.T
    same = (c[:300, None] == c[None, :])
    assert sims[same].mean() > sims[~same].mean() + 0.2


def test_save_load_round_trip(tmp_path, small_catalog):
    rows = small_catalog.save(tmp_path / "cat")
    assert rows.size == 3000
    loaded = Catalog.load(tmp_path / "cat")
    assert loaded.item_ids == small_catalog.item_ids
    np.testing.assert_allclose(loaded.embeddings[:3000], small_catalog.embeddings[:3000], rtol=1e-6)
    assert loaded.category_names == small_catalog.category_names
    np.testing.assert_array_equal(loaded.maturity[:3000], small_catalog.maturity[:3000])
    assert loaded.version == small_catalog.version


def test_upsert_delete_and_tombstones(tmp_path):
    cat = Catalog(dim=4)
    rows, ins, upd = cat.upsert([ItemRecord("a", np.ones(4), "x"), ItemRecord("b", np.arange(1, 5), "y", 13)])
    assert (ins, upd) == (2, 0)
    rows2, ins, upd = cat.upsert([ItemRecord("a", -np.ones(4), "z")])
    assert (ins, upd) == (0, 1) and rows2[0] == rows[0]
    assert cat.category_names[cat.categories[rows[0]]] == "z"
    deleted, missing = cat.delete(["b", "nope"])
    assert missing == ["nope"] and not cat.alive[rows[1]]
    cat.upsert([ItemRecord("b", np.ones(4))])  # a re-added id gets a new row
    assert cat.row_of["b"] == 2
    cat.save(tmp_path / "c", compact=False)
    back = Catalog.load(tmp_path / "c")
    assert back.n_rows == 3 and back.row_of == {"a": 0, "b": 2} and not back.alive[1]
    cat.save(tmp_path / "d", compact=True)
    assert Catalog.load(tmp_path / "d").n_rows == 2


def test_bad_items_are_rejected_with_reasons():
    cat = Catalog(dim=3)
    with pytest.raises(CatalogError, match="embedding has 2 values"):
        cat.upsert([ItemRecord("a", np.ones(2))])
    with pytest.raises(CatalogError, match="all zeros"):
        cat.upsert([ItemRecord("a", np.zeros(3))])
    with pytest.raises(CatalogError, match="twice"):
        cat.upsert([ItemRecord("a", np.ones(3)), ItemRecord("a", np.ones(3))])
    with pytest.raises(CatalogError, match="must not be empty"):
        cat.upsert([ItemRecord("", np.ones(3))])


def test_load_reports_mismatched_files(tmp_path, small_catalog):
    small_catalog.save_jsonl(tmp_path / "c")
    (tmp_path / "c" / "items.jsonl").write_text('{"item_id": "x"}\n')
    with pytest.raises(CatalogError, match="has 1 items but embeddings.npy has 3000 rows"):
        Catalog.load(tmp_path / "c")
    with pytest.raises(CatalogError, match="no embeddings.npy"):
        Catalog.load(tmp_path / "missing")


def test_index_persists_and_reloads(tmp_path, small_catalog):
    cfg = IndexConfig(ef_construction=100)
    rows = small_catalog.alive_rows()
    ann = AnnIndex.build(small_catalog.embeddings, rows, cfg)
    ann.save(tmp_path, small_catalog.version)
    again = AnnIndex.load(tmp_path, small_catalog.dim, cfg, small_catalog.version)
    assert again is not None and again.live_count == 3000
    q = small_catalog.embeddings[5]
    np.testing.assert_array_equal(ann.query(q, 10)[0], again.query(q, 10)[0])
    # stale: another catalog version or other parameters -> rebuild
    assert AnnIndex.load(tmp_path, small_catalog.dim, cfg, "other") is None
    assert AnnIndex.load(tmp_path, small_catalog.dim, IndexConfig(m=32), small_catalog.version) is None


def test_live_index_upsert_delete_and_growth(small_catalog):
    cfg = IndexConfig(ef_construction=100)
    ann = AnnIndex.build(small_catalog.embeddings, np.arange(100, dtype=np.int32), cfg)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((500, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    new_rows = np.arange(100, 600, dtype=np.int32)
    ann.upsert(vecs, new_rows)  # grows past its capacity
    assert ann.live_count == 600
    rows, sims = ann.query(vecs[7], 1)
    assert rows[0] == 107 and sims[0] == pytest.approx(1.0, abs=1e-5)
    ann.delete(np.array([107], np.int32))
    assert 107 not in ann.query(vecs[7], 50)[0]
    # a new row reuses the deleted slot
    ann.upsert(vecs[7:8], np.array([600], np.int32))
    assert ann.query(vecs[7], 1)[0][0] == 600 and ann.live_count == 600
