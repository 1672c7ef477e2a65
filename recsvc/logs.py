"""Log set-up: text for people at a terminal, or one JSON object per line (``[logging] format = "json"``).

Every record made while a call is handled carries that call's request id (``request_id``: the caller's
``x-request-id`` metadata, or one made up by the server; a Recommend's line also names its slate's id).
Two safeguards apply to both formats: a bearer token is replaced by ``Bearer [redacted]``, and a list of more
than 8 numbers (an embedding) is cut to its first 4 and a count — recsvc never logs either on purpose.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from typing import Any

_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("recsvc_request_id", default="")

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")
_NUM = r"\s*-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_LONG_VECTOR = re.compile(rf"([\[(]{_NUM}(?:,{_NUM}){{3}})((?:,{_NUM}){{5,}})([\])])")


def set_request_id(value: str) -> contextvars.Token:
    return _REQUEST_ID.set(value)


def reset_request_id(token: contextvars.Token) -> None:
    _REQUEST_ID.reset(token)


def request_id() -> str:
    return _REQUEST_ID.get()


def scrub(text: str) -> str:
    """``text`` without bearer tokens or long number lists."""
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(r"\1[redacted]", text)
    if "," in text:
        text = _LONG_VECTOR.sub(lambda m: f"{m.group(1)}, ... {m.group(2).count(',')} more{m.group(3)}", text)
    return text


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, prefix: str = "") -> None:
        super().__init__(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = scrub(super().format(record))
        rid = getattr(record, "request_id", "")
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (when in a call), worker, exc."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        if self.worker:
            out["worker"] = self.worker
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


_configured = {"worker": None}


def is_configured() -> bool:
    """Whether :func:`configure` set up this process's logging (the CLI does; an embedding program does not)."""
    return _configured["worker"] is not None


def configure(fmt: str = "text", level: str = "info", worker: str | None = None) -> None:
    """(Re)configure the root logger: one stderr handler in ``fmt`` ("text" or "json") at ``level``."""
    if worker is None:
        worker = _configured["worker"] or ""
    _configured["worker"] = worker
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_recsvc", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler._recsvc = True  # type: ignore[attr-defined]
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else
                         TextFormatter(f"{worker} " if worker else ""))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
