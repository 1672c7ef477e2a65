"""Durable file replacement, one implementation for every file recsvc writes in place.

A reader (or a restart after a crash) sees the old file or the new one, never
half of one: the new content goes to a temporary file beside the target
(``mkstemp``: a unique name, so two writers never share it), is fsync'd, takes
the old file's permissions (or 0644), and is renamed over the target; the
directory is then fsync'd so the rename itself survives a power cut.

Manifests: a writer records the size and CRC-32 of what it wrote (``checksum``),
in a file it writes last; a reader checks each file against it (``mismatch``)
before using it, so a changed byte is found rather than read.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it replaces ``path``.

    For writers that need a file name (hnswlib's ``save_index``). If the
    block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600: keep what the file had, or make it readable
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file handle."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


# -- manifests: what a writer wrote, checked by the reader ---------------------------------------------
def checksum(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A manifest entry for a file: ``{"size": bytes, "crc32": "8 hex digits"}``."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"size": size, "crc32": f"{crc:08x}"}


def mismatch(path: str | os.PathLike[str], entry: Mapping[str, Any]) -> str | None:
    """Why ``path`` is not the file its manifest ``entry`` describes (None when it is)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    if size != entry.get("size"):
        return f"{size} bytes where its manifest says {entry.get('size')} (its checksum cannot match)"
    got = checksum(path)["crc32"]
    if got != entry.get("crc32"):
        return f"checksum crc32 {got} differs from its manifest's {entry.get('crc32')} (same size: changed bytes)"
    return None
