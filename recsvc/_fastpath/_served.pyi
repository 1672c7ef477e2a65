"""Type stubs for the compiled served-slate feature codec (``_served.pyx``).

Call it through ``recsvc.state.served_ring`` (``encode_features`` / ``decode_features``), which rounds to
float16 and allocates the buffers. Negative returns: -1 a value beyond float16's range, -2 ``out`` too small,
-3 the bytes do not match the block's shape.
"""

import numpy as np
import numpy.typing as npt

def encode_features(x: npt.NDArray[np.float32], u: npt.NDArray[np.uint16], out: npt.NDArray[np.uint8]) -> int:
    """Encode the [k, F] block ``u`` (float16 bits of ``x``) into ``out``; the number of bytes written."""

def decode_features(buf: npt.NDArray[np.uint8], u: npt.NDArray[np.uint16]) -> int:
    """Decode ``buf`` into the [k, F] float16 bits ``u``; 0 when it matched."""
