"""One place that maps domain errors to gRPC status codes.

invalid input -> INVALID_ARGUMENT, unknown ids -> NOT_FOUND, not ready ->
UNAVAILABLE, wrong state -> FAILED_PRECONDITION, anything else -> INTERNAL with
a generic message (the traceback is logged, never sent to the caller).
"""

from __future__ import annotations

import logging

import grpc

from recsvc.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("recsvc.server")

_STATUS = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Wraps unary-unary handlers so domain errors become statuses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def guarded(request, context):
            try:
                return inner(request, context)
            except (InvalidArgument, NotFound, Unavailable, FailedPrecondition) as exc:
                context.abort(status_for(exc), str(exc))
            except Exception:  # noqa: BLE001 - the last line of defence
                # (handlers never call context.abort themselves: they raise domain errors)
                log.exception("unhandled error in %s", method)
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
