/* Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
 *
 * Fused single-pass CPU folds of the streaming merge (hf_magmax.checkpoints._merged_blocks), in plain C, loaded with
 * ctypes by hf_magmax/merging/kernels.py. No Python C-API: every function takes raw pointers and element counts.
 *
 * Every function computes, per element, exactly what the torch path computes (IEEE fp32 arithmetic in the same order,
 * no FMA contraction: build with -ffp-contract=off), and returns a non-zero flag when it saw a non-finite value; the
 * caller then redoes the block on the torch path, which raises the usual errors or computes the same bits. So the C
 * path only ever emits results for blocks whose inputs and output are finite.
 *
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16 (little-endian IEEE bit patterns).
 *
 * setup.py builds this file up to three times on x86-64: `_fold` (the baseline ISA), `_fold_avx2` (-mavx2) and
 * `_fold_avx512` (-mavx512f/bw/vl/dq); kernels.py loads the best one that torch's CPU capability allows. The bits are
 * the same in every build (IEEE operations, no contraction); only the vector width differs.
 */

#include <stdint.h>
#include <string.h>

#define HFM_ABI_VERSION 1

#if defined(_WIN32)
#define HFM_API __declspec(dllexport)
#else
#define HFM_API __attribute__((visibility("default")))
#endif

typedef int64_t i64;

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* exact fp16 -> fp32 (the FP16 library's fp16_ieee_to_fp32_value, which c10::Half uses) */
static inline float fp16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = UINT32_C(0xE0) << 23;
    const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (UINT32_C(1) << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return f32_from_bits(result);
}

/* fp32 -> bf16, round to nearest even (torch's rounding; NaN never reaches here: the caller checks finiteness) */
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    return (uint16_t)((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
}

/* fp32 -> fp16, round to nearest even (the FP16 library's fp16_ieee_from_fp32_value, which c10::Half uses) */
static inline uint16_t f32_to_fp16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
    base = f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
}

/* |x| as bits is below +inf's: finite */
static inline uint32_t nonfinite(float x) { return (f32_bits(x) & UINT32_C(0x7FFFFFFF)) >= UINT32_C(0x7F800000); }

HFM_API int hfm_abi_version(void) { return HFM_ABI_VERSION; }

/* ---- θ_0 in fp32 --------------------------------------------------------------------------------------------- */

HFM_API int hfm_widen(const void *src, int dtype, float *out, i64 n) {
    uint32_t bad = 0;
    if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)src;
        for (i64 i = 0; i < n; i++) {
            float x = bf16_to_f32(s[i]);
            out[i] = x;
            bad |= nonfinite(x);
        }
    } else if (dtype == 2) {
        const uint16_t *s = (const uint16_t *)src;
        for (i64 i = 0; i < n; i++) {
            float x = fp16_to_f32(s[i]);
            out[i] = x;
            bad |= nonfinite(x);
        }
    } else {
        const float *s = (const float *)src;
        for (i64 i = 0; i < n; i++) {
            out[i] = s[i];
            bad |= nonfinite(s[i]);
        }
    }
    return (int)bad;
}

/* ---- the folds: τ = fp32(θ_t) − θ_0 and the method's update, one pass ---------------------------------------- */

/* The body of a fold (the macro's arguments), per element i, over the three input dtypes of θ_t; `tau` is
 * fp32(θ_t[i]) − θ_0[i]. */
#define HFM_DISPATCH(...)                                         \
    if (dtype == 1) {                                             \
        const uint16_t *s = (const uint16_t *)theta_t;            \
        _Pragma("GCC ivdep") for (i64 i = 0; i < n; i++) {        \
            const float tau = bf16_to_f32(s[i]) - theta_0[i];     \
            __VA_ARGS__                                           \
        }                                                         \
    } else if (dtype == 2) {                                      \
        const uint16_t *s = (const uint16_t *)theta_t;            \
        _Pragma("GCC ivdep") for (i64 i = 0; i < n; i++) {        \
            const float tau = fp16_to_f32(s[i]) - theta_0[i];     \
            __VA_ARGS__                                           \
        }                                                         \
    } else {                                                      \
        const float *s = (const float *)theta_t;                  \
        _Pragma("GCC ivdep") for (i64 i = 0; i < n; i++) {        \
            const float tau = s[i] - theta_0[i];                  \
            __VA_ARGS__                                           \
        }                                                         \
    }

/* MagMax. first: selected = τ. Else, with a = bits(|τ|), b = bits(|selected|) (finite: a NaN sets the flag and the
 * block is redone on the torch path), the later task wins ties: a >= b. winners (uint8, may be NULL) get `task`. */
HFM_API int hfm_magmax_fold(const void *theta_t, int dtype, const float *theta_0, float *selected, uint8_t *winners,
                               int task, int first, i64 n) {
    uint32_t bad = 0;
    if (first) {
        HFM_DISPATCH(selected[i] = tau; bad |= nonfinite(tau);)
        return (int)bad;
    }
    const uint8_t t8 = (uint8_t)task;
    if (winners) {
        HFM_DISPATCH({
            const uint32_t a = f32_bits(tau) & UINT32_C(0x7FFFFFFF);
            const uint32_t b = f32_bits(selected[i]) & UINT32_C(0x7FFFFFFF);
            const int take = a >= b;
            selected[i] = take ? tau : selected[i];
            winners[i] = take ? t8 : winners[i];
            bad |= a >= UINT32_C(0x7F800000);
        })
    } else {
        HFM_DISPATCH({
            const uint32_t a = f32_bits(tau) & UINT32_C(0x7FFFFFFF);
            const uint32_t b = f32_bits(selected[i]) & UINT32_C(0x7FFFFFFF);
            selected[i] = a >= b ? tau : selected[i];
            bad |= a >= UINT32_C(0x7F800000);
        })
    }
    return (int)bad;
}

/* task_arithmetic / average. first: total = τ; else total = total + τ. */
HFM_API int hfm_sum_fold(const void *theta_t, int dtype, const float *theta_0, float *total, int first, i64 n) {
    uint32_t bad = 0;
    if (first) {
        HFM_DISPATCH(total[i] = tau; bad |= nonfinite(tau);)
    } else {
        HFM_DISPATCH(total[i] = total[i] + tau; bad |= nonfinite(tau);)
    }
    return (int)bad;
}

/* TIES: trimmed = |τ| >= threshold ? τ : 0 (threshold 0 keeps every finite τ: density 1); positive trimmed values go
 * to pos_sum/pos_count, negative ones to neg_sum/neg_count (adding +0.0 or -0.0 to the others leaves their bits:
 * the sums start at +0.0). The four state arrays start at +0.0 (the caller zeroes them). */
HFM_API int hfm_ties_fold(const void *theta_t, int dtype, const float *theta_0, float threshold, float *pos_sum,
                             float *neg_sum, float *pos_count, float *neg_count, i64 n) {
    uint32_t bad = 0;
    HFM_DISPATCH({
        const float kept = __builtin_fabsf(tau) >= threshold ? tau : 0.0f;
        const int positive = kept > 0.0f;
        const int negative = kept < 0.0f;
        /* branch-free: adding +0.0 leaves a sum that is not -0.0 unchanged, and the sums never are -0.0 */
        pos_sum[i] = pos_sum[i] + (positive ? kept : 0.0f);
        pos_count[i] = pos_count[i] + (positive ? 1.0f : 0.0f);
        neg_sum[i] = neg_sum[i] + (negative ? kept : 0.0f);
        neg_count[i] = neg_count[i] + (negative ? 1.0f : 0.0f);
        bad |= nonfinite(tau);
    })
    return (int)bad;
}

/* TIES' threshold: the bit patterns of |τ| of n <= HFM_CHUNK elements into keys (one vectorized pass); non-zero if
 * one is not finite. The histograms below then count from this cache-hot buffer. */
#define HFM_CHUNK 2048

static int magnitude_keys(const void *theta_t, int dtype, const float *theta_0, uint32_t *keys, i64 n) {
    uint32_t bad = 0;
    HFM_DISPATCH({
        const uint32_t a = f32_bits(tau) & UINT32_C(0x7FFFFFFF);
        keys[i] = a;
        bad |= a >= UINT32_C(0x7F800000);
    })
    return (int)bad;
}

static inline const void *advance(const void *theta_t, int dtype, i64 offset) {
    return (const char *)theta_t + offset * (dtype == 0 ? 4 : 2);
}

/* TIES' threshold, pass 1: histogram (hist[32768], added to) of the high 16 bits of |τ|. */
HFM_API int hfm_diff_hist_high(const void *theta_t, int dtype, const float *theta_0, i64 *hist, i64 n) {
    uint32_t keys[HFM_CHUNK];
    int bad = 0;
    for (i64 start = 0; start < n; start += HFM_CHUNK) {
        const i64 m = n - start < HFM_CHUNK ? n - start : HFM_CHUNK;
        bad |= magnitude_keys(advance(theta_t, dtype, start), dtype, theta_0 + start, keys, m);
        for (i64 j = 0; j < m; j++) hist[keys[j] >> 16]++;
    }
    return bad;
}

/* TIES' threshold, pass 2: histogram (hist[65536], added to) of the low 16 bits of the |τ| whose high bits are
 * `bucket`: the matches of a chunk are gathered without a branch (the bucket may hold a fifth of the elements: a
 * branch on it would be mispredicted), then counted. */
HFM_API void hfm_diff_hist_low(const void *theta_t, int dtype, const float *theta_0, int bucket, i64 *hist, i64 n) {
    uint32_t keys[HFM_CHUNK];
    uint16_t found[HFM_CHUNK];
    const uint32_t want = (uint32_t)bucket;
    for (i64 start = 0; start < n; start += HFM_CHUNK) {
        const i64 m = n - start < HFM_CHUNK ? n - start : HFM_CHUNK;
        magnitude_keys(advance(theta_t, dtype, start), dtype, theta_0 + start, keys, m);
        i64 count = 0;
        for (i64 j = 0; j < m; j++) {
            found[count] = (uint16_t)(keys[j] & 0xFFFF);
            count += (keys[j] >> 16) == want;
        }
        for (i64 j = 0; j < count; j++) hist[found[j]]++;
    }
}

/* ---- the merged block: θ_0 + λ · merged, cast to the output dtype --------------------------------------------- */

/* The three output branches of a merged block: element i's fp32 value `VALUE` (an expression of i) written to `out` in
 * `out_dtype` (1 bf16, 2 fp16, else fp32), `bad` set if an output is not finite. One loop per dtype, so that each
 * vectorizes; a macro, not a function, so that `VALUE` is inlined into it. */
#define HFM_STORE_MERGED(VALUE)                                                                                      \
    do {                                                                                                             \
        if (out_dtype == 1) {                                                                                        \
            uint16_t *o = (uint16_t *)out;                                                                           \
            for (i64 i = 0; i < n; i++) {                                                                            \
                const uint16_t h = f32_to_bf16(VALUE);                                                               \
                o[i] = h;                                                                                            \
                bad |= (h & 0x7F80u) == 0x7F80u;                                                                     \
            }                                                                                                        \
        } else if (out_dtype == 2) {                                                                                 \
            uint16_t *o = (uint16_t *)out;                                                                           \
            for (i64 i = 0; i < n; i++) {                                                                            \
                const uint16_t h = f32_to_fp16(VALUE);                                                               \
                o[i] = h;                                                                                            \
                bad |= (h & 0x7C00u) == 0x7C00u;                                                                     \
            }                                                                                                        \
        } else {                                                                                                     \
            float *o = (float *)out;                                                                                 \
            for (i64 i = 0; i < n; i++) {                                                                            \
                const float x = (VALUE);                                                                             \
                o[i] = x;                                                                                            \
                bad |= nonfinite(x);                                                                                 \
            }                                                                                                        \
        }                                                                                                            \
    } while (0)

/* out = fp32(merged[i] * coef) + theta_0[i], written in `out_dtype`; non-zero if an output is not finite. */
HFM_API int hfm_apply(const float *theta_0, const float *merged, float coef, void *out, int out_dtype, i64 n) {
    uint32_t bad = 0;
    HFM_STORE_MERGED(merged[i] * coef + theta_0[i]);
    return (int)bad;
}

/* TIES' disjoint mean of element i: elected = pos_sum + neg_sum >= 0; total / max(count, 1) where count > 0, else 0 */
static inline float ties_merged(const float *pos_sum, const float *neg_sum, const float *pos_count,
                                const float *neg_count, i64 i) {
    const float p = pos_sum[i], q = neg_sum[i], pc = pos_count[i], nc = neg_count[i];
    const int elected_positive = (p + q) >= 0.0f;
    const float total = elected_positive ? p : q;
    const float count = elected_positive ? pc : nc;
    const float mean = total / (count < 1.0f ? 1.0f : count); /* count.clamp(min=1): never 0 */
    return count > 0.0f ? mean : 0.0f;
}

/* TIES' result and the merged block in one pass: as hfm_apply with merged = the disjoint mean. */
HFM_API int hfm_ties_apply(const float *theta_0, const float *pos_sum, const float *neg_sum, const float *pos_count,
                              const float *neg_count, float coef, void *out, int out_dtype, i64 n) {
    uint32_t bad = 0;
    HFM_STORE_MERGED(ties_merged(pos_sum, neg_sum, pos_count, neg_count, i) * coef + theta_0[i]);
    return (int)bad;
}
