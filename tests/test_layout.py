"""Cluster-order layout of a saved HNSW index: the same graph, renamed nodes, identical answers."""

from __future__ import annotations

import json

import hnswlib
import numpy as np
import pytest

from recsvc.config import IndexConfig
from recsvc.retrieval import layout
from recsvc.retrieval.ann import INDEX_META, AnnIndex


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    x = centres[rng.integers(12, size=n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def saved_index(tmp_path, space: str, m: int, dim: int, n: int = 3000, deleted: int = 40):
    emb = clustered(n, dim)
    index = hnswlib.Index(space=space, dim=dim)
    index.init_index(max_elements=n + 500, M=m, ef_construction=60, random_seed=5, allow_replace_deleted=True)
    index.add_items(emb, np.arange(n) * 7 + 3, num_threads=1)  # labels are not ids
    for label in np.arange(deleted) * 7 + 3:
        index.mark_deleted(int(label))
    path = tmp_path / "index.bin"
    index.save_index(str(path))
    return emb, path


def load(path, space, dim) -> hnswlib.Index:
    index = hnswlib.Index(space=space, dim=dim)
    index.load_index(str(path), allow_replace_deleted=True)
    index.set_ef(120)
    return index


@pytest.mark.parametrize("space, m, dim", [("cosine", 16, 16), ("ip", 8, 24), ("l2", 24, 8)])
def test_the_reordered_index_answers_exactly_as_before(tmp_path, space, m, dim):
    emb, path = saved_index(tmp_path, space, m, dim)
    before = load(path, space, dim)
    order = layout.reorder_index_file(path, dim)
    after = load(path, space, dim)
    assert sorted(order.tolist()) == list(range(3000))
    assert sorted(after.get_ids_list()) == sorted(before.get_ids_list())
    assert after.element_count == before.element_count and after.get_max_elements() == 3500
    queries = clustered(60, dim, seed=1)
    want_l, want_d = before.knn_query(queries, k=50)
    got_l, got_d = after.knn_query(queries, k=50)
    np.testing.assert_array_equal(got_l, want_l)  # deleted items stay deleted too
    np.testing.assert_allclose(got_d, want_d, rtol=1e-6)
    assert not np.isin(got_l, np.arange(40) * 7 + 3).any()
    # the stored vectors moved with their labels
    labels = np.arange(100, 200) * 7 + 3
    np.testing.assert_allclose(after.get_items(labels), before.get_items(labels), rtol=1e-6)
    # and the renamed graph still takes live changes
    after.add_items(clustered(5, dim, seed=2), np.arange(5) + 10**6, replace_deleted=True)
    assert after.knn_query(clustered(1, dim, seed=2), k=1)[0][0, 0] == 10**6


def test_the_reordered_file_is_the_same_graph_renamed(tmp_path):
    """Node by node: vector, label, deleted mark, level and every link, mapped through the permutation."""
    emb, path = saved_index(tmp_path, "cosine", 8, 16)
    (h0, l0_old, up_old) = layout._read(path, 16)
    order = layout.reorder_index_file(path, 16)
    (h1, l0_new, up_new) = layout._read(path, 16)
    new_id = np.empty(order.size, np.int64)
    new_id[order] = np.arange(order.size)
    max_m0, max_m, ep = h0[9], h0[8], h0[7]
    assert h1[:7] == h0[:7] and h1[8:] == h0[8:] and h1[7] == new_id[ep]
    links = 4 * (max_m0 + 1)
    for old in range(order.size):
        a, b = l0_old[old], l0_new[new_id[old]]
        assert bytes(a[links:]) == bytes(b[links:])  # vector and label
        la, lb = a[:links].view(np.uint32), b[:links].view(np.uint32)
        assert la[0] == lb[0]  # count and deleted mark
        cnt = la[0] & 0xFFFF
        assert lb[1:1 + cnt].tolist() == new_id[la[1:1 + cnt]].tolist()
        ua, ub = (np.frombuffer(x, np.uint32).reshape(-1, max_m + 1) for x in (up_old[old], up_new[new_id[old]]))
        assert ua.shape == ub.shape  # the same levels
        for row_a, row_b in zip(ua, ub):
            c = row_a[0] & 0xFFFF
            assert row_a[0] == row_b[0] and row_b[1:1 + c].tolist() == new_id[row_a[1:1 + c]].tolist()


@pytest.mark.parametrize("n, capacity", [(0, 10), (1, 1), (200, 200)])
def test_empty_tiny_and_full_indexes(tmp_path, n, capacity):
    index = hnswlib.Index(space="ip", dim=8)
    index.init_index(max_elements=capacity, M=8, ef_construction=40, random_seed=1)
    if n:
        index.add_items(clustered(n, 8), np.arange(n), num_threads=1)
    path = tmp_path / "index.bin"
    index.save_index(str(path))
    before = load(path, "ip", 8)
    layout.reorder_index_file(path, 8)
    again = load(path, "ip", 8)
    assert again.element_count == before.element_count == n
    assert again.get_max_elements() == before.get_max_elements()
    if n:
        np.testing.assert_array_equal(again.knn_query(clustered(5, 8, 1), k=min(n, 5))[0],
                                      before.knn_query(clustered(5, 8, 1), k=min(n, 5))[0])


def test_cluster_order_puts_similar_vectors_next_to_each_other():
    emb = clustered(5000, 16)
    order = layout.cluster_order(emb)
    assert sorted(order.tolist()) == list(range(5000))
    neighbours = np.sum(emb[order[1:]] * emb[order[:-1]], axis=1).mean()
    shuffled = np.sum(emb[1:] * emb[:-1], axis=1).mean()
    assert neighbours > 0.6 and shuffled < 0.2


@pytest.mark.parametrize("damage", ["truncated", "trailing bytes", "not an index"])
def test_a_file_it_does_not_recognise_is_left_alone(tmp_path, damage):
    _, path = saved_index(tmp_path, "cosine", 16, 16)
    data = path.read_bytes()
    data = {"truncated": data[:-100], "trailing bytes": data + b"\0" * 8, "not an index": b"\1" * 500}[damage]
    path.write_bytes(data)
    with pytest.raises(layout.IndexFileError):
        layout.reorder_index_file(path, 16)
    assert path.read_bytes() == data and list(tmp_path.iterdir()) == [path]


def test_ann_index_load_reorders_once_and_records_it(tmp_path, monkeypatch):
    emb = clustered(2000, 16)
    cfg = IndexConfig(ef_construction=50, build_threads=1)
    built = AnnIndex.build(emb, np.arange(2000, dtype=np.int32), cfg)
    built.save(tmp_path, "v1")
    assert json.loads((tmp_path / INDEX_META).read_text())["layout"] == "insertion"
    calls = []
    real = layout.reorder_index_file
    monkeypatch.setattr("recsvc.retrieval.ann.reorder_index_file", lambda *a: calls.append(a) or real(*a))
    first = AnnIndex.load(tmp_path, 16, cfg, "v1")
    assert first.layout == "clustered" and len(calls) == 1
    assert json.loads((tmp_path / INDEX_META).read_text())["layout"] == "clustered"
    for q in clustered(20, 16, seed=3):
        np.testing.assert_array_equal(first.query(q, 30)[0], built.query(q, 30)[0])
    # a second load, and a save of the loaded index (a snapshot), keep the layout without redoing it
    first.save(tmp_path / "snap", "v1")
    again = AnnIndex.load(tmp_path / "snap", 16, cfg, "v1")
    assert again.layout == "clustered" and len(calls) == 1
    # reorder = false leaves a file as it is
    built.save(tmp_path / "plain", "v1")
    plain = AnnIndex.load(tmp_path / "plain", 16, cfg.model_copy(update={"reorder": False}), "v1")
    assert plain.layout == "insertion" and len(calls) == 1


def test_a_failed_or_refused_reorder_still_loads_and_is_not_retried_forever(tmp_path, monkeypatch):
    emb = clustered(500, 16)
    cfg = IndexConfig(ef_construction=50, build_threads=1)
    AnnIndex.build(emb, np.arange(500, dtype=np.int32), cfg).save(tmp_path, "v1")
    calls = []

    def refuse(*_):
        calls.append(1)
        raise PermissionError("read-only file system")

    monkeypatch.setattr("recsvc.retrieval.ann.reorder_index_file", refuse)
    ann = AnnIndex.load(tmp_path, 16, cfg, "v1")
    assert ann is not None and ann.layout == "insertion" and len(calls) == 1
    assert json.loads((tmp_path / INDEX_META).read_text())["layout"] == "insertion"  # may be retried

    def unrecognised(*_):
        calls.append(1)
        raise layout.IndexFileError("unexpected header")

    monkeypatch.setattr("recsvc.retrieval.ann.reorder_index_file", unrecognised)
    assert AnnIndex.load(tmp_path, 16, cfg, "v1").layout == "insertion" and len(calls) == 2
    assert json.loads((tmp_path / INDEX_META).read_text())["layout"] == "unrecognised"
    assert AnnIndex.load(tmp_path, 16, cfg, "v1") is not None and len(calls) == 2  # not again

    # a reorder that died half-way (the mark is still there) is not retried at every start
    meta = json.loads((tmp_path / INDEX_META).read_text())
    (tmp_path / INDEX_META).write_text(json.dumps({**meta, "layout": "reordering"}))
    assert AnnIndex.load(tmp_path, 16, cfg, "v1") is not None and len(calls) == 2


def test_a_grown_index_is_laid_out_again_after_its_next_save(tmp_path):
    cfg = IndexConfig(ef_construction=50, build_threads=1)
    AnnIndex.build(clustered(1000, 16), np.arange(1000, dtype=np.int32), cfg).save(tmp_path, "v1")
    ann = AnnIndex.load(tmp_path, 16, cfg, "v1")
    assert ann.layout == "clustered"
    ann.upsert(clustered(50, 16, seed=4), np.arange(1000, 1050, dtype=np.int32))
    ann.save(tmp_path / "a", "v1")  # 5% more: still counted as laid out
    assert json.loads((tmp_path / "a" / INDEX_META).read_text())["layout"] == "clustered"
    ann.upsert(clustered(100, 16, seed=5), np.arange(1050, 1150, dtype=np.int32))
    ann.save(tmp_path / "b", "v1")  # 15% more
    assert json.loads((tmp_path / "b" / INDEX_META).read_text())["layout"] == "insertion"
    again = AnnIndex.load(tmp_path / "b", 16, cfg, "v1")
    assert again.layout == "clustered" and again.live_count == 1150
    np.testing.assert_array_equal(again.query(clustered(1, 16, seed=5)[0], 5)[0],
                                  ann.query(clustered(1, 16, seed=5)[0], 5)[0])
    assert not [p.name for p in (tmp_path / "b").iterdir() if p.name.endswith((".tmp", ".reorder"))]
