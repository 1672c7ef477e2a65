/* Shared C helpers of the compiled kernels (included by _ranking.pyx and
 * _reranking.pyx): GCC/Clang vector extensions give explicit SIMD (8 floats at
 * a time) without -ffast-math, and on x86-64 Linux with GCC >= 12 each helper
 * is also compiled for x86-64-v3 (AVX2 + FMA) and picked at load time
 * (target_clones), so one build runs everywhere and uses FMA where present. */
#ifndef RECSVC_SIMD_H
#define RECSVC_SIMD_H

#include <stddef.h>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define RECSVC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RECSVC_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
typedef float recsvc_v8 __attribute__((vector_size(32)));
typedef float recsvc_v8u __attribute__((vector_size(32), aligned(4), may_alias));
#define RECSVC_LD(p) (*(const recsvc_v8u *)(p))
#define RECSVC_ST(p, v) (*(recsvc_v8u *)(p) = (v))
#define RECSVC_SIMD 1
#else
#define RECSVC_SIMD 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RECSVC_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 1)
#else
#define RECSVC_PREFETCH(p) ((void)0)
#endif

/* a . b */
RECSVC_CLONES
static float recsvc_dot(const float *restrict a, const float *restrict b, ptrdiff_t n)
{
    float s = 0.0f;
    ptrdiff_t t = 0;
#if RECSVC_SIMD
    recsvc_v8 acc0 = {0}, acc1 = {0};
    for (; t + 16 <= n; t += 16) {
        acc0 += RECSVC_LD(a + t) * RECSVC_LD(b + t);
        acc1 += RECSVC_LD(a + t + 8) * RECSVC_LD(b + t + 8);
    }
    for (; t + 8 <= n; t += 8)
        acc0 += RECSVC_LD(a + t) * RECSVC_LD(b + t);
    acc0 += acc1;
    s = ((acc0[0] + acc0[1]) + (acc0[2] + acc0[3])) + ((acc0[4] + acc0[5]) + (acc0[6] + acc0[7]));
#endif
    for (; t < n; t++)
        s += a[t] * b[t];
    return s;
}

#endif /* RECSVC_SIMD_H */
