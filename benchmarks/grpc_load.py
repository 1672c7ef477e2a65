"""Closed-loop gRPC load on loopback: Recommend throughput and latency of 1 worker, 2 workers, an echo server.

    python benchmarks/grpc_load.py [--items 100000] [--seconds 10] [--callers 16] [--json out.json]
    python benchmarks/grpc_load.py --servers echo,single --half     # issue 16: one process against the echo

``single`` is one ``recsvc serve`` process with the default embedded state (no Redis); ``workers_1`` and
``workers_2`` are the supervisor with one and two workers sharing a Redis. ``--half`` then loads ``single``
open-loop at half the rate it reached (requests sent on a fixed schedule, each latency measured from its
scheduled send time, so a stalled server is not hidden by callers that wait for it) and reports p50/p99 beside
the in-process median (the server's own ``timings.total_us`` of the same calls).

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

_SERVER = """
[server]
port = 0
max_workers = 8
[catalog.demo]
n_items = {items}
"""
#: the workers share a Redis
CONFIG = _SERVER + """[state]
backend = "redis"
redis_url = "{url}"
redis_prefix = "load-{tag}"
"""
#: one process, the default embedded state
CONFIG_SINGLE = _SERVER + """[state]
dir = "{state_dir}"
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
    codes: dict[str, int] = {}
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
            except grpc.RpcError as e:
                errors += 1
                codes[e.code().name] = codes.get(e.code().name, 0) + 1

    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in channels:
        await c.close()
    a = np.asarray(lat) * 1e3
    return {"requests_per_s": round(len(lat) / elapsed, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "errors": errors, "error_codes": codes, "seconds": round(elapsed, 1),
            "client_cpu_per_s": round(((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / elapsed, 2)}


async def _open_loop(port: int, seconds: float, rate: float, connections: int, users: list[list[float]]) -> dict:
    """Requests sent on a fixed schedule (``rate`` per second), whatever the server does; each latency from
    its scheduled send time. With the server-reported in-process total of the same calls."""
    import grpc

    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [pb_grpc.RecommenderStub(c) for c in channels]
    for st in stubs:
        await st.Recommend(pb.RecommendRequest(user_id="warm", n=20, user_embedding=users[0]), timeout=30)
    lat: list[float] = []
    inproc: list[float] = []
    errors = 0
    codes: dict[str, int] = {}
    n = int(seconds * rate)
    t0 = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        nonlocal errors
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            r = await stubs[i % len(stubs)].Recommend(
                pb.RecommendRequest(user_id=f"u{i % 1000}", n=20, user_embedding=users[i % len(users)]), timeout=5)
            lat.append(time.perf_counter() - due)
            inproc.append(r.timings.total_us / 1e3)
        except grpc.RpcError as e:
            errors += 1
            codes[e.code().name] = codes.get(e.code().name, 0) + 1

    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    for c in channels:
        await c.close()
    a = np.asarray(lat) * 1e3
    med_in = float(np.median(inproc)) if inproc else float("nan")
    p99 = float(np.percentile(a, 99)) if a.size else float("nan")
    return {"rate_per_s": round(rate, 1), "answered_per_s": round(len(lat) / elapsed, 1), "errors": errors, "error_codes": codes,
            "p50_ms": round(float(np.percentile(a, 50)), 2) if a.size else None, "p99_ms": round(p99, 2),
            "in_process_median_ms": round(med_in, 3),
            "in_process_p99_ms": round(float(np.percentile(inproc, 99)), 3) if inproc else None,
            "p99_over_in_process_median": round(p99 / med_in, 2)}


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


def run(items: int, seconds: float, callers: int, connections: int,
        servers: tuple[str, ...] = ("echo", "workers_1", "workers_2"), half: bool = False) -> dict:
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
        known = {"echo": ([sys.executable, __file__, "--echo"], "echo serving on"),
                 "single": (None, "recsvc serving"),
                 "workers_1": (None, "recsvc serving"),
                 "workers_2": (None, "recsvc serving with")}
        for name in servers:
            cmd, ready = known[name]
            if name == "single":
                conf = tmp / "single.toml"
                conf.write_text(CONFIG_SINGLE.format(items=items, state_dir=tmp / "single-state"))
                cmd = [sys.executable, "-m", "recsvc.cli", "serve", "--config", str(conf)]
            elif cmd is None:
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
                if half and name == "single":
                    rate = out[name]["requests_per_s"] / 2
                    out["single_at_half"] = asyncio.run(_open_loop(port, seconds, rate, connections, users))
                    print("single_at_half", out["single_at_half"], file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
            print(name, out[name], file=sys.stderr, flush=True)
        if "workers_1" in out and "workers_2" in out:
            out["workers_2_over_1"] = round(out["workers_2"]["requests_per_s"] / out["workers_1"]["requests_per_s"], 2)
        for name in ("single", "workers_1"):
            if name in out and "echo" in out:
                out[f"{name}_share_of_echo"] = round(out[name]["requests_per_s"] / out["echo"]["requests_per_s"], 3)
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
    ap.add_argument("--servers", default="echo,workers_1,workers_2",
                    help="comma-separated, in order: echo, single (one process, embedded state), workers_1, workers_2")
    ap.add_argument("--half", action="store_true",
                    help="then load `single` open-loop at half the rate it reached: p50/p99 against the in-process median")
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.echo:
        _echo_server()
        return 0
    report = run(args.items, args.seconds, args.callers, args.connections, tuple(args.servers.split(",")), args.half)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
