/* What squant's passes in C with AVX2 intrinsics share (kernel_pass_3x3.c, channel_pass_eq.c,
 * channel_pass_handed.c): the exact-sum constants of kernels/exact_sum.py, the flip candidate
 * test of kernels/grid.py's ``has_candidate`` (eight lanes at a time, and one element), and one
 * element's clamped code after grid.py's ``flip``. */
#ifndef SQUANT_AVX2_PASSES_H
#define SQUANT_AVX2_PASSES_H

#include <immintrin.h>
#include <stdint.h>

/* 2**-17: errors at least this large are multiples of 2**-40 (exact_sum.py's FINE) */
#define FINE 7.62939453125e-06f
/* below 2**13: sums of such errors are exact in float64, in any order (exact_sum.py) */
#define EXACT_BOUND 8000.0

/* All ones where the element at x with EQ error e has a flip candidate in its lane's direction
 * (up all ones: e < 0 and x < t_max; else e > 0 and x > t_min). */
static inline __m256 candidate(__m256 e, __m256 x, __m256 up, __m256 t_min, __m256 t_max) {
    __m256 zero = _mm256_setzero_ps();
    __m256 up_ok = _mm256_and_ps(_mm256_cmp_ps(e, zero, _CMP_LT_OQ), _mm256_cmp_ps(x, t_max, _CMP_LT_OQ));
    __m256 down_ok = _mm256_and_ps(_mm256_cmp_ps(e, zero, _CMP_GT_OQ), _mm256_cmp_ps(x, t_min, _CMP_GT_OQ));
    return _mm256_or_ps(_mm256_and_ps(up, up_ok), _mm256_andnot_ps(up, down_ok));
}

/* Whether the element at x with EQ error e has a flip candidate in a direction (up: e < 0 and
 * x < t_max; down: e > 0 and x > t_min). */
static inline int has_candidate(float e, float x, int up, float t_min, float t_max) {
    return up ? (e < 0.0f && x < t_max) : (e > 0.0f && x > t_min);
}

static inline float clamp(float r, float t_min, float t_max) {
    return r < t_min ? t_min : (r > t_max ? t_max : r);
}

/* The code of the element at x flipped in a direction: round(x) +- 1 where it has a candidate,
 * else round(x) (grid.py's ``flip``, from x), clamped. */
static inline int8_t flipped_code(float x, int up, float t_min, float t_max) {
    float r = __builtin_rintf(x);
    float step = up ? 1.0f : -1.0f;
    return (int8_t)clamp(has_candidate(r - x, x, up, t_min, t_max) ? r + step : r, t_min, t_max);
}

#endif
