"""One place that maps domain errors to gRPC status codes.

invalid input -> INVALID_ARGUMENT, unknown ids -> NOT_FOUND, not ready ->
UNAVAILABLE, wrong state -> FAILED_PRECONDITION, shed under overload ->
RESOURCE_EXHAUSTED, anything else -> INTERNAL with a generic message (the
traceback is logged, never sent to the caller).
"""

from __future__ import annotations

import logging

import grpc

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
