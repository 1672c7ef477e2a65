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
