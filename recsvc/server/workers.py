"""``recsvc serve --workers N``: N server processes on one port, each a replica with its own read model.

One Python process serves on one core (the GIL). With the shared (Redis) state backend every worker is a
full replica — its own catalog, index and read model, tailing the same stream — so N workers learn as one
and the kernel spreads connections over them (``SO_REUSEPORT``). The supervisor:

- refuses more than one worker with the embedded backend (its state lives in one process's memory and one
  locked directory), with a message saying to use Redis;
- refuses a port another process already listens on (a plain bind without ``SO_REUSEPORT`` first), so
  callers' traffic is never split with an unrelated server;
- starts the workers (``spawn``: no forked gRPC state), restarts one that dies (each restart recovers from
  the snapshot and the stream, so nothing is counted twice), forwards SIGHUP (config and ranker reload) to them, and on
  SIGTERM/SIGINT stops them all, each draining its in-flight calls within ``server.grace_period_s``; a worker
  whose supervisor dies is sent SIGTERM by the kernel (Linux), so none is left serving as an orphan.

Health is per worker: each answers ``grpc.health.v1`` for itself (NOT_SERVING while it loads or drains).
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

from recsvc.config import Config, ConfigError

log = logging.getLogger("recsvc.server.workers")


def resolve_workers(n: int) -> int:
    """``0`` means one per core."""
    return n if n > 0 else max(os.cpu_count() or 1, 1)


def check_port_free(host: str, port: int) -> int:
    """Bind without ``SO_REUSEPORT``: fails when any other process listens there. Returns the port (a free one for 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # old TIME_WAIT connections are no listener
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"{host}:{port} is already in use by another process; stop it or choose "
                                         "another server.port") from None
            raise
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies (no orphans serving on the port)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(cfg: Config, index: int, ready: "mp.synchronize.Event", config_path=None) -> None:
    from recsvc.logs import configure
    from recsvc.server.app import serve

    _die_with_parent()
    configure(cfg.logging.format, cfg.logging.level, worker=f"worker-{index}")
    serve(cfg, on_ready=lambda port: ready.set(), reuse_port=True, metrics_endpoint=False,
          config_path=config_path)


def serve_workers(cfg: Config, workers: int, stop_event: threading.Event | None = None,
                  on_ready=None, config_path=None) -> None:
    """Run ``workers`` server processes on ``cfg.server.port`` until SIGTERM/SIGINT (or ``stop_event``)."""
    n = resolve_workers(workers)
    if n > 1 and cfg.state.backend != "redis":
        raise ConfigError(
            f"--workers {n}: the embedded state backend keeps the online state in one process; set "
            '[state] backend = "redis" (and redis_url) so the workers share what they learn')
    port = check_port_free(cfg.server.host, cfg.server.port)
    cfg = cfg.with_overrides({"server": {"port": port}})
    ctx = mp.get_context("spawn")
    exporter, metrics_dir = _start_metrics(cfg)
    try:
        _supervise(cfg, n, port, ctx, stop_event, on_ready, config_path, metrics_dir)
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _start_metrics(cfg: Config):
    """(endpoint, directory) of prometheus_client's multiprocess mode: the workers (spawned after this) write
    their values under the directory, the supervisor's endpoint sums them. (None, None) when metrics are off."""
    if not cfg.metrics.port:
        return None, None
    from recsvc.server.app import start_metrics

    metrics_dir = tempfile.mkdtemp(prefix="recsvc-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the spawned workers
    return start_metrics(cfg), metrics_dir


def _supervise(cfg: Config, n: int, port: int, ctx, stop_event, on_ready, config_path, metrics_dir) -> None:
    stop = stop_event or threading.Event()
    procs: list = [None] * n
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

        def forward_hup(*_):  # each worker re-reads its config's reloadable keys and its ranker weights
            # (a ReloadRanker call reaches only the one worker that takes it)
            for p in procs:
                if p is not None and p.exitcode is None:
                    os.kill(p.pid, signal.SIGHUP)

        signal.signal(signal.SIGHUP, forward_hup)
    events = [ctx.Event() for _ in range(n)]

    def start(i: int) -> None:
        events[i].clear()
        procs[i] = ctx.Process(target=_worker, args=(cfg, i, events[i], config_path), name=f"recsvc-worker-{i}",
                               daemon=False)
        procs[i].start()

    for i in range(n):
        start(i)
    print(f"recsvc starting {n} worker(s) on {cfg.server.host}:{port}", flush=True)
    announced = False
    restarts = [0] * n
    try:
        while not stop.is_set():
            if not announced and all(e.is_set() for e in events):
                announced = True
                print(f"recsvc serving with {n} worker(s) on {cfg.server.host}:{port}", flush=True)
                if on_ready:
                    on_ready(port, [p.pid for p in procs])
            for i, p in enumerate(procs):
                if p.exitcode is not None and not stop.is_set():
                    restarts[i] += 1
                    if metrics_dir is not None:
                        from prometheus_client import multiprocess

                        multiprocess.mark_process_dead(p.pid, metrics_dir)
                    log.error("worker %d (pid %d) exited with %s; restarting (restart %d)", i, p.pid, p.exitcode,
                              restarts[i])
                    time.sleep(min(0.2 * restarts[i], 5.0))
                    start(i)
            stop.wait(0.1)
    finally:
        for p in procs:
            if p is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + cfg.server.grace_period_s + 30
        for p in procs:
            if p is not None:
                p.join(max(deadline - time.monotonic(), 0.1))
                if p.exitcode is None:
                    p.kill()
        print("recsvc stopped", flush=True)
