import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc.state.store import LocalStateStore, decode_line, encode_record


def test_record_encoding_round_trip_and_corruption():
    line = encode_record({"t": "fb", "lsn": 3, "e": [{"id": "x"}]})
    assert decode_line(line) == {"t": "fb", "lsn": 3, "e": [{"id": "x"}]}
    assert decode_line(line[:-1]) is None  # torn: no newline
    flipped = line.replace(b'"x"', b'"y"')
    assert decode_line(flipped) is None  # CRC mismatch


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _JSON, max_size=8))
def test_record_bytes_are_the_json_dumps_form(rec):
    """The log's bytes: CRC, space, ``json.dumps(rec, separators=(",", ":"), ensure_ascii=False)``, newline
    (one encoder kept for every record writes the same bytes as one made per record)."""
    body = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
    assert encode_record(rec) == b"%08x " % zlib.crc32(body) + body + b"\n"


def test_append_replay_and_restart(tmp_path):
    store = LocalStateStore(tmp_path)
    assert store.append([{"t": "a"}, {"t": "b"}], durable=True) == 2
    assert store.append([{"t": "c"}], durable=False) == 3
    store.close()
    again = LocalStateStore(tmp_path)
    assert [r["t"] for r in again.replay(0)] == ["a", "b", "c"]
    assert [r["t"] for r in again.replay(2)] == ["c"]
    assert again.append([{"t": "d"}], durable=True) == 4


def test_torn_tail_is_truncated_and_lsns_continue(tmp_path):
    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}, {"t": "b"}], durable=True)
    store.close()
    seg = sorted(tmp_path.glob("log-*.jsonl"))[-1]
    with seg.open("ab") as fh:
        fh.write(b'0000abcd {"t":"half')  # a crash mid-write
    again = LocalStateStore(tmp_path)
    assert [r["t"] for r in again.replay(0)] == ["a", "b"]
    assert again.append([{"t": "c"}], durable=True) == 3
    assert [r["lsn"] for r in again.replay(0)] == [1, 2, 3]


def test_snapshot_prunes_covered_segments(tmp_path):
    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}], durable=True)
    store.append([{"t": "b"}], durable=True)

    def write(d):
        (d / "state.json").write_text(json.dumps({"n": 2}))

    store.write_snapshot(2, write)
    store.append([{"t": "c"}], durable=True)
    lsn, path = store.latest_snapshot()
    assert lsn == 2 and json.loads((path / "state.json").read_text()) == {"n": 2}
    assert [r["t"] for r in store.replay(lsn)] == ["c"]
    store.close()
    again = LocalStateStore(tmp_path)
    assert [r["t"] for r in again.replay(2)] == ["c"]
    assert again.append([{"t": "d"}], durable=True) == 4


def test_incomplete_snapshot_is_ignored(tmp_path):
    store = LocalStateStore(tmp_path)
    (tmp_path / "snapshots" / "snap-000000000009").mkdir()
    assert store.latest_snapshot() == (0, None)


def test_one_writer_per_directory(tmp_path):
    from recsvc.state.store import StateDirectoryInUse

    store = LocalStateStore(tmp_path)
    with pytest.raises(StateDirectoryInUse, match="in use by another process or engine"):
        LocalStateStore(tmp_path)
    store.close()
    LocalStateStore(tmp_path).close()  # released on close


def test_damage_before_the_newest_segment_refuses_to_start(tmp_path):
    """(Damage in records a snapshot covers is harmless: see test_durability.)"""
    from recsvc.state.store import LogCorrupted

    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}], durable=True)
    store.close()
    store = LocalStateStore(tmp_path)  # a restart opens a new segment
    store.append([{"t": "b"}], durable=True)
    store.close()
    # damage the older segment's record (no snapshot covers it)
    older, newer = sorted(tmp_path.glob("log-*.jsonl"))
    older.write_bytes(older.read_bytes().replace(b'"a"', b'"x"'))
    with pytest.raises(LogCorrupted, match="not the newest"):
        LocalStateStore(tmp_path)
    assert older.read_bytes().count(b'"x"') == 1  # the segments are untouched


def test_failed_write_rolls_back_and_reuses_the_lsns(tmp_path, monkeypatch):
    import os

    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}], durable=True)
    size = sorted(tmp_path.glob("log-*.jsonl"))[-1].stat().st_size

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.append([{"t": "b"}, {"t": "c"}], durable=True)
    monkeypatch.undo()
    assert store.lsn == 1
    assert sorted(tmp_path.glob("log-*.jsonl"))[-1].stat().st_size == size
    assert store.append([{"t": "d"}], durable=True) == 2
    store.close()
    assert [r["t"] for r in LocalStateStore(tmp_path).replay(0)] == ["a", "d"]


def test_snapshot_at_an_unchanged_lsn_keeps_the_existing_one(tmp_path):
    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}], durable=True)
    store.write_snapshot(1, lambda d: (d / "x").write_text("first"))
    store.write_snapshot(1, lambda d: (d / "x").write_text("second"))
    assert (store.latest_snapshot()[1] / "x").read_text() == "first"
    store.close()


def test_a_write_that_cannot_be_rolled_back_stops_further_appends(tmp_path):
    """A partial write left in the log with records appended after it would be damage mid-segment (a
    refused start); with nothing after it, it is a torn tail the next start truncates."""
    import errno

    store = LocalStateStore(tmp_path)
    store.append([{"t": "a"}], durable=True)
    real = store._fh

    class FullDisk:
        def tell(self):
            return real.tell()

        def fileno(self):
            return real.fileno()

        def write(self, data):
            real.write(bytes(data[:7]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def truncate(self, size):
            raise OSError(errno.EIO, "Input/output error")

    store._fh = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        store.append([{"t": "b"}], durable=True)
    store._fh = real
    with pytest.raises(OSError, match="could not be rolled back"):
        store.append([{"t": "c"}], durable=True)
    store.close()
    again = LocalStateStore(tmp_path)  # the torn tail is truncated; no refusal
    assert [r["t"] for r in again.replay(0)] == ["a"]
    assert again.append([{"t": "d"}], durable=True) == 2
    again.close()
