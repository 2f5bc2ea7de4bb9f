/* KQ on a channel of 3x3 kernels (SQUANT_SPEC.md, 'KQ then CQ'), eight kernels at a time in
 * AVX2 registers: the native library's fast path for what kernels/kernel_pass.py's
 * ``transpose_in``, ``kernel_pass`` and ``transpose_out`` compute, with the same results bit for
 * bit (tests/test_native.py).
 *
 * It reads the channel w (element j of kernel i at i * 9 + j), transposes eight kernels in
 * registers and writes x = S*w - Z transposed (element j of kernel i at j * inner + i), so
 * element j of eight neighbouring kernels is one 8-float load. For each kernel: EQ (value =
 * rint(x), err = value - x), its error sum in float64 in element order (exact: errors of at least
 * 2**-17 are multiples of 2**-40, nine of them at most 0.5 each), the first three and the last of
 * its order (priority |e| where the element has a candidate in the sum's direction, else 0;
 * ties: lower index first), how many to flip (k = rint(|sum|)), the flips, the element handed on
 * to CQ, and its nine clamped codes, in w's layout.
 *
 * A kernel it cannot finish this way gets state -1 and is left to the caller (numba's
 * ``single_kernel_pass``, which also rewrites its codes): a kernel holding an error below 2**-17
 * (its sum needs the exact path), one that needs more than the first three of its order, and the
 * last inner % 8 kernels (of which it writes x alone).
 *
 * Built only for CPUs with AVX2 (kernels/native/build.py): elsewhere the library has no
 * squant_kernel_pass_3x3 and numba's code runs.
 */
#include <stdint.h>

#include "avx2_passes.h"

#define K 9

static inline __m256i lanes_of_pd_mask(__m256d lo, __m256d hi) {
    /* two masks of 4 float64 lanes -> one of 8 int32 lanes */
    __m128i a = _mm256_cvtpd_epi32(_mm256_and_pd(lo, _mm256_set1_pd(1.0)));
    __m128i b = _mm256_cvtpd_epi32(_mm256_and_pd(hi, _mm256_set1_pd(1.0)));
    return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_set_m128i(b, a));
}

/* x = S*w - Z of kernels i0 .. i0 + 7 into xs[j] (element j of the eight), and into the
 * transposed x. */
static inline void grid_x_transposed(const float *w, int64_t i0, int64_t inner, __m256 scale,
                                     __m256 zero, float *x, __m256 *xs) {
    const float *base = w + i0 * K;
    __m256 r0 = _mm256_loadu_ps(base), r1 = _mm256_loadu_ps(base + K);
    __m256 r2 = _mm256_loadu_ps(base + 2 * K), r3 = _mm256_loadu_ps(base + 3 * K);
    __m256 r4 = _mm256_loadu_ps(base + 4 * K), r5 = _mm256_loadu_ps(base + 5 * K);
    __m256 r6 = _mm256_loadu_ps(base + 6 * K), r7 = _mm256_loadu_ps(base + 7 * K);
    /* the 8x8 transpose of elements 0..7 */
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    __m256 rows[K];
    rows[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    rows[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    rows[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    rows[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    rows[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    rows[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    rows[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    rows[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
    rows[8] = _mm256_i32gather_ps(base + 8, _mm256_setr_epi32(0, K, 2 * K, 3 * K, 4 * K, 5 * K,
                                                              6 * K, 7 * K), 4);
    for (int j = 0; j < K; j++) {
        xs[j] = _mm256_sub_ps(_mm256_mul_ps(scale, rows[j]), zero);
        _mm256_storeu_ps(x + j * inner + i0, xs[j]);
    }
}

/* The clamped codes of eight kernels, row j holding element j of each in its low 8 bytes, into
 * their place in w's layout: codes + (i0 + l) * 9 + j. */
static inline void store_codes(const __m128i *rows, int8_t *codes, int64_t i0) {
    __m128i t0 = _mm_unpacklo_epi8(rows[0], rows[1]), t1 = _mm_unpacklo_epi8(rows[2], rows[3]);
    __m128i t2 = _mm_unpacklo_epi8(rows[4], rows[5]), t3 = _mm_unpacklo_epi8(rows[6], rows[7]);
    __m128i u0 = _mm_unpacklo_epi16(t0, t1), u1 = _mm_unpackhi_epi16(t0, t1);
    __m128i u2 = _mm_unpacklo_epi16(t2, t3), u3 = _mm_unpackhi_epi16(t2, t3);
    __m128i v[4] = {_mm_unpacklo_epi32(u0, u2), _mm_unpackhi_epi32(u0, u2),
                    _mm_unpacklo_epi32(u1, u3), _mm_unpackhi_epi32(u1, u3)};
    int8_t last[16];
    _mm_storeu_si128((__m128i *)last, rows[8]);
    int8_t *out = codes + i0 * K;
    for (int l = 0; l < 8; l++) { /* kernel l: elements 0..7 of v[l / 2], then element 8 */
        __m128i pair = v[l / 2];
        _mm_storel_epi64((__m128i *)(out + l * K), (l & 1) ? _mm_unpackhi_epi64(pair, pair) : pair);
        out[l * K + 8] = last[l];
    }
}

/* Kernels i0 .. i0 + 7. Adds their errors after the flips, and the errors' magnitudes, to the
 * float64 lanes of *sum and *magnitude. */
static inline void chunk8(const float *w, __m256 scale, __m256 zero, float *x, float *err,
                          float *value, int64_t inner, int64_t i0, __m256 t_min, __m256 t_max,
                          int64_t *state, int64_t *hand_index, uint8_t *hand_up,
                          float *hand_priority, __m256d *sum, __m256d *magnitude, int8_t *codes) {
    /* x, EQ's values and errors, and the candidates stay in the chunk's own arrays (in L1 at
     * any inner); the channel's value and err are written once, after the flips */
    __m256 xs[K], rs[K], es[K], cands[K];
    grid_x_transposed(w, i0, inner, scale, zero, x, xs);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 fine_bound = _mm256_set1_ps(FINE);
    __m256d tot_lo = _mm256_setzero_pd(), tot_hi = _mm256_setzero_pd();
    __m256 any_fine = _mm256_setzero_ps();
    for (int j = 0; j < K; j++) {
        __m256 xv = xs[j];
        __m256 r = _mm256_round_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 e = _mm256_sub_ps(r, xv);
        rs[j] = r;
        es[j] = e;
        __m256 a = _mm256_and_ps(e, abs_mask);
        __m256 coarse = _mm256_cmp_ps(a, fine_bound, _CMP_GE_OQ);
        __m256 nonzero = _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_NEQ_UQ);
        any_fine = _mm256_or_ps(any_fine, _mm256_andnot_ps(coarse, nonzero));
        __m256 ec = _mm256_and_ps(e, coarse);
        tot_lo = _mm256_add_pd(tot_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(ec)));
        tot_hi = _mm256_add_pd(tot_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(ec, 1)));
    }
    __m256d zero_pd = _mm256_setzero_pd();
    __m256 up = _mm256_castsi256_ps(lanes_of_pd_mask(_mm256_cmp_pd(tot_lo, zero_pd, _CMP_LT_OQ),
                                                     _mm256_cmp_pd(tot_hi, zero_pd, _CMP_LT_OQ)));
    __m256i p1 = _mm256_set1_epi32(-1), p2 = p1, p3 = p1, pl = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i j1 = _mm256_setzero_si256(), j2 = j1, j3 = j1, jl = j1;
    for (int j = 0; j < K; j++) {
        cands[j] = candidate(es[j], xs[j], up, t_min, t_max);
        __m256i p = _mm256_castps_si256(_mm256_and_ps(_mm256_and_ps(es[j], abs_mask), cands[j]));
        __m256i jv = _mm256_set1_epi32(j);
        __m256i above1 = _mm256_cmpgt_epi32(p, p1);
        __m256i above2 = _mm256_cmpgt_epi32(p, p2);
        __m256i above3 = _mm256_cmpgt_epi32(p, p3);
        __m256i not_low = _mm256_cmpgt_epi32(p, pl);
        /* the first three of the order so far (a later index never wins a tie), the last */
        j3 = _mm256_blendv_epi8(_mm256_blendv_epi8(j3, jv, above3), j2, above2);
        p3 = _mm256_blendv_epi8(_mm256_blendv_epi8(p3, p, above3), p2, above2);
        j2 = _mm256_blendv_epi8(_mm256_blendv_epi8(j2, jv, above2), j1, above1);
        p2 = _mm256_blendv_epi8(_mm256_blendv_epi8(p2, p, above2), p1, above1);
        j1 = _mm256_blendv_epi8(j1, jv, above1);
        p1 = _mm256_blendv_epi8(p1, p, above1);
        jl = _mm256_blendv_epi8(jv, jl, not_low);
        pl = _mm256_blendv_epi8(p, pl, not_low);
    }
    const __m256d sign_pd = _mm256_set1_pd(-0.0);
    __m256d m_lo = _mm256_andnot_pd(sign_pd, tot_lo), m_hi = _mm256_andnot_pd(sign_pd, tot_hi);
    __m256d k_lo = _mm256_round_pd(m_lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d k_hi = _mm256_round_pd(m_hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i over = lanes_of_pd_mask(_mm256_cmp_pd(k_lo, m_lo, _CMP_GE_OQ),
                                    _mm256_cmp_pd(k_hi, m_hi, _CMP_GE_OQ));
    __m256i k = _mm256_set_m128i(_mm256_cvtpd_epi32(k_hi), _mm256_cvtpd_epi32(k_lo));
    __m256i place = _mm256_add_epi32(k, over); /* over is -1 where true */
    __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2);
    __m256i general = _mm256_or_si256(_mm256_castps_si256(any_fine), _mm256_cmpgt_epi32(place, two));
    __m256i flips = _mm256_andnot_si256(general, k);
    __m256i handed = _mm256_blendv_epi8(j3, j2, _mm256_cmpeq_epi32(place, one));
    handed = _mm256_blendv_epi8(handed, j1, _mm256_cmpeq_epi32(place, _mm256_setzero_si256()));
    handed = _mm256_blendv_epi8(handed, jl, _mm256_cmpgt_epi32(_mm256_setzero_si256(), place));
    handed = _mm256_or_si256(handed, general); /* -1: no element of the kernel */
    __m256i flip1 = _mm256_cmpgt_epi32(flips, _mm256_setzero_si256());
    __m256i flip2 = _mm256_cmpgt_epi32(flips, one);
    __m256i flip3 = _mm256_cmpgt_epi32(flips, two);
    __m256 step = _mm256_or_ps(_mm256_and_ps(up, _mm256_set1_ps(1.0f)),
                               _mm256_andnot_ps(up, _mm256_set1_ps(-1.0f)));
    __m256 hp = _mm256_setzero_ps();
    __m128i code_rows[K];
    for (int j = 0; j < K; j++) {
        int64_t o = j * inner + i0;
        __m256 r = rs[j];
        __m256 e = es[j];
        __m256 cand = cands[j];
        __m256 fv = _mm256_blendv_ps(r, _mm256_add_ps(r, step), cand);
        __m256 fe = _mm256_and_ps(_mm256_add_ps(e, step), cand);
        __m256i jv = _mm256_set1_epi32(j);
        __m256 chosen = _mm256_castsi256_ps(_mm256_or_si256(_mm256_or_si256(
            _mm256_and_si256(flip1, _mm256_cmpeq_epi32(j1, jv)),
            _mm256_and_si256(flip2, _mm256_cmpeq_epi32(j2, jv))),
            _mm256_and_si256(flip3, _mm256_cmpeq_epi32(j3, jv))));
        __m256 nv = _mm256_blendv_ps(r, fv, chosen);
        __m256 ne = _mm256_blendv_ps(e, fe, chosen);
        _mm256_storeu_ps(value + o, nv);
        _mm256_storeu_ps(err + o, ne);
        __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(nv, t_min), t_max));
        __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        code_rows[j] = _mm_packs_epi16(q16, q16);
        __m256 ae = _mm256_and_ps(ne, abs_mask);
        sum[0] = _mm256_add_pd(sum[0], _mm256_cvtps_pd(_mm256_castps256_ps128(ne)));
        sum[1] = _mm256_add_pd(sum[1], _mm256_cvtps_pd(_mm256_extractf128_ps(ne, 1)));
        magnitude[0] = _mm256_add_pd(magnitude[0], _mm256_cvtps_pd(_mm256_castps256_ps128(ae)));
        magnitude[1] = _mm256_add_pd(magnitude[1], _mm256_cvtps_pd(_mm256_extractf128_ps(ae, 1)));
        hp = _mm256_blendv_ps(hp, _mm256_and_ps(ne, abs_mask),
                              _mm256_castsi256_ps(_mm256_cmpeq_epi32(handed, jv)));
    }
    _mm256_storeu_ps(hand_priority + i0, hp);
    store_codes(code_rows, codes, i0);
    int32_t st[8], hd[8], u[8], ov[8];
    _mm256_storeu_si256((__m256i *)st, _mm256_or_si256(flips, general));
    _mm256_storeu_si256((__m256i *)hd, handed);
    _mm256_storeu_si256((__m256i *)u, _mm256_castps_si256(up));
    _mm256_storeu_si256((__m256i *)ov, over);
    for (int l = 0; l < 8; l++) {
        state[i0 + l] = st[l];
        hand_index[i0 + l] = (i0 + l) * K + hd[l];
        hand_up[i0 + l] = (uint8_t)((u[l] ^ ov[l]) & 1);
    }
}

/* Runs the kernels of one channel: w (float32, 9 * inner, w's layout) on the grid (scale, zero,
 * t_min, t_max) into x, err, value (float32, 9 * inner, transposed), state (int64, inner: flips
 * made, or -1 where the caller must run the kernel), hand_index (int64, inner: i * 9 + j of the
 * element handed on), hand_up (uint8, inner), hand_priority (float32, inner) and codes (int8,
 * 9 * inner, w's layout; the caller rewrites those of kernels of state -1), all addresses; and
 * the channel's error sum after KQ (float64, see below) at channel_sum. Returns how many kernels
 * have state -1. */
int64_t squant_kernel_pass_3x3(int64_t w_, float scale_, float zero_, int64_t x_, int64_t err_,
                               int64_t value_, int64_t inner, float t_min, float t_max,
                               int64_t state_, int64_t hand_index_, int64_t hand_up_,
                               int64_t hand_priority_, int64_t channel_sum_, int64_t codes_) {
    const float *w = (const float *)w_;
    float *x = (float *)x_, *err = (float *)err_, *value = (float *)value_;
    float *hand_priority = (float *)hand_priority_;
    int64_t *state = (int64_t *)state_, *hand_index = (int64_t *)hand_index_;
    uint8_t *hand_up = (uint8_t *)hand_up_;
    int8_t *codes = (int8_t *)codes_;
    __m256 scale = _mm256_set1_ps(scale_), zero = _mm256_set1_ps(zero_);
    __m256 lo = _mm256_set1_ps(t_min), hi = _mm256_set1_ps(t_max);
    __m256d sum[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    __m256d magnitude[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    int64_t full = inner - inner % 8;
    for (int64_t i0 = 0; i0 < full; i0 += 8)
        chunk8(w, scale, zero, x, err, value, inner, i0, lo, hi, state, hand_index, hand_up,
               hand_priority, sum, magnitude, codes);
    for (int64_t i = full; i < inner; i++) /* the caller's: x alone */
        for (int j = 0; j < K; j++)
            x[j * inner + i] = scale_ * w[i * K + j] - zero_;
    int64_t general = 0;
    for (int64_t i = full; i < inner; i++) state[i] = -1;
    for (int64_t i = 0; i < inner; i++) general += state[i] < 0;
    /* The channel's error sum for CQ, when every kernel ran here: each error is a multiple of
     * 2**-40 (none below 2**-17 but 0: flipped ones are e +- 1 or 0), so while their magnitudes
     * sum below 2**13 every partial sum is exact in float64, in any order. Else NaN. */
    double s[4], m[4];
    _mm256_storeu_pd(s, _mm256_add_pd(sum[0], sum[1]));
    _mm256_storeu_pd(m, _mm256_add_pd(magnitude[0], magnitude[1]));
    double total = (s[0] + s[1]) + (s[2] + s[3]), size = (m[0] + m[1]) + (m[2] + m[3]);
    *(double *)channel_sum_ = (general == 0 && size < EXACT_BOUND) ? total : __builtin_nan("");
    return general;
}
