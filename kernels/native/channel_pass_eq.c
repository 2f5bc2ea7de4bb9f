/* CQ straight after EQ on one channel (SQUANT_SPEC.md; no KQ ran: kernels of one element, as
 * in 1x1 convolutions and Linear layers, or mode C) in C with AVX2 intrinsics: what
 * kernels/channel_pass.py's ``channel_pass_eq`` writes into the codes, bit for bit
 * (tests/test_native.py).
 *
 * Pass 1, eight weights at a time: x = S*w - Z, EQ, the clamped codes, and the error sum in
 * float64. It is exact in any order while every error is at least 2**-17 (a multiple of 2**-40)
 * and their magnitudes sum below 2**13 (kernels/exact_sum.py); a channel where that fails, or
 * where an x is not finite, or that needs more than MAX_FLIPS flips, is left to numba's code
 * (the function returns 0). Pass 2: the first k = rint(|sum|) of the order (priority |e| where
 * the element has a candidate in the sum's direction, else 0; lower index first on ties), kept
 * in a short sorted list while a vector compare against the k-th priority so far skips the
 * blocks of eight that cannot enter it, first among the priorities above a level that about
 * 2k + 8 elements pass (a second scan takes all if fewer than k do); then their flips, clamped.
 *
 * Built only for CPUs with AVX2 (kernels/native/build.py).
 */
#include <stdint.h>

#include "avx2_passes.h"

#define MAX_FLIPS 64

static inline __m256 grid_x(const float *w, int64_t i, __m256 scale, __m256 zero) {
    return _mm256_sub_ps(_mm256_mul_ps(scale, _mm256_loadu_ps(w + i)), zero);
}

/* The first k (<= MAX_FLIPS) of the channel's order among its elements of priority above
 * floor (as int32 bits; -1: all of them), into best_p and best_i, largest priority first and
 * lower index first on ties. Returns how many it found (k, or fewer if fewer are above floor). */
static int64_t first_of_order(const float *w, int64_t size, float scale_, float zero_, float t_min,
                              float t_max, int up, int64_t k, int32_t floor, int32_t *best_p,
                              int64_t *best_i) {
    const __m256 scale = _mm256_set1_ps(scale_), zero = _mm256_set1_ps(zero_);
    const __m256 lo = _mm256_set1_ps(t_min), hi = _mm256_set1_ps(t_max);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 up_mask = _mm256_castsi256_ps(_mm256_set1_epi32(up ? -1 : 0));
    int64_t count = 0;
    int32_t threshold = floor;
    for (int64_t i = 0; i < size; i += 8) {
        int lanes = size - i < 8 ? (int)(size - i) : 8;
        int32_t p[8];
        unsigned entering; /* lanes whose priority beats the k-th so far */
        if (lanes == 8) {
            __m256 x = grid_x(w, i, scale, zero);
            __m256 e = _mm256_sub_ps(_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), x);
            __m256 cand = candidate(e, x, up_mask, lo, hi);
            __m256i pv = _mm256_castps_si256(_mm256_and_ps(_mm256_and_ps(e, abs_mask), cand));
            entering = (unsigned)_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(pv, _mm256_set1_epi32(threshold))));
            if (!entering)
                continue;
            _mm256_storeu_si256((__m256i *)p, pv);
        } else {
            entering = 0;
            for (int l = 0; l < lanes; l++) {
                float x = scale_ * w[i + l] - zero_;
                float e = __builtin_rintf(x) - x;
                float a = has_candidate(e, x, up, t_min, t_max) ? __builtin_fabsf(e) : 0.0f;
                __builtin_memcpy(&p[l], &a, 4);
                entering |= 1u << l;
            }
        }
        for (; entering; entering &= entering - 1) { /* in index order */
            int l = __builtin_ctz(entering);
            if (p[l] <= threshold)
                continue;
            int64_t pos = count < k ? count : k - 1;
            while (pos > 0 && best_p[pos - 1] < p[l]) {
                best_p[pos] = best_p[pos - 1];
                best_i[pos] = best_i[pos - 1];
                pos--;
            }
            best_p[pos] = p[l];
            best_i[pos] = i + l;
            if (count < k)
                count++;
            if (count == k)
                threshold = best_p[k - 1];
        }
    }
    return count;
}

/* The channel w (float32, size elements) on the grid (S, Z, t_min, t_max) into codes (int8),
 * addresses as int64. Returns 1, or 0 where numba's code must do the channel (see above). */
int64_t squant_channel_pass_eq(int64_t w_, int64_t size, float scale_, float zero_, float t_min,
                               float t_max, int64_t codes_) {
    const float *w = (const float *)w_;
    int8_t *codes = (int8_t *)codes_;
    const __m256 scale = _mm256_set1_ps(scale_), zero = _mm256_set1_ps(zero_);
    const __m256 lo = _mm256_set1_ps(t_min), hi = _mm256_set1_ps(t_max);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 fine_bound = _mm256_set1_ps(FINE);
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    __m256d total0 = _mm256_setzero_pd(), total1 = total0, mag0 = total0, mag1 = total0;
    __m256 bad = _mm256_setzero_ps();
    int64_t full = size - size % 8, i;
    for (i = 0; i < full; i += 8) {
        __m256 x = grid_x(w, i, scale, zero);
        __m256 r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 e = _mm256_sub_ps(r, x);
        __m256 a = _mm256_and_ps(e, abs_mask);
        __m256 coarse = _mm256_cmp_ps(a, fine_bound, _CMP_GE_OQ);
        /* not finite, or too fine for the fast sum: numba's code does the channel */
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), inf, _CMP_NLT_UQ));
        bad = _mm256_or_ps(bad, _mm256_andnot_ps(coarse, _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ)));
        __m256 c = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        __m256i q = _mm256_cvtps_epi32(c);
        __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(codes + i), _mm_packs_epi16(q16, q16));
        total0 = _mm256_add_pd(total0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        total1 = _mm256_add_pd(total1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        mag0 = _mm256_add_pd(mag0, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        mag1 = _mm256_add_pd(mag1, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    }
    if (_mm256_movemask_ps(bad))
        return 0;
    double t[4], m[4];
    _mm256_storeu_pd(t, _mm256_add_pd(total0, total1));
    _mm256_storeu_pd(m, _mm256_add_pd(mag0, mag1));
    double total = (t[0] + t[1]) + (t[2] + t[3]), magnitude = (m[0] + m[1]) + (m[2] + m[3]);
    for (; i < size; i++) {
        float x = scale_ * w[i] - zero_;
        float r = __builtin_rintf(x);
        float e = r - x;
        float a = __builtin_fabsf(e);
        if (!(a < __builtin_inff()) || !(x - x == 0.0f) || (a < FINE && e != 0.0f))
            return 0;
        codes[i] = (int8_t)clamp(r, t_min, t_max);
        total += (double)e;
        magnitude += (double)a;
    }
    if (magnitude >= EXACT_BOUND)
        return 0;
    /* total is exact (every error a multiple of 2**-40, all partial sums below 2**13) */
    int up = total < 0.0;
    double km = __builtin_rint(__builtin_fabs(total));
    if (km > MAX_FLIPS)
        return 0;
    int64_t k = (int64_t)km;
    if (k == 0)
        return 1;
    /* the first k of the order: largest priority, lowest index on ties. About size / 2
     * elements have a candidate in the direction, their priorities spread over [0, 0.5]: first
     * among those above a level that about 2k + 8 of them should pass (most blocks of eight
     * then skip at once), and among all if fewer than k do. */
    int32_t best_p[MAX_FLIPS];
    int64_t best_i[MAX_FLIPS];
    int64_t count = 0;
    float level = (float)(0.5 - (2.0 * (double)k + 8.0) / (double)size);
    if (level > 0.0f) {
        int32_t bits;
        __builtin_memcpy(&bits, &level, 4);
        count = first_of_order(w, size, scale_, zero_, t_min, t_max, up, k, bits - 1, best_p,
                               best_i);
    }
    if (count < k)
        count = first_of_order(w, size, scale_, zero_, t_min, t_max, up, k, -1, best_p, best_i);
    for (int64_t t = 0; t < count; t++)
        codes[best_i[t]] = flipped_code(scale_ * w[best_i[t]] - zero_, up, t_min, t_max);
    return 1;
}
