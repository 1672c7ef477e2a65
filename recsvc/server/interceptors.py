"""One place that maps domain errors to gRPC status codes.

invalid input -> INVALID_ARGUMENT, unknown ids -> NOT_FOUND, not ready ->
UNAVAILABLE, wrong state -> FAILED_PRECONDITION, shed under overload ->
RESOURCE_EXHAUSTED, anything else -> INTERNAL with a generic message (the
traceback is logged, never sent to the caller).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import grpc

from recsvc.logs import reset_request_id, set_request_id
from recsvc.errors import FailedPrecondition, InvalidArgument, NotFound, Overloaded, Unavailable

log = logging.getLogger("recsvc.server")

#: Longest status message sent (characters). gRPC carries it in a header, and a caller's client drops a
#: response whose headers pass 8-16 KB ("Stream removed", RESOURCE_EXHAUSTED) instead of showing its status.
#: Messages quote caller-supplied values cut to size (``recsvc.errors.echo``); this is the backstop.
MAX_DETAILS = 2000

_STATUS = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
_DOMAIN_ERRORS = tuple(cls for cls, _ in _STATUS)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def bounded(details: str) -> str:
    """A status message cut to :data:`MAX_DETAILS` characters."""
    if len(details) <= MAX_DETAILS:
        return details
    return f"{details[:MAX_DETAILS - 40]}... (message cut from {len(details)} characters)"


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Wraps unary-unary handlers so domain errors become statuses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method
        deserialize = handler.request_deserializer

        def tolerant_deserializer(data: bytes):
            # grpc would answer INTERNAL for a request that does not parse
            # (e.g. invalid UTF-8 in a string field); hand it to `guarded`.
            try:
                return deserialize(data) if deserialize is not None else data
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
                return _Undecodable(str(exc) or type(exc).__name__)

        def guarded(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              bounded(f"the request is not a valid {method.rsplit('/', 1)[-1]} message "
                                      f"(string fields must be UTF-8): {request.reason}"))
            try:
                return inner(request, context)
            except _DOMAIN_ERRORS as exc:
                context.abort(status_for(exc), bounded(str(exc)))
            except Exception:  # noqa: BLE001 - the last line of defence
                # (handlers never call context.abort themselves: they raise domain errors)
                log.exception("unhandled error in %s", method)
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=tolerant_deserializer,
            response_serializer=handler.response_serializer,
        )


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and status code, times it from arrival to answer, counts calls gRPC refuses
    at ``maximum_concurrent_rpcs`` and keeps the queue depth; sets the call's log request id (the caller's
    ``x-request-id`` or a new one) and, with ``logging.requests``, logs one line per call.

    Outermost of the server's interceptors, so refusals by the others (tokens, shedding) are counted too.
    ``server_state``: gRPC's server state (``server._state``, set by ``build_server``); without it the
    queue-full refusals and the queue depth are not measured.
    """

    def __init__(self, log_requests: bool = False) -> None:
        from recsvc import metrics

        self._m = metrics
        self.server_state = None
        self._log_requests = log_requests
        self._executing = 0
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, grpc.StatusCode], object] = {}
        self._latency: dict[str, object] = {}
        self._queue_full = metrics.SHED.labels("queue_full")

    def _depth(self, finishing: int = 0) -> None:
        # gRPC's active count includes the calls waiting and running (a finishing one until it returns)
        st = self.server_state
        if st is not None:
            self._m.QUEUE_DEPTH.set(max(st.active_rpc_count - finishing - self._executing, 0))

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        child = self._counts.get((method, code))
        if child is None:
            child = self._counts[(method, code)] = self._m.RPCS.labels(method, code.name)
        child.inc()

    def intercept_service(self, continuation, handler_call_details):
        arrived = time.perf_counter()
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        st = self.server_state
        if (st is not None and st.maximum_concurrent_rpcs is not None
                and st.active_rpc_count >= st.maximum_concurrent_rpcs):
            # gRPC refuses this call right after the interceptors ran (grpc/_server.py, _handle_call)
            self._queue_full.inc()
            self._count(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            return handler
        inner = handler.unary_unary
        latency = self._latency.get(method)
        if latency is None:
            latency = self._latency[method] = self._m.RPC_LATENCY.labels(method)
        caller_id = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "x-request-id":
                caller_id = str(value)[:64]

        def measured(request, context):
            with self._lock:
                self._executing += 1
            self._depth()
            token = set_request_id(caller_id or os.urandom(8).hex())  # 16 hex digits, ~7x cheaper than uuid4
            code = grpc.StatusCode.OK
            response = None
            try:
                response = inner(request, context)
                return response
            except BaseException:
                code = _code_of(context)
                raise
            finally:
                elapsed = time.perf_counter() - arrived
                latency.observe(elapsed)
                self._count(method, code)
                with self._lock:
                    self._executing -= 1
                self._depth(finishing=1)
                if self._log_requests:
                    slate = getattr(response, "request_id", "")
                    log.info("rpc %s %s %.1f ms%s", method, code.name, elapsed * 1000,
                             f" slate {slate}" if slate else "")
                reset_request_id(token)

        return grpc.unary_unary_rpc_method_handler(
            measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code_of(context) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc contexts have no code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.INTERNAL if code is None else grpc.StatusCode.UNKNOWN
