"""The catalog's binary columns (issue 16): what a restart reads instead of parsing items.jsonl, the one-time
conversion of a JSON-lines catalog, and the start-up path around them (index load, popularity seeding)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import recsvc.catalog as catalog_mod
from recsvc.catalog import CONVERTED, Catalog, CatalogError, ItemRecord, RowIndex
from recsvc.config import IndexConfig
from recsvc.retrieval.ann import INDEX_LOCK, AnnIndex

COLUMN_NAMES = ["embeddings.npy", "categories.npy", "maturity.npy", "created_at_ms.npy", "popularity.npy",
                "alive.npy", "items.json", "id_index.npy"]


def _flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _assert_same(a: Catalog, b: Catalog) -> None:
    n = a.n_rows
    assert (b.n_rows, b.n_alive, b.version, b.dim) == (n, a.n_alive, a.version, a.dim)
    assert dict(b.row_of) == dict(a.row_of)
    assert b.category_names[: a.n_categories] == a.category_names
    np.testing.assert_array_equal(b.embeddings[:n], a.embeddings[:n])
    for name in ("maturity", "created_at_ms", "base_popularity", "alive"):
        np.testing.assert_array_equal(getattr(b, name)[:n], getattr(a, name)[:n])
    names = np.asarray(b.category_names, object)[b.categories[:n]]
    np.testing.assert_array_equal(names, np.asarray(a.category_names, object)[a.categories[:n]])
    assert b.attributes == a.attributes


def _with_changes() -> Catalog:
    """Tombstones, a reused id (its new row after the dead one), attributes, several categories."""
    rng = np.random.default_rng(0)
    cat = Catalog(dim=8)
    cat.upsert([ItemRecord(f"i{k}", rng.standard_normal(8), f"c{k % 3}", k % 19, 1_000 + k, float(k),
                           {"lang": "en"} if k % 4 == 0 else {}) for k in range(40)])
    cat.delete(["i3", "i7"])
    cat.upsert([ItemRecord("i3", rng.standard_normal(8), "new", 18, 5, 0.5, {"x": "y"})])
    return cat


def test_save_writes_binary_columns_and_load_reads_them_back(tmp_path):
    cat = _with_changes()
    cat.save(tmp_path / "c", compact=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(COLUMN_NAMES + ["catalog.json"])
    meta = json.loads((tmp_path / "c" / "catalog.json").read_text())
    assert meta["format_version"] == 2 and sorted(meta["files"]) == sorted(COLUMN_NAMES)
    back = Catalog.load(tmp_path / "c")
    _assert_same(cat, back)
    assert back.row_of["i3"] == 40 and not back.alive[3]  # the reused id: its new row, the old one dead
    # compact: dead rows gone, rows renumbered
    rows = cat.save(tmp_path / "d", compact=True)
    compact = Catalog.load(tmp_path / "d")
    assert compact.n_rows == rows.size == 39 and compact.alive[:39].all()
    assert [compact.item_ids[i] for i in range(39)] == [cat.item_ids[r] for r in rows]
    assert compact.attributes[compact.row_of["i3"]] == {"x": "y"}


def test_loaded_embeddings_are_mapped_copy_on_write(tmp_path, small_catalog):
    """The embeddings are served from the file's pages (not read into private memory), and a change writes
    only the process's copy of a page: the file keeps what was saved."""
    small_catalog.save(tmp_path / "c")
    before = (tmp_path / "c" / "embeddings.npy").read_bytes()
    cat = Catalog.load(tmp_path / "c")
    assert not cat.embeddings.flags.owndata and cat.embeddings.flags.writeable
    item = cat.item_ids[5]
    cat.upsert([ItemRecord(item, -cat.embeddings[5], "moved")])  # an update in place (no growth)
    assert cat.embeddings.shape[0] == 3000
    np.testing.assert_allclose(cat.embeddings[5], -small_catalog.embeddings[5], rtol=1e-6)
    assert (tmp_path / "c" / "embeddings.npy").read_bytes() == before
    cat.upsert([ItemRecord("brand-new", np.ones(16))])  # growth: the arrays become the process's own
    assert cat.embeddings.flags.owndata and cat.row_of["brand-new"] == 3000
    np.testing.assert_allclose(Catalog.load(tmp_path / "c").embeddings[5], small_catalog.embeddings[5])


def test_a_jsonl_catalog_is_converted_once_and_read_from_the_conversion(tmp_path, small_catalog, monkeypatch):
    """Every start parsed the whole items.jsonl (8.5 s of a 13-14 s restart at 1M items)."""
    d = tmp_path / "c"
    small_catalog.save_jsonl(d)
    source = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()}
    first = Catalog.load(d)
    assert (d / CONVERTED / "catalog.json").exists()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file()} == source

    def no_parsing(path):
        raise AssertionError(f"{path} parsed again")

    monkeypatch.setattr(catalog_mod, "_read_jsonl", no_parsing)
    second = Catalog.load(d)
    _assert_same(first, second)
    assert second.version == small_catalog.version


def test_a_changed_jsonl_catalog_is_converted_again(tmp_path, small_catalog):
    d = tmp_path / "c"
    small_catalog.save_jsonl(d)
    Catalog.load(d)
    lines = (d / "items.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["category"] = "edited"
    lines[0] = json.dumps(rec)
    (d / "items.jsonl").write_text("\n".join(lines) + "\n")
    (d / "catalog.json").unlink()  # edited by hand: no manifest
    cat = Catalog.load(d)
    assert cat.category_names[cat.categories[0]] == "edited"
    assert cat.version.startswith("content-")
    assert Catalog.load(d).version == cat.version  # (from the new conversion)


def test_a_damaged_conversion_is_converted_again(tmp_path, small_catalog, caplog):
    d = tmp_path / "c"
    small_catalog.save_jsonl(d)
    Catalog.load(d)
    _flip_one_byte(d / CONVERTED / "maturity.npy", 200)
    with caplog.at_level(logging.WARNING, "recsvc.catalog"):
        cat = Catalog.load(d)
    assert "maturity.npy" in caplog.text and "converting" in caplog.text
    np.testing.assert_array_equal(cat.maturity[:3000], small_catalog.maturity[:3000])
    assert json.loads((d / CONVERTED / "catalog.json").read_text())["files"]["maturity.npy"]["crc32"] \
        != "damaged"  # (rewritten)
    Catalog.load(d)  # and the new conversion reads back


def test_a_catalog_that_cannot_be_converted_is_still_served(tmp_path, small_catalog, caplog):
    d = tmp_path / "c"
    small_catalog.save_jsonl(d)
    (d / CONVERTED).write_text("not a directory")  # the conversion cannot be written
    with caplog.at_level(logging.WARNING, "recsvc.catalog"):
        cat = Catalog.load(d)
    assert cat.n_alive == 3000 and "parsed at every start" in caplog.text


@pytest.mark.parametrize("name", COLUMN_NAMES)
def test_one_changed_byte_in_a_column_file_is_refused_naming_it(tmp_path, small_catalog, name):
    small_catalog.save(tmp_path / "c")
    path = tmp_path / "c" / name
    _flip_one_byte(path, path.stat().st_size - 3)
    with pytest.raises(CatalogError, match=rf"{name}: checksum .* catalog.json"):
        Catalog.load(tmp_path / "c")


def test_column_files_that_disagree_are_refused_without_a_manifest(tmp_path, small_catalog):
    d = tmp_path / "c"
    small_catalog.save(d)
    meta = json.loads((d / "catalog.json").read_text())
    meta.pop("files")
    (d / "catalog.json").write_text(json.dumps(meta))
    np.save(d / "maturity.npy", np.zeros(10, np.int32))
    with pytest.raises(CatalogError, match=r"maturity.npy: must be int32\[3000\]"):
        Catalog.load(d)
    np.save(d / "maturity.npy", small_catalog.maturity[:3000])
    meta["count"] = 10
    (d / "catalog.json").write_text(json.dumps(meta))
    with pytest.raises(CatalogError, match=r"catalog.json: count is 10 but embeddings.npy has 3000"):
        Catalog.load(d)


def test_catalog_changes_persist_in_the_binary_format_through_a_restart(tmp_path, clock):
    from conftest import small_config
    from recsvc.engine import Engine, ItemIn

    cfg = small_config(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    eng.upsert_items([ItemIn("live-1", np.ones(16).tolist(), "fresh-cat", created_at_ms=clock() - 5)])
    gone = eng.catalog.item_ids[7]
    eng.delete_items([gone])
    eng.close()  # the shutdown snapshot carries the catalog
    (snap,) = (Path(cfg.state.dir) / "snapshots").glob("snap-*")
    meta = json.loads((snap / "catalog" / "catalog.json").read_text())
    assert meta["format_version"] == 2 and not (snap / "catalog" / "items.jsonl").exists()
    again = Engine.from_config(cfg, clock=clock)
    assert again.catalog.row_of["live-1"] == 3000 and gone not in again.catalog.row_of
    assert again.catalog.category_names[again.catalog.categories[3000]] == "fresh-cat"
    again.close(snapshot=False)


def test_a_state_directory_with_a_jsonl_snapshot_catalog_still_starts(tmp_path, clock):
    """Snapshots written before the binary columns hold items.jsonl: they load (twice: the conversion
    beside them is not in the snapshot's manifest, which still verifies)."""
    import shutil

    from conftest import small_config
    from recsvc._files import checksum
    from recsvc.engine import Engine, ItemIn

    cfg = small_config(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    eng.upsert_items([ItemIn("live-1", np.ones(16).tolist(), "c", created_at_ms=clock() - 5)])
    eng.close()
    (snap,) = (Path(cfg.state.dir) / "snapshots").glob("snap-*")
    old = Catalog.load(snap / "catalog")
    for p in (snap / "catalog").iterdir():
        if not p.name.startswith("index"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
    old.save_jsonl(snap / "catalog", compact=False)
    done = json.loads((snap / "DONE").read_text())
    done["files"] = {rel: e for rel, e in done["files"].items() if not rel.startswith("catalog/")}
    for name in ("embeddings.npy", "items.jsonl", "catalog.json"):
        done["files"][f"catalog/{name}"] = checksum(snap / "catalog" / name)
    (snap / "DONE").write_text(json.dumps(done))
    for _ in range(2):
        eng = Engine.from_config(cfg, clock=clock)
        assert eng.catalog.row_of["live-1"] == 3000
        eng.close(snapshot=False)


def test_a_load_does_not_wait_for_another_processes_load_of_a_laid_out_index(tmp_path, small_catalog):
    """Each load took the directory's exclusive lock to see whether the index needed laying out, so it
    waited for any other load holding the shared lock (workers starting together loaded one by one)."""
    cfg = IndexConfig(ef_construction=50, reorder=True)
    ann = AnnIndex.build(small_catalog.embeddings[:3000], small_catalog.alive_rows(), cfg)
    ann.save(tmp_path, "v")
    assert AnnIndex.load(tmp_path, 16, cfg, "v").layout == "clustered"  # (laid out by this first load)
    fd = os.open(tmp_path / INDEX_LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # another process, loading
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(AnnIndex.load(tmp_path, 16, cfg, "v")), daemon=True)
        t.start()
        t.join(timeout=20)
        assert got and got[0] is not None and got[0].live_count == 3000
    finally:
        os.close(fd)


def test_an_index_loads_with_the_catalogs_dead_rows_deleted(tmp_path, small_catalog):
    cfg = IndexConfig(ef_construction=50)
    ann = AnnIndex.build(small_catalog.embeddings[:3000], small_catalog.alive_rows(), cfg)
    ann.save(tmp_path, "v")
    alive = np.ones(3000, bool)
    alive[[0, 5, 2999]] = False
    loaded = AnnIndex.load(tmp_path, 16, cfg, "v", alive=alive)
    assert loaded.live_count == 2997
    rows, _ = loaded.query(small_catalog.embeddings[5], 50)
    assert 5 not in rows and 0 not in rows and rows.size == 50


def test_popularity_seeded_in_blocks_equals_one_call(tmp_path, clock):
    """recover seeds popularity in one call (a sort-based merge; np.union1d over a million rows took ~0.7 s);
    seeding the same counts again in blocks, each merged into the top list, keeps the same top list."""
    from conftest import small_config
    from recsvc.engine import Engine

    eng = Engine.from_config(small_config(tmp_path), clock=clock)
    tops = [np.array(eng.state.top_popular())]
    rows = eng.catalog.alive_rows()
    model = eng.feedback_path.state
    for start in range(0, rows.size, 256):  # every row's popularity doubles: the order cannot change
        block = rows[start:start + 256]
        model.seed_popularity(block, eng.catalog.base_popularity[block], clock.now_ms)
    tops.append(np.array(eng.state.top_popular()))
    eng.close(snapshot=False)
    assert tops[0].size == 1000
    np.testing.assert_array_equal(tops[0], tops[1])


@pytest.mark.parametrize("collide", [False, True])
def test_the_row_index_of_a_loaded_catalog_behaves_like_the_dict(tmp_path, monkeypatch, collide):
    """id -> row after a load is a binary search over id_index.npy plus the changes since: the same answers
    as a dict through inserts, deletes, re-inserts and unknown ids (and with every id hash colliding)."""
    if collide:  # three hash values for all ids: every lookup walks a run of equal hashes
        monkeypatch.setattr(catalog_mod, "id_hash", lambda item_id: len(item_id) % 3)
    cat = _with_changes()
    cat.save(tmp_path / "c", compact=False)
    back = Catalog.load(tmp_path / "c")
    assert isinstance(back.row_of, RowIndex)
    want = dict(cat.row_of)
    rng = np.random.default_rng(1)
    for step in range(300):
        item = f"i{rng.integers(0, 60)}"
        if rng.random() < 0.5:
            rows, _, _ = back.upsert([ItemRecord(item, rng.standard_normal(8))])
            want.setdefault(item, int(rows[0]))
        else:
            back.delete([item])
            want.pop(item, None)
        assert back.row_of.get(item) == want.get(item) and (item in back.row_of) == (item in want)
    assert dict(back.row_of) == want and len(back.row_of) == len(want) == back.n_alive
    for unknown in ("nope", "", "\x00deleted:3", "i1 "):
        assert back.row_of.get(unknown) is None and unknown not in back.row_of
    with pytest.raises(KeyError):
        back.row_of["nope"]
    back.save(tmp_path / "again", compact=False)
    assert dict(Catalog.load(tmp_path / "again").row_of) == want


def test_the_index_checksum_computed_ahead_is_used_only_for_the_same_file(tmp_path, small_catalog, monkeypatch):
    """load_catalog_and_index checksums index.bin on a thread while the catalog is read: the load uses that
    result (no second read), unless the file changed since (then it reads it again and finds the damage)."""
    import recsvc.retrieval.ann as ann_mod

    cfg = IndexConfig(ef_construction=50, reorder=False)  # (a reorder would replace the file)
    AnnIndex.build(small_catalog.embeddings[:3000], small_catalog.alive_rows(), cfg).save(tmp_path, "v")
    calls = []
    real = ann_mod.checksum
    monkeypatch.setattr(ann_mod, "checksum", lambda path: calls.append(path) or real(path))
    ann_mod.checksum_ahead(tmp_path)
    assert AnnIndex.load(tmp_path, 16, cfg, "v") is not None
    assert len(calls) == 1  # the one computed ahead
    ann_mod.checksum_ahead(tmp_path)
    ann_mod._AHEAD[next(iter(ann_mod._AHEAD))][0].join()  # (computed before the change below)
    path = tmp_path / "index.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.utime(path, ns=(1, 1))  # (a different mtime whatever the clock's resolution)
    path.write_bytes(bytes(data))
    assert AnnIndex.load(tmp_path, 16, cfg, "v") is None  # damaged: rebuilt by the caller
