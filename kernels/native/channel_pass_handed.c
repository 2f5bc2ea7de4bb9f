/* CQ after KQ on one channel (SQUANT_SPEC.md, 'KQ then CQ') in C with AVX2 intrinsics: what
 * kernels/channel_pass.py's ``channel_pass_after_kernels`` and then ``transpose_out`` write
 * into the codes, bit for bit (tests/test_native.py), when the channel's codes are already
 * those of KQ (kernel_pass_3x3.c writes them).
 *
 * After KQ the only non-zero priorities are the ones the kernels handed on: kernel i's element
 * hand_index[i] with priority hand_priority[i] in the direction hand_up[i]. CQ flips the first
 * k = rint(|sum|) of the channel's order in the sum's direction: the handed-on elements of that
 * direction by priority (lower kernel first on ties), kept in a short sorted list while a vector
 * compare against the k-th priority so far skips the blocks of eight kernels that cannot enter
 * it. A channel with fewer such elements than k (CQ then flips elements of priority 0 too) or
 * more than MAX_FLIPS flips is left to numba's code (the function returns 0, having written
 * nothing).
 *
 * Built only for CPUs with AVX2 (kernels/native/build.py).
 */
#include <stdint.h>

#include "avx2_passes.h"

#define MAX_FLIPS 64

/* The channel held transposed (x: float32, ksize * inner, element j of kernel i at
 * j * inner + i), its kernels' hand-ons (hand_index: int64, hand_up: uint8, hand_priority:
 * float32, inner each), its error sum after KQ (total, exact) and its codes (int8, w's layout:
 * element j of kernel i at i * ksize + j), addresses as int64. Rewrites the codes of the
 * flipped elements. Returns 1, or 0 where numba's code must do the channel. */
int64_t squant_channel_pass_handed(int64_t x_, int64_t inner, int64_t ksize, float t_min,
                                   float t_max, int64_t hand_index_, int64_t hand_up_,
                                   int64_t hand_priority_, double total, int64_t codes_) {
    const float *x = (const float *)x_;
    const int64_t *hand_index = (const int64_t *)hand_index_;
    const uint8_t *hand_up = (const uint8_t *)hand_up_;
    const int32_t *priority = (const int32_t *)hand_priority_; /* >= 0: ordered as int32 */
    int8_t *codes = (int8_t *)codes_;
    double magnitude = __builtin_fabs(total);
    if (!(magnitude < 0x1p62)) /* flip_count: no flips on a grid whose sums overflow */
        return 1;
    double km = __builtin_rint(magnitude);
    if (km > MAX_FLIPS)
        return 0;
    int64_t k = (int64_t)km;
    if (k == 0)
        return 1;
    int up = total < 0.0;
    int32_t best_p[MAX_FLIPS];
    int64_t best_i[MAX_FLIPS];
    int64_t count = 0;
    int32_t threshold = 0; /* priority 0 never enters */
    const __m256i direction = _mm256_set1_epi32(up);
    for (int64_t i = 0; i < inner; i += 8) {
        int lanes = inner - i < 8 ? (int)(inner - i) : 8;
        unsigned entering; /* lanes of the direction whose priority beats the k-th so far */
        if (lanes == 8) {
            __m256i p = _mm256_loadu_si256((const __m256i *)(priority + i));
            __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(hand_up + i)));
            __m256i in = _mm256_and_si256(_mm256_cmpeq_epi32(u, direction),
                                          _mm256_cmpgt_epi32(p, _mm256_set1_epi32(threshold)));
            entering = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(in));
        } else {
            entering = 0;
            for (int l = 0; l < lanes; l++)
                entering |= (unsigned)(hand_up[i + l] == up) << l;
        }
        for (; entering; entering &= entering - 1) { /* in kernel order */
            int64_t c = i + __builtin_ctz(entering);
            int32_t p = priority[c];
            if (p <= threshold)
                continue;
            int64_t pos = count < k ? count : k - 1;
            while (pos > 0 && best_p[pos - 1] < p) {
                best_p[pos] = best_p[pos - 1];
                best_i[pos] = best_i[pos - 1];
                pos--;
            }
            best_p[pos] = p;
            best_i[pos] = c;
            if (count < k)
                count++;
            if (count == k)
                threshold = best_p[k - 1];
        }
    }
    if (count < k)
        return 0;
    for (int64_t t = 0; t < k; t++) {
        int64_t element = hand_index[best_i[t]];
        codes[element] = flipped_code(x[(element % ksize) * inner + element / ksize], up, t_min,
                                      t_max);
    }
    return 1;
}
