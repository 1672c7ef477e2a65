"""`recsvc serve --workers N`: real processes on one port, sharing a real Redis; a SIGKILLed worker comes back."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from redis_server import RedisServer

pytest.importorskip("redis")

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
backend = "{backend}"
redis_url = "{url}"
redis_prefix = "workers"
dir = "{tmp}/state"
[experiments]
file = "{tmp}/experiments.toml"
"""

EXPERIMENTS = """
[[experiment]]
name = "exp"
salt = "workers-test"
  [[experiment.variant]]
  name = "a"
  weight = 1
  [[experiment.variant]]
  name = "b"
  weight = 1
"""


def write_config(tmp: Path, backend: str, url: str = "") -> Path:
    (tmp / "experiments.toml").write_text(EXPERIMENTS)
    path = tmp / "recsvc.toml"
    path.write_text(CONFIG.format(tmp=tmp, backend=backend, url=url))
    return path


def start(config: Path, workers: int, timeout: float = 120):
    proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(config),
                             "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("recsvc serving with"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(line.rsplit(":", 1)[1])
    proc.kill()
    raise AssertionError("workers did not start:\n" + "".join(lines))


def children(pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"resource_tracker" not in cmd:
                out.append(int(c))
    return out


def report_arms(port: int) -> dict:
    import json

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        data = json.loads(pb_grpc.RecommenderStub(ch).GetExperimentReport(
            pb.GetExperimentReportRequest(experiment="exp"), timeout=10).report_json)
    return {a["variant"]: (a["impressions"], a["clicks"]) for a in data["experiments"][0]["arms"]}


def test_more_than_one_worker_needs_the_redis_backend(tmp_path):
    cfg = write_config(tmp_path, "embedded")
    res = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(cfg), "--workers", "2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert 'backend = "redis"' in res.stderr


def test_two_workers_share_one_port_and_learn_as_one(tmp_path):
    redis = RedisServer(tmp_path / "redis")
    proc = None
    try:
        proc, port = start(write_config(tmp_path, "redis", redis.url), workers=2)
        pids = children(proc.pid)
        assert len(pids) == 2
        sent = {"a": [0, 0], "b": [0, 0]}
        lock = threading.Lock()

        def caller(k: int) -> None:
            # a channel of its own: a connection of its own, spread over the workers by the kernel
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = pb_grpc.RecommenderStub(ch)
                for j in range(6):
                    user = f"user-{k}-{j}"
                    rec = stub.Recommend(pb.RecommendRequest(user_id=user, n=4), timeout=10)
                    events = [pb.FeedbackEvent(event_id=f"i-{user}-{it.position}", user_id=user, item_id=it.item_id,
                                               type=pb.IMPRESSION, request_id=rec.request_id) for it in rec.items]
                    events.append(pb.FeedbackEvent(event_id=f"c-{user}", user_id=user, item_id=rec.items[0].item_id,
                                                   type=pb.CLICK, request_id=rec.request_id))
                    resp = stub.Feedback(pb.FeedbackRequest(events=events), timeout=10)
                    assert resp.accepted == len(events), resp
                    with lock:
                        arm = sent[rec.variant.split(":")[1]]
                        arm[0] += len(rec.items)
                        arm[1] += 1

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        want = {k: tuple(v) for k, v in sent.items()}

        def every_worker_agrees() -> bool:
            return all(report_arms(port) == want for _ in range(8))  # 8 connections: both workers answer

        deadline = time.monotonic() + 10
        while not every_worker_agrees():
            assert time.monotonic() < deadline, (report_arms(port), want)
            time.sleep(0.1)

        # SIGKILL one worker mid-stream: callers retry (event ids make retries safe); the supervisor restarts it;
        # it recovers from the stream, counting nothing twice
        def retrying_caller(k: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = pb_grpc.RecommenderStub(ch)
                for j in range(15):
                    user = f"late-{k}-{j}"
                    while True:
                        try:
                            rec = stub.Recommend(pb.RecommendRequest(user_id=user, n=4), timeout=10)
                            events = [pb.FeedbackEvent(event_id=f"i-{user}-{it.position}", user_id=user,
                                                       item_id=it.item_id, type=pb.IMPRESSION,
                                                       request_id=rec.request_id) for it in rec.items]
                            resp = stub.Feedback(pb.FeedbackRequest(events=events), timeout=10)
                            assert resp.accepted + resp.duplicates == len(events), resp
                            break
                        except grpc.RpcError:
                            time.sleep(0.05)  # the worker died or is loading: retry the whole step
                    with lock:
                        sent[rec.variant.split(":")[1]][0] += len(rec.items)
                    time.sleep(0.01)

        late = [threading.Thread(target=retrying_caller, args=(k,)) for k in range(4)]
        for t in late:
            t.start()
        time.sleep(0.1)
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = children(proc.pid)
            if len(now) == 2 and pids[0] not in now:
                break
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.1)
        for t in late:
            t.join()
        want = {k: tuple(v) for k, v in sent.items()}
        deadline = time.monotonic() + 60
        while True:
            try:
                if every_worker_agrees():
                    break
            except grpc.RpcError:
                pass  # the restarted worker answers UNAVAILABLE while it loads
            assert time.monotonic() < deadline, "the restarted worker did not converge"
            time.sleep(0.2)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        redis.stop()


def test_workers_refuse_a_port_another_process_listens_on(tmp_path):
    import socket

    redis = RedisServer(tmp_path / "redis")
    try:
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            cfg = write_config(tmp_path, "redis", redis.url)
            res = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve", "--config", str(cfg),
                                  "--workers", "2", "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert f"127.0.0.1:{port} is already in use" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1  # one line, no traceback
    finally:
        redis.stop()
