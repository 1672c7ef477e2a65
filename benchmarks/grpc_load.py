"""Closed-loop gRPC load on loopback: Recommend throughput and latency of 1 worker, 2 workers, an echo server.

    python benchmarks/grpc_load.py [--items 100000] [--seconds 10] [--callers 16] [--json out.json]

Starts a Redis on a free loopback port (the workers share it), then for each server in turn — ``recsvc
serve --workers 1``, ``--workers 2``, and a trivial echo server with the same gRPC settings (thread pool
size, message limits, one process) — runs the load client for ``--seconds``: ``--callers`` concurrent
calls kept in flight by ``grpc.aio`` on ``--connections`` channels of their own (so SO_REUSEPORT spreads
them over the workers), each a Recommend for a user embedding from the catalog. Reports requests/s,
p50/p99 latency and the load client's own CPU seconds per second (on a 2-core machine the client's CPU
is taken from the servers, so it is reported beside every figure). Bounded: every run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CONFIG = """
[server]
port = 0
max_workers = 8
[catalog.demo]
n_items = {items}
[state]
backend = "redis"
redis_url = "{url}"
redis_prefix = "load-{tag}"
"""


def _echo_server():
    """One process, the same gRPC settings as recsvc's server, answering Recommend with a fixed response."""
    import grpc

    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    class Echo(pb_grpc.RecommenderServicer):
        def Recommend(self, request, context):
            return pb.RecommendResponse(request_id="echo", items=[pb.ScoredItem(item_id=f"item-{i}") for i in range(20)])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)])
    pb_grpc.add_RecommenderServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def _start(cmd: list[str], ready: str, timeout: float = 600) -> tuple[subprocess.Popen, int]:
    """Start a server; its port comes from the line ``... listening on HOST:PORT`` or ``... on HOST:PORT``
    before the line that says it is serving."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    lines, port = [], None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(("recsvc listening on", "recsvc starting", "echo serving on")):
            port = int(line.split()[-1].rsplit(":", 1)[1])
        if line.startswith(ready):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, port
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines[-20:]))


async def _load(port: int, seconds: float, callers: int, connections: int, users: list[list[float]]) -> dict:
    import grpc

    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [pb_grpc.RecommenderStub(c) for c in channels]
    for s in stubs:  # connect, warm
        await s.Recommend(pb.RecommendRequest(user_id="warm", n=20, user_embedding=users[0]), timeout=30)
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        nonlocal errors
        stub = stubs[k % len(stubs)]
        i = k
        while time.perf_counter() < stop_at:
            i += callers
            t = time.perf_counter()
            try:
                await stub.Recommend(pb.RecommendRequest(user_id=f"u{i % 1000}", n=20,
                                                         user_embedding=users[i % len(users)]), timeout=5)
                lat.append(time.perf_counter() - t)
            except grpc.RpcError:
                errors += 1

    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in channels:
        await c.close()
    a = np.asarray(lat) * 1e3
    return {"requests_per_s": round(len(lat) / elapsed, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "errors": errors, "seconds": round(elapsed, 1),
            "client_cpu_per_s": round(((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / elapsed, 2)}


def _cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its children, by pid (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def run(items: int, seconds: float, callers: int, connections: int) -> dict:
    from recsvc.catalog import demo_catalog
    from recsvc.config import DemoCatalogConfig
    from redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="recsvc-load-"))
    redis = RedisServer(tmp / "redis")
    cat = demo_catalog(DemoCatalogConfig(n_items=min(items, 20_000)))  # only for user vectors
    rng = np.random.default_rng(3)
    users = [cat.embeddings[int(r)].tolist() for r in rng.integers(cat.n_rows, size=256)]
    out: dict = {"items": items, "callers": callers, "connections": connections, "cores": os.cpu_count()}
    try:
        for name, cmd, ready in (("echo", [sys.executable, __file__, "--echo"], "echo serving on"),
                                 ("workers_1", None, "recsvc serving"),
                                 ("workers_2", None, "recsvc serving with")):
            if cmd is None:
                n = int(name.rsplit("_", 1)[1])
                conf = tmp / f"{name}.toml"
                conf.write_text(CONFIG.format(items=items, url=redis.url, tag=name))
                cmd = [sys.executable, "-m", "recsvc.cli", "serve", "--config", str(conf), "--workers", str(n)]
            proc, port = _start(cmd, ready)
            try:
                before, t0 = _cpu_seconds(proc.pid), time.perf_counter()
                out[name] = asyncio.run(_load(port, seconds, callers, connections, users))
                after, dt = _cpu_seconds(proc.pid), time.perf_counter() - t0
                # each server process's CPU cores in use over the run (workers: one entry each)
                out[name]["server_cpu_per_s"] = sorted(
                    (round((after[p] - before.get(p, 0.0)) / dt, 2) for p in after if after[p] - before.get(p, 0.0) > 0.01),
                    reverse=True)
            finally:
                proc.terminate()
                proc.wait(60)
            print(name, out[name], file=sys.stderr, flush=True)
        out["workers_2_over_1"] = round(out["workers_2"]["requests_per_s"] / out["workers_1"]["requests_per_s"], 2)
        out["workers_1_share_of_echo"] = round(out["workers_1"]["requests_per_s"] / out["echo"]["requests_per_s"], 2)
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--callers", type=int, default=16)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.echo:
        _echo_server()
        return 0
    report = run(args.items, args.seconds, args.callers, args.connections)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
