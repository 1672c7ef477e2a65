# The compact form of a served slate's logged features (recsvc.state.served_ring).
#
# recsvc.state.served_ring allocates the output; these kernels round the float32 [k, F] block to float16
# (numpy's algorithm, npy_floatbits_to_halfbits: round to nearest even, subnormals kept), choose each column's
# form and pack the bytes, and unpack them back to float32.
#
# Layout, shared with the twin (twins/served.py), hb = ceil(F / 8):
#   three bitmaps of F bits, numpy.packbits order (column 0 is the high bit of the first byte): constant
#   columns (bit-identical over the slate), 0/1 columns (every value +0.0 or 1.0), sparse columns (a bitmap
#   of the non-zero values and the values take fewer bits than every value: k + 16 nnz < 16 k);
#   the constant columns' values (uint16 each, in column order);
#   one bit stream, packed the same way: for each 0/1 and sparse column in column order, k bits (non-zero);
#   the sparse columns' non-zero values, column after column;
#   the dense columns row-major (k x n_dense).
# uint16 values are written in the machine's byte order (numpy's tobytes).
#
# Return value: bytes written (encode), 0 (decode), or a negative status: -1 a value beyond float16's range
# (|x| > 65504 or infinite: the caller keeps the float32 block), -2 the output is too small, -3 the encoded
# bytes do not match k and F.

from libc.math cimport fabs
from libc.stdint cimport uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from recsvc._fastpath._typedefs cimport float32_t, intp_t, uint8_t, uint32_t

cdef extern from *:
    """
    #include <stdint.h>
    /* numpy's npy_floatbits_to_halfbits (without the floating-point status flags) */
    static inline uint16_t recsvc_f32_to_f16(uint32_t f)
    {
        uint32_t f_exp, f_sig;
        uint16_t h_sgn, h_exp, h_sig, ret;
        h_sgn = (uint16_t)((f & 0x80000000u) >> 16);
        f_exp = f & 0x7f800000u;
        if (f_exp >= 0x47800000u) {
            if (f_exp == 0x7f800000u) {
                f_sig = f & 0x007fffffu;
                if (f_sig != 0) {
                    ret = (uint16_t)(0x7c00u + (f_sig >> 13));
                    if (ret == 0x7c00u) ret++;
                    return h_sgn + ret;
                }
                return (uint16_t)(h_sgn + 0x7c00u);
            }
            return (uint16_t)(h_sgn + 0x7c00u);
        }
        if (f_exp <= 0x38000000u) {
            if (f_exp < 0x33000000u) return h_sgn;
            f_exp >>= 23;
            f_sig = 0x00800000u + (f & 0x007fffffu);
            f_sig >>= (113 - f_exp);
            if (((f_sig & 0x00003fffu) != 0x00001000u) || (f & 0x000007ffu)) f_sig += 0x00001000u;
            h_sig = (uint16_t)(f_sig >> 13);
            return (uint16_t)(h_sgn + h_sig);
        }
        h_exp = (uint16_t)((f_exp - 0x38000000u) >> 13);
        f_sig = f & 0x007fffffu;
        if ((f_sig & 0x00003fffu) != 0x00001000u) f_sig += 0x00001000u;
        h_sig = (uint16_t)(f_sig >> 13);
        h_sig += h_exp;
        return (uint16_t)(h_sgn + h_sig);
    }
    /* numpy's npy_halfbits_to_floatbits */
    static inline uint32_t recsvc_f16_to_f32(uint16_t h)
    {
        uint16_t h_exp = h & 0x7c00u, h_sig;
        uint32_t f_sgn = ((uint32_t)h & 0x8000u) << 16, f_exp, f_sig;
        switch (h_exp) {
        case 0x0000u:
            h_sig = h & 0x03ffu;
            if (h_sig == 0) return f_sgn;
            h_sig <<= 1;
            while ((h_sig & 0x0400u) == 0) { h_sig <<= 1; h_exp++; }
            f_exp = ((uint32_t)(127 - 15 - h_exp)) << 23;
            f_sig = ((uint32_t)(h_sig & 0x03ffu)) << 13;
            return f_sgn + f_exp + f_sig;
        case 0x7c00u:
            return f_sgn + 0x7f800000u + (((uint32_t)(h & 0x03ffu)) << 13);
        default:
            return f_sgn + (((uint32_t)(h & 0x7fffu) + 0x1c000u) << 13);
        }
    }
    """
    uint16_t recsvc_f32_to_f16(uint32_t f) nogil
    uint32_t recsvc_f16_to_f32(uint16_t h) nogil

cdef enum:
    ONE_F16 = 0x3C00


cdef inline void set_bit(uint8_t* bits, intp_t i) noexcept nogil:
    bits[i >> 3] |= <uint8_t>(0x80 >> (i & 7))


cdef inline bint get_bit(const uint8_t* bits, intp_t i) noexcept nogil:
    return (bits[i >> 3] >> (7 - (i & 7))) & 1


cdef intp_t encode_kernel(const float32_t* x,       # IN  [k, f] the block as logged
                          const uint16_t* u,        # IN  [k, f] the same, float16 bits
                          intp_t k, intp_t f,
                          uint8_t* out,             # OUT the encoded bytes
                          intp_t cap) noexcept nogil:
    cdef intp_t hb = (f + 7) // 8, i, j, n_masked = 0, nnz, at, bit
    cdef bint const_, binary
    cdef uint16_t v, first
    if cap < 3 * hb:
        return -2
    for i in range(k * f):
        if fabs(x[i]) > 65504.0:
            return -1
    for i in range(3 * hb):
        out[i] = 0
    if k == 0:  # no values: every column dense (and empty)
        return 3 * hb
    for j in range(f):
        first = u[j]
        const_ = True
        binary = True
        nnz = 0
        for i in range(k):
            v = u[i * f + j]
            if v != first:
                const_ = False
            if v != 0:
                nnz += 1
                if v != ONE_F16:
                    binary = False
        if const_:
            set_bit(out, j)
        elif binary:
            set_bit(out + hb, j)
            n_masked += 1
        elif k + 16 * nnz < 16 * k:
            set_bit(out + 2 * hb, j)
            n_masked += 1
    at = 3 * hb
    for j in range(f):  # constant values
        if get_bit(out, j):
            if at + 2 > cap:
                return -2
            memcpy(out + at, &u[j], 2)
            at += 2
    nnz = (k * n_masked + 7) // 8  # the non-zero bitmaps
    if at + nnz > cap:
        return -2
    for i in range(nnz):
        out[at + i] = 0
    bit = 0
    for j in range(f):
        if get_bit(out + hb, j) or get_bit(out + 2 * hb, j):
            for i in range(k):
                if u[i * f + j] != 0:
                    set_bit(out + at, bit)
                bit += 1
    at += nnz
    for j in range(f):  # sparse values
        if get_bit(out + 2 * hb, j):
            for i in range(k):
                if u[i * f + j] != 0:
                    if at + 2 > cap:
                        return -2
                    memcpy(out + at, &u[i * f + j], 2)
                    at += 2
    for i in range(k):  # dense, row-major
        for j in range(f):
            if not (get_bit(out, j) or get_bit(out + hb, j) or get_bit(out + 2 * hb, j)):
                if at + 2 > cap:
                    return -2
                memcpy(out + at, &u[i * f + j], 2)
                at += 2
    return at


cdef intp_t decode_kernel(const uint8_t* buf, intp_t n,  # IN  the encoded bytes
                          intp_t k, intp_t f,
                          uint16_t* u) noexcept nogil:   # OUT [k, f] float16 bits
    cdef intp_t hb = (f + 7) // 8, i, j, at, bit = 0, masks, n_masked = 0
    cdef uint16_t v
    if n < 3 * hb:
        return -3
    at = 3 * hb
    for j in range(f):
        if get_bit(buf, j):
            if at + 2 > n:
                return -3
            memcpy(&v, buf + at, 2)
            at += 2
            for i in range(k):
                u[i * f + j] = v
        elif get_bit(buf + hb, j) or get_bit(buf + 2 * hb, j):
            n_masked += 1
    masks = at
    at += (k * n_masked + 7) // 8
    if at > n:
        return -3
    for j in range(f):
        if get_bit(buf + hb, j):
            for i in range(k):
                u[i * f + j] = ONE_F16 if get_bit(buf + masks, bit) else 0
                bit += 1
        elif get_bit(buf + 2 * hb, j):
            for i in range(k):
                if get_bit(buf + masks, bit):
                    if at + 2 > n:
                        return -3
                    memcpy(&u[i * f + j], buf + at, 2)
                    at += 2
                else:
                    u[i * f + j] = 0
                bit += 1
    for i in range(k):
        for j in range(f):
            if not (get_bit(buf, j) or get_bit(buf + hb, j) or get_bit(buf + 2 * hb, j)):
                if at + 2 > n:
                    return -3
                memcpy(&u[i * f + j], buf + at, 2)
                at += 2
    return 0 if at == n else -3


def encode_features(const uint8_t[::1] block, intp_t k, intp_t f, uint8_t[::1] out, intp_t at) -> int:
    """Encode ``block`` (the bytes of a float32 [k, F] block) into ``out[at:]``; bytes written, or -1 / -2."""
    cdef intp_t n = k * f, i, r
    cdef uint32_t bits
    cdef float32_t* x
    cdef uint16_t* u
    if k < 0 or f < 0 or block.shape[0] != 4 * n or at < 0 or at > out.shape[0]:
        raise ValueError(f"a {k} x {f} float32 block is {4 * n} bytes, got {block.shape[0]} "
                         f"(writing at {at} of {out.shape[0]})")
    cdef uint8_t* dst = &out[0] + at if out.shape[0] else NULL
    if n == 0:
        return encode_kernel(NULL, NULL, k, f, dst, out.shape[0] - at)
    with nogil:
        x = <float32_t*>malloc(n * (sizeof(float32_t) + sizeof(uint16_t)))
        if x == NULL:
            r = -4
        else:
            u = <uint16_t*>(x + n)
            memcpy(x, &block[0], 4 * n)
            for i in range(n):
                memcpy(&bits, x + i, 4)
                u[i] = recsvc_f32_to_f16(bits)
            r = encode_kernel(x, u, k, f, dst, out.shape[0] - at)
            free(x)
    if r == -4:
        raise MemoryError()
    return r


def decode_features(const uint8_t[::1] buf, float32_t[:, ::1] x) -> int:
    """Decode ``buf`` into ``x`` (its shape is the slate's [k, F]); 0, or -3 when they do not match."""
    cdef intp_t r, i, n = x.shape[0] * x.shape[1]
    cdef uint32_t bits
    cdef uint16_t* u
    if n == 0:
        return 0 if buf.shape[0] == 3 * ((x.shape[1] + 7) // 8) else -3
    with nogil:
        u = <uint16_t*>malloc(n * sizeof(uint16_t))
        if u == NULL:
            r = -4
        else:
            r = decode_kernel(&buf[0] if buf.shape[0] else NULL, buf.shape[0], x.shape[0], x.shape[1], u)
            if r == 0:
                for i in range(n):
                    bits = recsvc_f16_to_f32(u[i])
                    memcpy(&x[0, 0] + i, &bits, 4)
            free(u)
    if r == -4:
        raise MemoryError()
    return r
