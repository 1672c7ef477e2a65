"""A server killed with SIGKILL mid-stream loses no acknowledged event and counts none twice."""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from recsvc.config import load_config
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

CONFIG = """
[metrics]
port = 0  # tests run side by side: no fixed metrics port

[server]
port = 0
[catalog]
cache_dir = "{tmp}/cache"
[catalog.demo]
n_items = 2000
dim = 8
n_categories = 20
seed = 3
[index]
ef_construction = 64
[state]
dir = "{tmp}/state"
snapshot_every_events = 700
"""


def start_server(config_path):
    proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("recsvc listening on"):
            port = int(line.rsplit(":", 1)[1])
        if line.startswith("recsvc serving"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, port
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def make_events(item_ids, n):
    rng = np.random.default_rng(0)
    return [pb.FeedbackEvent(event_id=f"ev-{i}", user_id=f"user-{i % 97}",
                             item_id=item_ids[int(rng.integers(len(item_ids)))], type=pb.CLICK)
            for i in range(n)]


@pytest.fixture
def servers():
    """Every server process a test starts is gone when it ends, pass or fail."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_counts_once(tmp_path, servers):
    config_path = tmp_path / "recsvc.toml"
    config_path.write_text(CONFIG.format(tmp=tmp_path))
    proc, port = start_server(config_path)
    servers.append(proc)
    item_ids = [f"item-{i:04d}" for i in range(50)]
    events = make_events(item_ids, 6000)
    batches = [events[i:i + 50] for i in range(0, len(events), 50)]
    acked: list[str] = []
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.RecommenderStub(channel)

    def send_all():
        for batch in batches:
            try:
                resp = stub.Feedback(pb.FeedbackRequest(events=batch), timeout=5)
            except grpc.RpcError:
                return  # the server died under us: this batch was not acknowledged
            assert resp.accepted + resp.duplicates == len(batch)
            acked.extend(e.event_id for e in batch)

    sender = threading.Thread(target=send_all)
    sender.start()
    deadline = time.monotonic() + 60
    while len(acked) < 1500 and sender.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)  # lands wherever the stream is
    sender.join(30)
    channel.close()
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(acked) < len(events), "the kill must land mid-stream"

    # Restart and retry everything: acknowledged events are duplicates.
    proc, port = start_server(config_path)
    servers.append(proc)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.RecommenderStub(channel)
    duplicates = accepted = 0
    acked_set = set(acked)
    for batch in batches:
        resp = stub.Feedback(pb.FeedbackRequest(events=batch), timeout=10)
        duplicates += resp.duplicates
        accepted += resp.accepted
        assert not resp.rejected
        if all(e.event_id in acked_set for e in batch):
            assert resp.duplicates == len(batch)
    channel.close()
    assert duplicates >= len(acked)
    assert duplicates + accepted == len(events)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0

    # Every event applied exactly once: per-item positive counts match what was sent.
    from recsvc.engine import Engine

    cfg = load_config(config_path)
    engine = Engine.from_config(cfg)
    expected = {}
    for e in events:
        expected[e.item_id] = expected.get(e.item_id, 0) + 1
    got = {i: int(engine.state.interaction_counts([engine.catalog.row_of[i]])[0]) for i in expected}
    engine.close(snapshot=False)
    assert got == expected
