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
