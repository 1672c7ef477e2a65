"""Plain-numpy twin of ``_served.pyx``: the compact form of a served slate's features (same layout, same
statuses; see the kernel's header)."""

from __future__ import annotations

import numpy as np

_ONE_F16 = 0x3C00


def encode_features(block, k: int, f: int, out: np.ndarray, at: int) -> int:
    raw = np.frombuffer(block, np.uint8)
    if k < 0 or f < 0 or raw.size != 4 * k * f or not 0 <= at <= out.size:
        raise ValueError(f"a {k} x {f} float32 block is {4 * k * f} bytes, got {raw.size} "
                         f"(writing at {at} of {out.size})")
    x = raw.view(np.float32).reshape(k, f)
    if (np.abs(x) > 65504.0).any():
        return -1
    u = x.astype(np.float16).view(np.uint16)
    k = u.shape[0]
    const = (u == u[0]).all(axis=0) if k else np.zeros(u.shape[1], bool)  # no values: every column dense
    nonzero = u != 0
    binary = ~const & (~nonzero | (u == _ONE_F16)).all(axis=0)
    sparse = ~(const | binary) & (k + 16 * nonzero.sum(axis=0) < 16 * k)
    dense = ~(const | binary | sparse)
    su = u[:, sparse].T
    data = b"".join((np.packbits(const).tobytes(), np.packbits(binary).tobytes(), np.packbits(sparse).tobytes(),
                     u[0, const].tobytes() if k else b"", np.packbits(nonzero[:, binary | sparse].T).tobytes(),
                     su[su != 0].tobytes(), np.ascontiguousarray(u[:, dense]).tobytes()))
    if at + len(data) > out.size:
        return -2
    out[at:at + len(data)] = np.frombuffer(data, np.uint8)
    return len(data)


def decode_features(buf: np.ndarray, x: np.ndarray) -> int:
    k, f = x.shape
    u = np.zeros((k, f), np.uint16)
    raw = np.asarray(buf, np.uint8)
    hb = (f + 7) // 8
    if raw.size < 3 * hb:
        return -3
    const = np.unpackbits(raw[:hb], count=f).astype(bool)
    binary = np.unpackbits(raw[hb:2 * hb], count=f).astype(bool)
    sparse = np.unpackbits(raw[2 * hb:3 * hb], count=f).astype(bool)
    masked = binary | sparse
    dense = ~(const | masked)
    nc, nm, nd = int(const.sum()), int(masked.sum()), int(dense.sum())
    at = 3 * hb
    nbytes = (k * nm + 7) // 8
    if raw.size < at + 2 * nc + nbytes:
        return -3
    u[:, const] = np.frombuffer(raw[at:at + 2 * nc].tobytes(), np.uint16)
    at += 2 * nc
    nonzero = np.unpackbits(raw[at:at + nbytes], count=k * nm).reshape(nm, k).astype(bool)
    at += nbytes
    is_binary = binary[masked]
    u[:, binary] = nonzero[is_binary].T * np.uint16(_ONE_F16)
    sparse_nz = nonzero[~is_binary]
    n_values = int(sparse_nz.sum())
    if raw.size != at + 2 * n_values + 2 * k * nd:
        return -3
    su = np.zeros(sparse_nz.shape, np.uint16)
    su[sparse_nz] = np.frombuffer(raw[at:at + 2 * n_values].tobytes(), np.uint16)
    u[:, sparse] = su.T
    at += 2 * n_values
    u[:, dense] = np.frombuffer(raw[at:].tobytes(), np.uint16).reshape(k, nd)
    x[:] = u.view(np.float16).astype(np.float32)
    return 0
