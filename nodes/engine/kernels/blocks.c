/* Matrix products over GGUF-style quantized weights, for the llama runner on x86-64 CPUs.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T, x in float32, W in blocks of 32 weights along K:
 *   Q4_1: value = d * q + m, q in 0..15, 16 bytes of nibbles per block (byte j holds weight j in
 *         its low nibble and weight j + 16 in its high nibble: llama.cpp's layout)
 *   Q8_0: value = d * q, q in -127..127, 32 bytes per block
 *
 * Weight-only: each block is unpacked to 32 floats in registers and multiplied with the float32
 * activations, so the result is the float32 product with the dequantized weights (up to the
 * order of the sums). Per block and row of x:
 *   Q4_1:  d * sum(x * q) + m * sum(x)        Q8_0:  d * sum(x * q)
 * A batch-1 product reads each weight byte once and runs at memory speed; torch's own int4 CPU
 * kernel is compute-bound on AVX2 at a third of that, and kernels that also quantize the
 * activations (fbgemm's, llama.cpp's) trade precision the 135M default model notices (its
 * greedy answers change). Rows of x are taken four at a time so a block is unpacked once per
 * four rows.
 *
 * Threads: one OpenMP loop over output rows. The library is linked against libgomp by soname,
 * so in a process where torch already loaded its libgomp both share one thread pool (and
 * torch.set_num_threads applies here too).
 *
 * Built at run time by kernels/__init__.py (cc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define QK 32
#define XR 4 /* rows of x per pass over a weight row */

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* 8 bytes at p, widened to 8 floats (unsigned or signed) */
static inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 s8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* the 32 weights of a Q4_1 block's nibbles, in order, as 4 x 8 floats (0..15) */
static inline void unpack_q4(const uint8_t *qs, __m256 w[4]) {
  const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, low);                    /* weights 0..15 */
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low); /* weights 16..31 */
  w[0] = u8x8(lo), w[1] = u8x8(_mm_srli_si128(lo, 8));
  w[2] = u8x8(hi), w[3] = u8x8(_mm_srli_si128(hi, 8));
}

static inline void unpack_q8(const int8_t *q, __m256 w[4]) {
  const __m128i a = _mm_loadu_si128((const __m128i *)q);
  const __m128i b = _mm_loadu_si128((const __m128i *)(q + 16));
  w[0] = s8x8(a), w[1] = s8x8(_mm_srli_si128(a, 8));
  w[2] = s8x8(b), w[3] = s8x8(_mm_srli_si128(b, 8));
}

/* sum(x[0..31] * w) for one row of x */
static inline __m256 dot32(const float *x, const __m256 w[4]) {
  __m256 s = _mm256_mul_ps(_mm256_loadu_ps(x), w[0]);
  s = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w[1], s);
  s = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), w[2], s);
  return _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), w[3], s);
}

static inline float sum32(const float *x) {
  __m256 s = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)));
  return hsum(s);
}

int q4_1_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *qs, const float *d,
                const float *m, int64_t n, float *y) {
  const int64_t nb = k / QK;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; row++) {
    const uint8_t *wq = qs + row * nb * (QK / 2);
    const float *wd = d + row * nb, *wm = m + row * nb;
    for (int64_t i0 = 0; i0 < m_rows; i0 += XR) {
      const int rows = m_rows - i0 < XR ? (int)(m_rows - i0) : XR;
      __m256 acc[XR] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                        _mm256_setzero_ps()};
      float offset[XR] = {0};
      for (int64_t b = 0; b < nb; b++) {
        __m256 w[4];
        unpack_q4(wq + b * (QK / 2), w);
        const __m256 scale = _mm256_set1_ps(wd[b]);
        for (int r = 0; r < rows; r++) {
          const float *xb = x + (i0 + r) * k + b * QK;
          acc[r] = _mm256_fmadd_ps(dot32(xb, w), scale, acc[r]);
          offset[r] += wm[b] * sum32(xb);
        }
      }
      for (int r = 0; r < rows; r++)
        y[(i0 + r) * n + row] = hsum(acc[r]) + offset[r];
    }
  }
  return 0;
}

int q8_0_matmul(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const float *d,
                int64_t n, float *y) {
  const int64_t nb = k / QK;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; row++) {
    const int8_t *wq = q + row * k;
    const float *wd = d + row * nb;
    for (int64_t i0 = 0; i0 < m_rows; i0 += XR) {
      const int rows = m_rows - i0 < XR ? (int)(m_rows - i0) : XR;
      __m256 acc[XR] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                        _mm256_setzero_ps()};
      for (int64_t b = 0; b < nb; b++) {
        __m256 w[4];
        unpack_q8(wq + b * QK, w);
        const __m256 scale = _mm256_set1_ps(wd[b]);
        for (int r = 0; r < rows; r++)
          acc[r] = _mm256_fmadd_ps(dot32(x + (i0 + r) * k + b * QK, w), scale, acc[r]);
      }
      for (int r = 0; r < rows; r++)
        y[(i0 + r) * n + row] = hsum(acc[r]);
    }
  }
  return 0;
}

/* for the loader's check that this library and torch share one OpenMP runtime */
int threads(void) {
  int t = 1;
#pragma omp parallel
#pragma omp single
  t = omp_get_num_threads();
  return t;
}
