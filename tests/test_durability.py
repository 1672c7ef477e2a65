"""Durability regressions (issue 13): damaged or missing state files must refuse to start, never lose
acknowledged events silently; files read at start are verified; snapshots never stall ingestion.

Each test is named after what broke. They use real files, real fsync and, where the failure was a crash
or a killed process, real processes.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from recsvc.state.store import LocalStateStore

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a crash there cannot take the test runner down)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


def tmp_snapshot_dirs(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "snapshots").glob(".tmp-snap-*"))


# -- item 4: temporary snapshot directories --------------------------------------------------------------
def test_tmp_snapshot_left_by_sigkill_is_removed_at_start(tmp_path):
    """A SIGKILL during a snapshot left its .tmp-snap-* directory behind for ever (8-9 MB each)."""
    script = textwrap.dedent(f"""
        import sys, time
        from recsvc.state.store import LocalStateStore
        store = LocalStateStore({str(tmp_path)!r})
        store.append([{{"t": "a"}}], durable=True)
        def write(d):
            (d / "online.json").write_bytes(b"x" * 100_000)
            print("writing", flush=True)
            time.sleep(60)
        store.write_snapshot(1, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert len(tmp_snapshot_dirs(tmp_path)) == 1  # what the killed process left
    store = LocalStateStore(tmp_path)
    assert tmp_snapshot_dirs(tmp_path) == []
    assert [r["t"] for r in store.replay(0)] == ["a"]
    store.close()


def test_failed_snapshot_removes_its_temporary_directory(tmp_path):
    """A snapshot that failed (a full disk) kept its .tmp-snap-* directory and ate the space the
    operator had freed."""
    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}], durable=True)

    def disk_full(d):
        (d / "online.json").write_bytes(b"x" * 100_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.write_snapshot(1, disk_full)
    assert tmp_snapshot_dirs(tmp_path) == []
    assert store.latest_snapshot() == (0, None)
    assert store.append([{"t": "b"}], durable=True) == 2
    store.close()
    assert [r["t"] for r in LocalStateStore(tmp_path).replay(0)] == ["a", "b"]


# -- item 1: damage inside the newest log segment --------------------------------------------------------
def _log_with_records(state_dir: Path, n: int = 1000) -> Path:
    """A state directory whose only (newest) segment holds ``n`` acknowledged records; its path."""
    store = LocalStateStore(state_dir)
    for i in range(0, n, 10):
        store.append([{"t": "fb", "i": j, "pad": "x" * 40} for j in range(i, i + 10)], durable=True)
    store.close()
    (seg,) = state_dir.glob("log-*.jsonl")
    return seg


def _record_starts(seg: Path) -> list[int]:
    data = seg.read_bytes()
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        pos = data.index(b"\n", pos) + 1
    return starts


@pytest.mark.parametrize("damage", ["flipped byte", "4 KiB of zeros"])
def test_damage_mid_newest_segment_refuses_instead_of_truncating(tmp_path, damage):
    """A flipped byte or 4 KiB of zeros in the middle of the newest segment truncated it at the bad
    record with only an INFO line: every acknowledged event after it was gone."""
    from recsvc.state.store import LogCorrupted

    seg = _log_with_records(tmp_path)
    starts = _record_starts(seg)
    data = bytearray(seg.read_bytes())
    bad = starts[400]
    if damage == "flipped byte":
        data[bad + 20] ^= 0x01
        follow = 599
    else:
        data[bad + 5: bad + 5 + 4096] = bytes(4096)
        end = bad + 5 + 4096
        follow = sum(1 for s in starts if s > end)  # the record the zeros end in is damaged too
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted) as err:
        LocalStateStore(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{seg}: damaged record at byte {bad}" in msg
    assert f"{follow} valid records follow" in msg
    assert "--accept-loss" in msg and "RECSVC_ACCEPT_LOSS=1" in msg
    assert seg.read_bytes() == bytes(data), "a refused start must not change the log"


def test_refused_start_releases_the_directory_lock(tmp_path):
    """A store that refused to open kept its flock: the same process could not open it again."""
    from recsvc.state.store import LogCorrupted

    seg = _log_with_records(tmp_path, 50)
    data = bytearray(seg.read_bytes())
    data[_record_starts(seg)[10] + 3] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted):
        LocalStateStore(tmp_path)
    LocalStateStore(tmp_path, accept_loss=True).close()


def test_accepting_the_damage_keeps_every_valid_record(tmp_path, caplog):
    """The way forward after a refusal: --accept-loss drops the damaged record only, keeps a copy of the
    damaged file, and later starts need no switch."""
    seg = _log_with_records(tmp_path)
    data = bytearray(seg.read_bytes())
    data[_record_starts(seg)[400] + 20] ^= 0x01
    seg.write_bytes(bytes(data))
    store = LocalStateStore(tmp_path, accept_loss=True)
    assert [r["i"] for r in store.replay(0)] == [i for i in range(1000) if i != 400]
    assert store.lsn == 1000
    assert "accepted the loss" in caplog.text and str(seg) in caplog.text
    assert (seg.parent / (seg.name + ".damaged")).read_bytes() == bytes(data)
    assert store.append([{"t": "fb", "i": 1000}], durable=True) == 1001
    store.close()
    again = LocalStateStore(tmp_path)  # no switch needed: the loss was accepted once
    assert [r["i"] for r in again.replay(0)][-2:] == [999, 1000]
    again.close()


def test_torn_last_record_is_still_truncated_without_a_switch(tmp_path):
    seg = _log_with_records(tmp_path, 100)
    with seg.open("ab") as fh:
        fh.write(b"00000000 " + bytes(4096))  # a crash mid-write: garbage, nothing valid after it
    store = LocalStateStore(tmp_path)
    assert store.lsn == 100 and len(list(store.replay(0))) == 100
    store.close()


def test_accept_loss_environment_variable(tmp_path, monkeypatch):
    seg = _log_with_records(tmp_path, 50)
    data = bytearray(seg.read_bytes())
    data[_record_starts(seg)[10] + 3] ^= 0x01
    seg.write_bytes(bytes(data))
    monkeypatch.setenv("RECSVC_ACCEPT_LOSS", "1")
    store = LocalStateStore(tmp_path)
    assert len(list(store.replay(0))) == 49
    store.close()


# -- item 2: gaps in the log sequence ----------------------------------------------------------------
def _engine_cfg(tmp_path, **overrides):
    """The tests' small config, with the demo catalog and its index built once per session."""
    from conftest import small_config
    from recsvc.config import deep_merge

    shared = {"catalog": {"cache_dir": str(tmp_path.parent / "durability-demo-cache")}}
    return small_config(tmp_path, **deep_merge(shared, overrides))


def _feed(eng, first: int, n: int, clock) -> None:
    from recsvc.engine import FeedbackEventIn

    items = eng.catalog.item_ids
    for i in range(first, first + n):
        eng.feedback([FeedbackEventIn(f"ev-{i}", f"u{i % 7}", items[i % 50], "click")])
        clock.advance(1)


def _state_with_snapshot(tmp_path, clock):
    """40 acknowledged events: 20 in a snapshot (their segment pruned), 20 in the log after it."""
    from recsvc.engine import Engine

    cfg = _engine_cfg(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    _feed(eng, 0, 20, clock)
    eng.snapshot()
    _feed(eng, 20, 20, clock)
    eng.close(snapshot=False)
    state = Path(cfg.state.dir)
    (snap,) = (state / "snapshots").glob("snap-*")
    assert [p.name for p in sorted(state.glob("log-*.jsonl"))][0] == "log-000000000021.jsonl"
    return cfg, state, snap


@pytest.mark.parametrize("removed", ["DONE marker", "snapshot directory"])
def test_removed_snapshot_refuses_instead_of_starting_from_an_older_base(tmp_path, clock, removed):
    """Without its snapshot (or its DONE marker) the server started from nothing and replayed only the log
    after it: the 20 events the snapshot held were silently gone."""
    import shutil

    from recsvc.engine import Engine
    from recsvc.state.store import LogCorrupted

    cfg, state, snap = _state_with_snapshot(tmp_path, clock)
    if removed == "DONE marker":
        (snap / "DONE").unlink()
    else:
        shutil.rmtree(snap)
    with pytest.raises(LogCorrupted) as err:
        Engine.from_config(cfg, clock=clock)
    msg = str(err.value)
    assert "records 1..20 are missing" in msg and "log-000000000021.jsonl" in msg
    if removed == "DONE marker":
        assert f"{snap.name} has no DONE marker" in msg
    assert "--accept-loss" in msg and "\n" not in msg


def test_deleted_older_segment_refuses(tmp_path, clock):
    """A deleted older log segment made the server start without its events (and catalog changes)."""
    from recsvc.engine import Engine
    from recsvc.state.store import LogCorrupted

    cfg = _engine_cfg(tmp_path)
    for first in (0, 20, 40):  # three runs, three segments
        eng = Engine.from_config(cfg, clock=clock)
        _feed(eng, first, 20, clock)
        eng.close(snapshot=False)
    state = Path(cfg.state.dir)
    segs = sorted(state.glob("log-*.jsonl"))
    assert [p.name for p in segs] == ["log-000000000001.jsonl", "log-000000000021.jsonl",
                                      "log-000000000041.jsonl"]
    segs[1].unlink()
    with pytest.raises(LogCorrupted, match=r"log-000000000041.jsonl: starts at lsn 41 but the log before it "
                                           r"ends at lsn 20: records 21..40 are missing"):
        Engine.from_config(cfg, clock=clock)


def test_accepted_gap_starts_with_what_is_left(tmp_path, clock, monkeypatch):
    from recsvc.engine import Engine

    cfg, state, snap = _state_with_snapshot(tmp_path, clock)
    (snap / "DONE").unlink()
    monkeypatch.setenv("RECSVC_ACCEPT_LOSS", "1")
    eng = Engine.from_config(cfg, clock=clock)
    assert int(eng.state.interaction_counts(eng.catalog.alive_rows()).sum()) == 20  # the 20 after the gap
    eng.close(snapshot=False)
    monkeypatch.delenv("RECSVC_ACCEPT_LOSS")
    Engine.from_config(cfg, clock=clock).close(snapshot=False)  # accepted once, not every start


def test_snapshot_without_done_is_ignored_when_the_log_still_covers_it(tmp_path, clock):
    """No gap, no refusal: a snapshot that lost its DONE marker before its log was pruned costs nothing."""
    from recsvc.engine import Engine

    cfg = _engine_cfg(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    _feed(eng, 0, 20, clock)
    eng.close(snapshot=False)
    snap = Path(cfg.state.dir) / "snapshots" / "snap-000000000010"
    snap.mkdir()  # a half-deleted older snapshot (or one that lost its DONE)
    eng = Engine.from_config(cfg, clock=clock)
    assert int(eng.state.interaction_counts(eng.catalog.alive_rows()).sum()) == 20
    eng.close(snapshot=False)


def test_damage_only_in_records_the_snapshot_covers_does_not_refuse(tmp_path):
    """Replay never reads records a snapshot covers, so damage there loses nothing."""
    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}, {"t": "b"}], durable=True)
    store.close()
    store = LocalStateStore(tmp_path)
    store.append([{"t": "c"}], durable=True)
    store.write_snapshot(2, lambda d: None)  # covers a and b (their segment is pruned), not c
    store.append([{"t": "d"}], durable=True)
    store.close()
    older = tmp_path / "log-000000000000.jsonl"  # a stray older segment holding covered records only
    older.write_bytes(b'00000000 {"t":"x","lsn":1}\n')
    store = LocalStateStore(tmp_path)
    assert [r["t"] for r in store.replay(2)] == ["c", "d"]
    store.close()


# -- item 3: files read at start are verified ------------------------------------------------------------
EXPERIMENTS = """
[[experiment]]
name = "policy"
salt = "durability"
  [[experiment.variant]]
  name = "control"
  weight = 1
  [[experiment.variant]]
  name = "greedy"
  weight = 1
  overrides = { exploration = { policy = "greedy" } }
"""


def _snapshot_with_everything(tmp_path, clock):
    """A snapshot holding the online state, served slates, experiment aggregates and a live catalog."""
    import numpy as np

    from recsvc.engine import Engine, FeedbackEventIn, ItemIn, RecommendQuery

    exp = tmp_path / "experiments.toml"
    exp.write_text(EXPERIMENTS)
    cfg = _engine_cfg(tmp_path, experiments={"file": str(exp)})
    eng = Engine.from_config(cfg, clock=clock)
    eng.upsert_items([ItemIn("live-1", np.ones(eng.catalog.dim).tolist(), "c", created_at_ms=clock() - 5)])
    for u in range(20):
        rec = eng.recommend(RecommendQuery(user_id=f"u{u}", n=4))
        eng.feedback([FeedbackEventIn(f"imp-{u}", f"u{u}", rec.items[0].item_id, "impression",
                                      request_id=rec.request_id),
                      FeedbackEventIn(f"clk-{u}", f"u{u}", rec.items[0].item_id, "click",
                                      request_id=rec.request_id)])
        clock.advance(10)
    eng.close()  # the shutdown snapshot
    (snap,) = (Path(cfg.state.dir) / "snapshots").glob("snap-*")
    return cfg, snap


def _change_one_byte(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))


def _flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["online.json", "online.npz", "experiments.json", "catalog/items.json",
                                  "catalog/embeddings.npy"])
def test_one_changed_byte_in_a_snapshot_file_is_refused_naming_the_file(tmp_path, clock, name):
    """Damaged snapshot files stopped start-up with raw tracebacks that did not name the file, or passed
    silently (a changed created_at_ms key zeroed that item's timestamp)."""
    from recsvc.engine import Engine

    cfg, snap = _snapshot_with_everything(tmp_path, clock)
    path = snap / name
    if name == "online.json":
        _change_one_byte(path, b'"total_impressions":2', b'"total_impressions":3')
    elif name == "experiments.json":
        _change_one_byte(path, b'"version":', b'"version" ')  # no longer JSON
    elif name == "catalog/items.json":
        _change_one_byte(path, b'"item_ids"', b'"item_idz"')
    else:
        _flip_one_byte(path, path.stat().st_size - 100)  # in the last array's data
    with pytest.raises(Exception) as err:
        Engine.from_config(cfg, clock=clock)
    msg = str(err.value)
    assert type(err.value).__name__ == "SnapshotDamaged", f"{type(err.value).__name__}: {msg}"
    assert msg.startswith(f"{path}: ") and "checksum" in msg and "\n" not in msg
    assert "--accept-loss" in msg


def test_snapshot_without_a_manifest_entry_for_a_file_is_refused(tmp_path, clock):
    """The manifest is written last: a snapshot whose file is missing is damaged, not a smaller state."""
    from recsvc.engine import Engine

    cfg, snap = _snapshot_with_everything(tmp_path, clock)
    (snap / "experiments.json").unlink()
    with pytest.raises(Exception, match=r"experiments.json: missing") as err:
        Engine.from_config(cfg, clock=clock)
    assert type(err.value).__name__ == "SnapshotDamaged"


def test_accepting_a_damaged_snapshot_sets_it_aside(tmp_path, clock, monkeypatch):
    from recsvc.engine import Engine

    cfg, snap = _snapshot_with_everything(tmp_path, clock)
    _flip_one_byte(snap / "online.npz", 200)
    monkeypatch.setenv("RECSVC_ACCEPT_LOSS", "1")
    eng = Engine.from_config(cfg, clock=clock)  # from the log that is left (the snapshot's part is lost)
    eng.close(snapshot=False)
    assert (snap.parent / f"damaged-{snap.name}").is_dir() and not snap.exists()


SERVE_CONFIG = """
[metrics]
port = 0  # tests run side by side: no fixed metrics port

[server]
port = 0
[catalog]
path = "{catalog}"
[index]
ef_construction = 64
[state]
dir = "{state}"
"""


def _serve(config: Path, *args: str, timeout: float = 120):
    """Start ``recsvc serve``; (process, output lines) once it serves or has exited."""
    proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("recsvc serving"):
            break
    return proc, lines


def _stop(proc) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def _saved_catalog_with_index(tmp_path) -> Path:
    from recsvc.catalog import demo_catalog
    from recsvc.cli import main
    from recsvc.config import DemoCatalogConfig

    directory = tmp_path / "catalog"
    demo_catalog(DemoCatalogConfig(n_items=2000, dim=8, n_categories=5, n_topics=3, seed=1)).save(directory)
    config = tmp_path / "recsvc.toml"
    config.write_text(SERVE_CONFIG.format(catalog=directory, state=tmp_path / "state"))
    assert main(["build-index", "--config", str(config)]) == 0
    return config


def test_one_changed_byte_in_index_bin_is_rebuilt_not_a_segfault(tmp_path):
    """A corrupted index.bin crashed the server inside hnswlib (exit 139, nothing logged)."""
    config = _saved_catalog_with_index(tmp_path)
    index = tmp_path / "catalog" / "index.bin"
    _flip_one_byte(index, 54)  # the entry point's node id (hnswlib's header)
    proc, lines = _serve(config)
    code, err = _stop(proc)
    assert code == 0, f"exit {code}: {''.join(lines)}{err[-2000:]}"
    assert "recsvc serving\n" in lines
    assert f"{index}: checksum" in err and "rebuilding" in err
    proc, lines = _serve(config)  # rebuilt and saved: the next start loads it
    code, err = _stop(proc)
    assert code == 0 and "rebuilding" not in err


def test_legacy_index_without_checksum_is_checked_before_hnswlib_reads_it(tmp_path):
    """An index saved before index.json carried a checksum: its structure is checked instead."""
    config = _saved_catalog_with_index(tmp_path)
    d = tmp_path / "catalog"
    meta = json.loads((d / "index.json").read_text())
    meta.pop("file", None)
    (d / "index.json").write_text(json.dumps(meta))
    _flip_one_byte(d / "index.bin", 54)
    code = run_python(f"""
        from recsvc.config import load_config
        from recsvc.recovery import load_catalog_and_index
        catalog, ann = load_catalog_and_index(load_config({str(config)!r}))
        for row in range(100):
            ann.query(catalog.embeddings[row], 20)
        print("ok")
    """)
    assert code.returncode == 0 and code.stdout.strip() == "ok", code.stderr[-2000:]
    assert "index.bin" in code.stderr and "rebuilding" in code.stderr


def test_saved_catalog_file_changed_by_one_byte_is_refused(tmp_path, small_catalog):
    """Catalog.save writes sizes and checksums into catalog.json; a load checks them."""
    from recsvc.catalog import Catalog, CatalogError

    small_catalog.save(tmp_path / "cat")
    _flip_one_byte(tmp_path / "cat" / "embeddings.npy", 1000)
    with pytest.raises(CatalogError, match=r"embeddings.npy: .*checksum.*catalog.json"):
        Catalog.load(tmp_path / "cat")


def test_damaged_demo_cache_is_generated_again(tmp_path, clock):
    from conftest import small_config
    from recsvc.engine import Engine
    from recsvc.recovery import demo_cache_dir

    cfg = small_config(tmp_path)
    Engine.from_config(cfg, clock=clock).close(snapshot=False)
    _flip_one_byte(demo_cache_dir(cfg) / "created_at_ms.npy", 200)
    eng = Engine.from_config(cfg, clock=clock)
    assert int(eng.catalog.created_at_ms[0]) > 0
    eng.close(snapshot=False)


def test_unknown_key_in_items_jsonl_is_refused(tmp_path, small_catalog):
    """A misspelt key silently became the default (created_at_ms 0: the item looked 56 years old)."""
    from recsvc.catalog import Catalog, CatalogError

    d = tmp_path / "cat"
    small_catalog.save_jsonl(d)
    (d / "catalog.json").unlink()  # a hand-made catalog: no manifest
    _change_one_byte(d / "items.jsonl", b'"created_at_ms"', b'"created_at_mz"')
    with pytest.raises(CatalogError, match=r"items.jsonl:1: unknown key 'created_at_mz'"):
        Catalog.load(d)


def test_catalog_json_count_must_match(tmp_path, small_catalog):
    from recsvc.catalog import Catalog, CatalogError

    d = tmp_path / "cat"
    small_catalog.save_jsonl(d)
    meta = json.loads((d / "catalog.json").read_text())
    meta.pop("files", None)
    meta["count"] = 10
    (d / "catalog.json").write_text(json.dumps(meta))
    with pytest.raises(CatalogError, match=r"catalog.json: count is 10 but items.jsonl has 3000 items"):
        Catalog.load(d)


@pytest.mark.parametrize("space, m, dim", [("cosine", 16, 16), ("ip", 8, 24), ("l2", 24, 8)])
def test_structure_check_accepts_every_graph_hnswlib_saves(tmp_path, space, m, dim):
    """No false alarm: grown, deleted-from, replaced-into and reordered graphs all pass."""
    import hnswlib
    import numpy as np

    from recsvc.retrieval import layout

    rng = np.random.default_rng(0)
    index = hnswlib.Index(space=space, dim=dim)
    index.init_index(max_elements=1500, M=m, ef_construction=40, random_seed=3, allow_replace_deleted=True)
    index.add_items(rng.standard_normal((1500, dim)).astype(np.float32), np.arange(1500) * 3)
    for label in range(0, 600, 6):
        index.mark_deleted(label)
    index.resize_index(2500)
    index.add_items(rng.standard_normal((300, dim)).astype(np.float32), np.arange(300) + 10**6,
                    replace_deleted=True)
    path = tmp_path / "index.bin"
    index.save_index(str(path))
    layout.check_index_file(path, dim)
    layout.reorder_index_file(path, dim)
    layout.check_index_file(path, dim)
    _flip_one_byte(path, 54)
    with pytest.raises(layout.IndexFileError):
        layout.check_index_file(path, dim)


def test_snapshot_without_manifest_still_names_an_unreadable_file(tmp_path, clock):
    """A snapshot written before DONE held a manifest is read as it is; a file it cannot read is named."""
    from recsvc.engine import Engine

    cfg, snap = _snapshot_with_everything(tmp_path, clock)
    lsn = json.loads((snap / "DONE").read_text())["lsn"]
    (snap / "DONE").write_text(json.dumps({"lsn": lsn}))
    Engine.from_config(cfg, clock=clock).close(snapshot=False)  # an old snapshot still loads
    _change_one_byte(snap / "online.json", b'"served":[', b'"served" [')
    with pytest.raises(Exception) as err:
        Engine.from_config(cfg, clock=clock)
    assert type(err.value).__name__ == "SnapshotDamaged"
    assert str(err.value).startswith(f"{snap / 'online.json'}: unreadable (JSONDecodeError")


# -- item 8: a snapshot does not stall ingestion ---------------------------------------------------------
def _engine_with_served_slates(tmp_path, clock, n_slates: int):
    import dataclasses

    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery

    cfg = _engine_cfg(tmp_path, state={"snapshot_every_events": 10**9})
    eng = Engine.from_config(cfg, clock=clock)
    base = [eng.recommend(RecommendQuery(user_id=f"u{i}", n=10)) for i in range(20)]
    slates = [eng.state.served_slate(r.request_id) for r in base]
    for i in range(n_slates):  # copies of real slates (features and all), recorded as the request path does
        eng.feedback_path.record_served(dataclasses.replace(slates[i % 20], request_id=f"r{i}", outcome={}))
    eng.feedback([FeedbackEventIn(f"imp-{i}", slates[i % 20].user_id, base[i % 20].items[0].item_id,
                                  "impression", request_id=f"r{i}") for i in range(0, n_slates, 7)])
    return eng


def test_feedback_does_not_wait_for_a_background_snapshot(tmp_path, clock):
    """The ingest lock was held while online.json (every served slate) was written: Feedback stalled for
    2 s with 27k served slates in memory. Now the cut is taken under the lock and written outside it."""
    import threading

    from recsvc.engine import FeedbackEventIn

    eng = _engine_with_served_slates(tmp_path, clock, 12_000)
    item = eng.catalog.item_ids[0]
    started, waits = threading.Event(), []
    real_write = eng.journal.store.write_snapshot

    def write_snapshot(lsn, write):
        started.set()  # the cut is taken; the files are about to be written
        return real_write(lsn, write)

    eng.journal.store.write_snapshot = write_snapshot
    snap = threading.Thread(target=eng.snapshot)
    t0 = time.perf_counter()
    snap.start()
    assert started.wait(30)
    cut = time.perf_counter() - t0
    k = 0
    while snap.is_alive():
        t = time.perf_counter()
        eng.feedback([FeedbackEventIn(f"during-{k}", "w", item, "click")])
        waits.append(time.perf_counter() - t)
        k += 1
    snap.join()
    total = time.perf_counter() - t0
    eng.close(snapshot=False)
    # Bounds relative to the snapshot's own time hold on a loaded machine too; before the fix the first
    # call waited for the whole write (about 0.5 s here, 2 s at 27k slates).
    assert len(waits) >= 3, f"no feedback ran while the snapshot was written ({total:.2f} s)"
    assert max(waits) < 0.5 * total, (max(waits), total)
    assert eng.snapshots.last_pause_s < 0.2 and cut < 0.5 * total  # the cut: milliseconds


def test_snapshot_written_outside_the_lock_is_the_state_at_its_cut(tmp_path, clock):
    """Feedback applied while the files are written belongs to the log after the snapshot, not in it:
    after a restart every event counts exactly once."""
    import threading

    from recsvc.engine import Engine, FeedbackEventIn

    eng = _engine_with_served_slates(tmp_path, clock, 3000)
    items = eng.catalog.item_ids
    snap = threading.Thread(target=eng.snapshot)
    snap.start()
    k = 0
    while snap.is_alive() or k < 50:
        eng.feedback([FeedbackEventIn(f"during-{k}", f"w{k % 3}", items[k % 40], "click")])
        k += 1
    snap.join()
    rows = eng.catalog.alive_rows()
    before = (eng.state.interaction_counts(rows).copy(), eng.state.history("w1"), eng.state.n_served())
    eng.close(snapshot=False)
    back = Engine.from_config(eng.cfg, clock=clock)
    after = (back.state.interaction_counts(rows), back.state.history("w1"), back.state.n_served())
    assert (after[0] == before[0]).all() and after[1:] == before[1:]
    back.close(snapshot=False)


def test_catalog_cut_is_not_changed_by_later_upserts_and_deletes(tmp_path, small_catalog):
    """Copy-on-write: the snapshot saves the catalog as of its cut while the live one changes."""
    import numpy as np

    from recsvc.catalog import Catalog, ItemRecord

    cat = Catalog.from_arrays(small_catalog.item_ids[:100], small_catalog.embeddings[:100],
                              ["c"] * 100, np.zeros(100), np.arange(100))
    cut = cat.cut()
    cat.upsert([ItemRecord(cat.item_ids[5], np.ones(cat.dim), "changed", 7, 123), ItemRecord("new", np.ones(cat.dim))])
    cat.delete([cat.item_ids[6]])
    cut.save(tmp_path / "cut")
    cut.release()
    saved = Catalog.load(tmp_path / "cut")
    assert saved.n_rows == 100 and "new" not in saved.row_of and cat.item_ids[6] in saved.row_of
    np.testing.assert_array_equal(saved.embeddings[5], small_catalog.embeddings[5])
    assert saved.category_names[saved.categories[5]] == "c" and saved.maturity[5] == 0
    cat.upsert([ItemRecord("after-release", np.ones(cat.dim))])  # changes in place again
    assert cat.n_rows == 102


def test_catalog_change_during_the_index_save_snapshots_again_with_ingest_paused(tmp_path, clock):
    """The live index cannot be copied: a catalog change between the cut and the end of its save means
    the saved index is newer than the cut, so that snapshot is redone holding the ingest lock."""
    import threading

    import numpy as np

    from recsvc.engine import Engine, ItemIn

    cfg = _engine_cfg(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    v = np.ones(eng.catalog.dim)
    eng.upsert_items([ItemIn("first", v.tolist(), "c")])
    real_save, saves = eng.snapshots.ann.save, []

    def save_then_upsert(directory, version):
        real_save(directory, version)
        saves.append(directory)
        if len(saves) == 1:  # a catalog change lands right after the first save
            t = threading.Thread(target=eng.upsert_items, args=([ItemIn("second", (-v).tolist(), "c")],))
            t.start()
            t.join()

    eng.snapshots.ann.save = save_then_upsert
    lsn = eng.snapshot()
    assert len(saves) == 2 and lsn == eng.store.lsn
    assert not list((Path(cfg.state.dir) / "snapshots").glob(".tmp-snap-*"))
    eng.close(snapshot=False)
    back = Engine.from_config(cfg, clock=clock)
    assert {"first", "second"} <= set(back.catalog.row_of)
    assert back.snapshots.ann.query(-v.astype(np.float32) / np.sqrt(v.size), 1)[0][0] == back.catalog.row_of["second"]
    back.close(snapshot=False)


def test_snapshot_files_hold_what_the_state_holds(tmp_path, clock):
    """The cut and the piecewise JSON writer: the same document the state describes, in the same order
    (served slates and seen ids after the oldest were evicted)."""
    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
    from recsvc.state.records import encode_served

    cfg = _engine_cfg(tmp_path, state={"served_log_size": 30, "dedupe_window": 50})
    eng = Engine.from_config(cfg, clock=clock)
    for u in range(80):
        rec = eng.recommend(RecommendQuery(user_id=f"u{u % 9}", n=4))
        eng.feedback([FeedbackEventIn(f"e{u}", f"u{u % 9}", rec.items[u % 4].item_id, "click",
                                      request_id=rec.request_id)])
        clock.advance(1000)
    st = eng._state
    eng.snapshot()
    doc = json.loads((eng.store.latest_snapshot()[1] / "online.json").read_text())
    assert doc["served"] == [encode_served(s, with_outcome=True) for s in st._served.values()]
    assert doc["seen_events"] == list(st._seen_events) and len(doc["seen_events"]) == 50
    assert doc["histories"] == {u: [list(x) for x in h] for u, h in st._histories.items()}
    assert doc["cooc"] == {str(k): {str(a): b for a, b in v.items()} for k, v in st._cooc.items()}
    assert doc["applied_lsn"] == eng.store.lsn
    eng.close(snapshot=False)


# -- item 11: start-up failures are one line naming the file and the fix -------------------------------
def _startup_cases(tmp_path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (config, what the one error line must say), each a broken start the issue met."""
    import numpy as np

    from recsvc.catalog import demo_catalog
    from recsvc.config import DemoCatalogConfig

    good = tmp_path / "good"
    demo_catalog(DemoCatalogConfig(n_items=300, dim=8, n_categories=3, n_topics=2, seed=1)).save_jsonl(good)
    cases = {}

    def case(name, catalog, *expect, state=None):
        config = tmp_path / f"{name}.toml"
        config.write_text(SERVE_CONFIG.format(catalog=catalog, state=state or tmp_path / f"state-{name}"))
        cases[name] = (config, list(expect))
        return config

    case("missing directory", tmp_path / "nope", f"{tmp_path / 'nope'}: no such catalog directory")
    case("empty path", "", "catalog.path is empty", "set catalog.path to a catalog directory")
    import shutil

    for name in ("float64", "row count"):
        shutil.copytree(good, tmp_path / name)
    np.save(tmp_path / "float64" / "embeddings.npy", np.load(good / "embeddings.npy").astype(np.float64))
    case("float64", tmp_path / "float64", f"{tmp_path / 'float64' / 'embeddings.npy'}: embeddings must be float32",
         "astype(np.float32)")
    lines = (good / "items.jsonl").read_text().splitlines()
    (tmp_path / "row count" / "items.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    case("row count", tmp_path / "row count", "items.jsonl has 299 items but embeddings.npy has 300 rows")
    seg_state = tmp_path / "state-damaged log"
    seg = _log_with_records(seg_state, 100)
    _flip_one_byte(seg, _record_starts(seg)[50] + 12)
    case("damaged log", good, f"{seg}: damaged record at byte {_record_starts(seg)[50]}", "--accept-loss",
         state=seg_state)
    case("state directory in use", good, f"state directory {tmp_path / 'busy'} is in use",
         state=tmp_path / "busy")  # (the test holds it)
    return cases


def test_startup_failures_print_one_line_naming_the_file_and_the_fix(tmp_path):
    """A bad catalog directory, `path = ""`, a wrong dtype or row count, a damaged log: `recsvc serve` printed
    a 16-line traceback. Now: one line naming the file and the fix, and a non-zero exit."""
    cases = _startup_cases(tmp_path)
    busy = LocalStateStore(tmp_path / "busy")
    procs = {name: subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(config)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for name, (config, _) in cases.items()}  # (all at once: each is a fresh interpreter)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        errors = [line for line in err.splitlines() if " INFO " not in line and " WARNING " not in line]
        assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{err}"
        assert len(errors) == 1 and "Traceback" not in err, f"{name}:\n{err}"
        assert errors[0].startswith("recsvc serve: cannot start: "), errors[0]
        for fragment in cases[name][1]:
            assert fragment in errors[0], f"{name}: {fragment!r} not in {errors[0]!r}"
    busy.close()


def test_refused_start_proceeds_with_accept_loss(tmp_path):
    config = tmp_path / "recsvc.toml"
    state = tmp_path / "state"
    seg = _log_with_records(state, 100)
    _flip_one_byte(seg, _record_starts(seg)[50] + 12)
    from recsvc.catalog import demo_catalog
    from recsvc.config import DemoCatalogConfig

    demo_catalog(DemoCatalogConfig(n_items=300, dim=8, n_categories=3, n_topics=2, seed=1)).save(tmp_path / "cat")
    config.write_text(SERVE_CONFIG.format(catalog=tmp_path / "cat", state=state))
    proc, lines = _serve(config, "--accept-loss")
    code, err = _stop(proc)
    assert "recsvc serving\n" in lines and code == 0, err
    assert "accepted the loss of" in err and str(seg) in err
