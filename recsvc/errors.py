"""Domain errors. The gRPC layer maps each to one status code (see
``recsvc.server.interceptors``); in-process callers catch them directly."""


class RecsvcError(Exception):
    """Base class of every error recsvc raises on purpose."""


class InvalidArgument(RecsvcError, ValueError):
    """The request is malformed; the message says which field and why."""


class NotFound(RecsvcError, LookupError):
    """A referenced id (item, experiment, ...) does not exist."""


class Unavailable(RecsvcError):
    """The engine is not ready (still loading) or is shutting down."""


class FailedPrecondition(RecsvcError):
    """The operation is valid but not in the current state (e.g. no experiments)."""


class Overloaded(RecsvcError):
    """The server sheds this call: too many are waiting, or its deadline leaves too little time to serve it.
    Retryable (with backoff, or on another replica)."""


#: Characters of a caller-supplied value that error messages quote (see :func:`echo`).
ECHO_CHARS = 100


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A caller-supplied value as error messages quote it: its ``repr``, cut to the first ``limit`` characters
    of the value plus its total length when longer (``'abc...'... (20000 characters)``).

    Every message that quotes an id, name or category uses this: gRPC sends a status message in a header,
    and one past 8-16 KB reaches the caller as RESOURCE_EXHAUSTED "Stream removed" instead of its status.
    A sequence quotes its first five values, each cut the same way.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(echo(v, limit) for v in value[:5])
        more = f", ... ({len(value)} values)" if len(value) > 5 else ""
        return f"[{shown}{more}]"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
