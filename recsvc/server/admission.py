"""Admission: what may wait for a worker, and what is refused at once.

gRPC Python runs each call on a thread pool of ``server.max_workers``; a call that finds every worker busy
waits in the pool's queue, unseen by the handler, and under overload it used to wait there until its
deadline had passed. Two bounds keep that wait short:

- **How many may wait.** :func:`recsvc.server.app.build_server` sets gRPC's ``maximum_concurrent_rpcs`` to
  ``max_workers + max_queued_rpcs``: a call beyond that is refused by gRPC itself, on its polling thread,
  with RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!") — it costs no worker and waits for nothing.
- **What is left when a worker takes it.** :class:`AdmissionInterceptor` notes when each call arrived
  (``intercept_service`` runs on the polling thread, before the call is queued). When a worker picks the
  call up, a caller deadline with less than ``min_deadline_ms`` left means even a degraded answer would be
  late, so it is refused at once (:class:`~recsvc.errors.Overloaded`, RESOURCE_EXHAUSTED) instead of started.
  The time it waited is available to the handler (:func:`queued_ms`): Recommend counts it against
  ``budgets.total_ms`` (a caller's deadline already counts it: gRPC measures what is left of it).

Both are on with ``server.shed_overload`` (the default); off, calls queue without bound, as before.
"""

from __future__ import annotations

import contextvars
import threading
import time

import grpc

from recsvc.errors import Overloaded

_QUEUED_S: contextvars.ContextVar[float] = contextvars.ContextVar("recsvc_queued_s", default=0.0)


def queued_ms() -> float:
    """Inside a handler: how long the current call waited for a worker, in ms (0 without admission)."""
    return _QUEUED_S.get() * 1000.0


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Times the wait of each call of ``service`` and refuses one whose deadline ran short meanwhile.

    Place it after :class:`~recsvc.server.ErrorMappingInterceptor` so its refusal becomes RESOURCE_EXHAUSTED.
    ``min_deadline_ms`` = 0 only times the wait.
    """

    def __init__(self, service: str, min_deadline_ms: float) -> None:
        self._prefix = f"/{service}/"
        self._min_deadline_s = min_deadline_ms / 1000.0
        #: calls refused because their deadline ran short while they waited
        self.refused = 0
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        arrived = time.monotonic()
        handler = continuation(handler_call_details)
        if (handler is None or handler.unary_unary is None
                or not handler_call_details.method.startswith(self._prefix)):
            return handler
        inner = handler.unary_unary
        min_left = self._min_deadline_s

        def admitted(request, context):
            waited = time.monotonic() - arrived
            if min_left > 0:
                left = context.time_remaining()
                if left is not None and left < min_left:
                    with self._lock:
                        self.refused += 1
                    raise Overloaded(f"the server is busy: this call waited {waited * 1000:.0f} ms for a worker "
                                     f"and its deadline leaves {left * 1000:.0f} ms, less than the "
                                     f"{min_left * 1000:.0f} ms it needs; retry with backoff")
            token = _QUEUED_S.set(waited)
            try:
                return inner(request, context)
            finally:
                _QUEUED_S.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            admitted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
