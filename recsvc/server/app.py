"""The server process: listen, report health, expose reflection, stop gracefully."""

from __future__ import annotations

import errno
import logging
import signal
import threading
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recsvc.config import Config
from recsvc.errors import Unavailable
from recsvc.server.admission import AdmissionInterceptor
from recsvc.server.interceptors import ErrorMappingInterceptor, MetricsInterceptor
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("recsvc.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name  # "recsvc.v1.Recommender"


def add_to_server(server: grpc.Server, engine) -> None:
    """Mount the Recommender service for ``engine`` on an existing server.

    Add ``ErrorMappingInterceptor()`` to the server's interceptors so domain
    errors become status codes (INVALID_ARGUMENT, NOT_FOUND, ...).
    """
    from recsvc.server.servicer import RecommenderServicer

    pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(engine), server)


class PortInUse(OSError):
    """The configured address is taken (by another recsvc or anything else): the server refuses to start."""


def build_server(cfg: Config, reuse_port: bool = False) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A server with health (NOT_SERVING until the engine is mounted) and reflection.

    ``reuse_port``: share the port with the other workers of ``recsvc serve --workers`` (SO_REUSEPORT).
    Otherwise a taken ``server.host:server.port`` raises :class:`PortInUse`: with gRPC's default SO_REUSEPORT
    two servers would share the port and split traffic between two states.
    """
    from recsvc.server.security import AuthInterceptor, TokenSet, server_credentials

    sc = cfg.server
    shed = sc.shed_overload
    credentials = server_credentials(cfg.tls)  # before binding: a missing certificate refuses the start
    metrics_interceptor = MetricsInterceptor(log_requests=cfg.logging.requests)
    auth = AuthInterceptor(SERVICE_NAME, TokenSet(cfg.auth))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=sc.max_workers, thread_name_prefix="recsvc"),
        interceptors=[metrics_interceptor, auth, ErrorMappingInterceptor(),
                      AdmissionInterceptor(SERVICE_NAME, sc.min_deadline_ms if shed else 0.0)],
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                 ("grpc.so_reuseport", 1 if reuse_port else 0)],
        # calls beyond this are refused by gRPC at once (RESOURCE_EXHAUSTED), see recsvc.server.admission
        maximum_concurrent_rpcs=sc.max_workers + sc.max_queued_rpcs if shed else None,
    )
    metrics_interceptor.server_state = getattr(server, "_state", None)  # gRPC's own counts (see the interceptor)
    server.recsvc_auth = auth  # type: ignore[attr-defined]  # SIGHUP re-reads the tokens
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{cfg.server.host}:{cfg.server.port}"
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpc's "Failed to bind to address"
        port = 0
    if port == 0:
        raise PortInUse(errno.EADDRINUSE,
                        f"{address} is already in use (another recsvc?) or cannot be bound here; stop the "
                        "other server or set server.port (0 picks a free port)")
    return server, port, health_servicer


_RPCS = ("Recommend", "Feedback", "UpsertItems", "DeleteItems", "GetExperimentReport", "ReloadRanker")


class _Switch(pb_grpc.RecommenderServicer):
    """Answers UNAVAILABLE while the engine loads, then delegates to it.

    grpc binds handler methods at registration, so each method forwards at
    call time to whatever ``target`` is then.
    """

    def __init__(self) -> None:
        self.target: pb_grpc.RecommenderServicer | None = None


def _forward(name: str):
    def method(self, request, context):
        target = self.target
        if target is None:
            raise Unavailable("recsvc is loading its catalog; retry shortly")
        return getattr(target, name)(request, context)

    method.__name__ = name
    return method


for _name in _RPCS:
    setattr(_Switch, _name, _forward(_name))


def start_metrics(cfg: Config):
    """Start the Prometheus endpoint; a taken port is logged and the server serves without it."""
    from recsvc.metrics import start_endpoint

    host = cfg.metrics.host or cfg.server.host
    try:
        exporter, port = start_endpoint(host, cfg.metrics.port)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); serving without the metrics endpoint (set "
                  "metrics.port, 0 = off)", host, cfg.metrics.port, exc.strerror or exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return exporter


def serve(
    cfg: Config,
    engine_factory: Callable[[Config], object] | None = None,
    on_ready: Callable[[int], None] | None = None,
    stop_event: threading.Event | None = None,
    reuse_port: bool = False,
    metrics_endpoint: bool = True,
    config_path=None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop_event``): listen first, load, then serve.

    SIGHUP re-reads ``config_path`` (the reloadable keys, see :data:`recsvc.config.RELOADABLE`), the token
    files and the ranker weights. ``metrics_endpoint``: serve ``metrics.port`` from this process (the
    supervisor of ``--workers`` serves it instead).
    """
    server, port, health_servicer = build_server(cfg, reuse_port=reuse_port)
    switch = _Switch()
    pb_grpc.add_RecommenderServicer_to_server(switch, server)
    server.start()
    exporter = start_metrics(cfg) if metrics_endpoint and cfg.metrics.port else None
    try:
        _serve_started(cfg, server, port, health_servicer, switch, engine_factory, on_ready, stop_event,
                       config_path)
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


def _serve_started(cfg, server, port, health_servicer, switch, engine_factory, on_ready, stop_event,
                   config_path) -> None:
    from recsvc.engine import Engine
    from recsvc.metrics import StateSampler
    from recsvc.server.servicer import RecommenderServicer

    log.info("listening on %s:%d (loading)", cfg.server.host, port)
    print(f"recsvc listening on {cfg.server.host}:{port}", flush=True)
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    engine = (engine_factory or (lambda c: Engine.from_config(c, progress=True)))(cfg)
    engine.warm_up()
    engine.config_path = config_path
    engine.on_reload.append(lambda new: _reload_server(server, new))
    if threading.current_thread() is threading.main_thread():
        def reload(*_):
            try:
                engine.reload()  # logs what it applied
            except Exception as exc:  # a broken config or weights file must not stop the server
                log.error("SIGHUP: reload refused, still serving with the previous settings: %s", exc)

        signal.signal(signal.SIGHUP, reload)
    sampler = StateSampler(engine, cfg.metrics.sample_interval_s).start()
    switch.target = RecommenderServicer(engine)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving")
    print("recsvc serving", flush=True)
    if on_ready:
        on_ready(port)
    try:
        stop.wait()
    finally:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.stop(grace=cfg.server.grace_period_s).wait()
        sampler.stop()
        engine.close()
        print("recsvc stopped", flush=True)


def _reload_server(server, cfg: Config) -> None:
    """The server's reloadable settings: the tokens (their sources re-read) and the log format and level."""
    server.recsvc_auth.tokens.reload(cfg.auth)
    from recsvc.logs import configure, is_configured

    if is_configured():
        configure(cfg.logging.format, cfg.logging.level)
