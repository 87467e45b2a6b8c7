/* The llama runner's CPU kernels (x86-64, AVX2 + FMA): quantized matrix products and the small
 * per-layer operations, each one call, so a decode step is a few hundred C calls instead of
 * several hundred torch operators (each of which costs ~10 us of dispatch on a small CPU).
 *
 * Matrix products: y[M, N] (+)= x[M, K] @ W[N, K]^T, W in blocks of 32 weights along K:
 *   Q4_1: value = d * q + m, q in 0..15, 16 bytes of nibbles per block (byte j holds weight j in
 *         its low nibble and weight j + 16 in its high nibble: llama.cpp's layout)
 *   Q8_0: value = d * q, q in -127..127, 32 bytes per block
 * with d and m in float16 (what a GGUF file holds: 20 and 34 bytes per block in all).
 * The activations are quantized per row and block of 32 to 16-bit integers (step: max|x| /
 * 32767, so the product is the float32 product to ~1e-5), and a block's dot product is integer
 * arithmetic (AVX2 madd_epi16: 16 multiply-adds per instruction), scaled once:
 *   Q4_1:  d * dx * sum(q * qx) + m * sum(x)        Q8_0:  d * dx * sum(q * qx)
 * A batch-1 product then runs at memory speed, and a batch of 8 at several times the rate of
 * unpacking weights to floats. (8-bit activations, llama.cpp's choice, are faster still but move
 * the 135M default model's greedy answers; 16 bits do not.) Rows of x are taken four at a time
 * so a block is unpacked once per four rows; `acc` adds the product to y (a residual).
 *
 * The rest of a layer: rms_norm, rope (interleaved pairs, cos/sin from a table), silu_mul, and
 * attention (every token of the forward writes its key and value into its cache row, float16,
 * then attends over positions 0..pos of that row only: decode rows and prompt chunks alike).
 *
 * Threads: OpenMP. The library is linked against libgomp by soname, so in a process where torch
 * already loaded its libgomp both share one thread pool (torch.set_num_threads applies here).
 * Built at run time by kernels/__init__.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp). Scratch is
 * allocated per call, 64-byte aligned (activations, attention scores: small); a failed
 * allocation returns -1.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define XR 4 /* rows of x per pass over a weight row */

/* scratch aligned to a cache line: a vector load never straddles two (malloc's 16 bytes made
 * the same step ~10% slower on a thread other than the process's first, whose heap differs) */
static void *scratch(size_t bytes) {
  void *p = NULL;
  return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* 8 float16 values as floats */
static inline __m256 load_half(const uint16_t *p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* --- activations as 16-bit blocks ---------------------------------------------------------- */

typedef struct {
  int16_t *q; /* [M, K] */
  float *d;   /* [M, K/32] step of each block */
  float *s;   /* [M, K/32] sum(x) of each block (for Q4_1's minimum) */
} qrows;

static int quantize16(const float *x, int64_t m_rows, int64_t k, qrows *out) {
  const int64_t nb = k / QK;
  out->q = scratch(sizeof(int16_t) * (size_t)(m_rows * k));
  out->d = scratch(sizeof(float) * (size_t)(m_rows * nb));
  out->s = scratch(sizeof(float) * (size_t)(m_rows * nb));
  if (!out->q || !out->d || !out->s) {
    free(out->q), free(out->d), free(out->s);
    return -1;
  }
  const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
  for (int64_t i = 0; i < m_rows * nb; i++) {
    const float *src = x + i * QK;
    __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
      v[j] = _mm256_loadu_ps(src + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      sum = _mm256_add_ps(sum, v[j]);
    }
    const float mx = hmax(amax);
    const __m256 inv = _mm256_set1_ps(mx > 0.0f ? 32767.0f / mx : 0.0f);
    __m256i q32[4];
    for (int j = 0; j < 4; j++)
      q32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)); /* round to nearest */
    /* pack 32-bit lanes to 16 bits, then undo packs' lane interleaving */
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32[0], q32[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32[2], q32[3]), 0xD8);
    _mm256_storeu_si256((__m256i *)(out->q + i * QK), lo);
    _mm256_storeu_si256((__m256i *)(out->q + i * QK + 16), hi);
    out->d[i] = mx / 32767.0f;
    out->s[i] = hsum(sum);
  }
  return 0;
}

static void release(qrows *r) { free(r->q), free(r->d), free(r->s); }

/* the 32 weights of block b of a row as two vectors of 16-bit integers (weights 0..15, 16..31) */
static inline __attribute__((always_inline)) void unpack(const int q4, const void *w,
                                                          int64_t block, __m256i *lo,
                                                          __m256i *hi) {
  if (q4) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)w + block * 16));
    const __m128i low = _mm_set1_epi8(0x0F);
    *lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
    *hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
  } else {
    const int8_t *p = (const int8_t *)w + block * 32;
    *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
  }
}

#define WR 2 /* weight rows per tile: each x block loaded once for both */

/* One tile: weight rows w0, w1 (w1 may repeat w0 past the last row) against NX rows of x (a
 * compile-time constant, so the accumulators live in registers), into sums[WR][NX]. Per block
 * the integer dot of each pair is scaled by d[row, b] * dx[i, b], from a table made once per 8
 * blocks. */
static inline __attribute__((always_inline)) void tile(
    const int q4, const int NX, const void *w0, const void *w1, const uint16_t *d0,
    const uint16_t *d1, const qrows *xr, int64_t i0, int64_t nb, float sums[WR][XR]) {
  const void *w[WR] = {w0, w1};
  const uint16_t *d[WR] = {d0, d1};
  __m256 acc[WR][XR];
  for (int a = 0; a < WR; a++)
    for (int c = 0; c < NX; c++)
      acc[a][c] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int g = nb - b0 < 8 ? (int)(nb - b0) : 8;
    float scale[WR][XR][8];
    for (int a = 0; a < WR; a++)
      for (int c = 0; c < NX; c++) {
        const float *xd = xr->d + (i0 + c) * nb + b0;
        if (g == 8)
          _mm256_storeu_ps(scale[a][c], _mm256_mul_ps(load_half(d[a] + b0), _mm256_loadu_ps(xd)));
        else
          for (int j = 0; j < g; j++)
            scale[a][c][j] = _cvtsh_ss(d[a][b0 + j]) * xd[j];
      }
    for (int j = 0; j < g; j++) {
      const int64_t b = b0 + j;
      __m256i lo[WR], hi[WR];
      for (int a = 0; a < WR; a++)
        unpack(q4, w[a], b, &lo[a], &hi[a]);
      for (int c = 0; c < NX; c++) {
        const int16_t *xb = xr->q + ((i0 + c) * nb + b) * QK;
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)xb);
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb + 16));
        for (int a = 0; a < WR; a++) {
          const __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(lo[a], x0),
                                               _mm256_madd_epi16(hi[a], x1));
          acc[a][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32),
                                      _mm256_broadcast_ss(&scale[a][c][j]), acc[a][c]);
        }
      }
    }
  }
  for (int a = 0; a < WR; a++)
    for (int c = 0; c < NX; c++)
      sums[a][c] = hsum(acc[a][c]);
}

/* Q4_1's minimum term of one product: sum over blocks of m[b] (float16) * sum(x block b) */
static inline float min_term(const uint16_t *m, const float *s, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8)
    acc = _mm256_fmadd_ps(load_half(m + b), _mm256_loadu_ps(s + b), acc);
  float total = hsum(acc);
  for (; b < nb; b++)
    total += _cvtsh_ss(m[b]) * s[b];
  return total;
}

/* y[M, N] (+)= x @ W^T for W in Q4_1 (q4 = 1: w = nibbles, m = minimums) or Q8_0 (q4 = 0);
 * the blocks' scales and minimums are float16, as in the file. Q4_1's minimum term,
 * sum_b m[row, b] * sum(x block), is a short dot product per pair at the end. */
static inline __attribute__((always_inline)) int matmul16(
    const int q4, const float *x, int64_t m_rows, int64_t k, const void *w, const uint16_t *d,
    const uint16_t *m, int64_t n, float *y, int acc_into) {
  qrows xr;
  if (quantize16(x, m_rows, k, &xr))
    return -1;
  const int64_t nb = k / QK, wbytes = (q4 ? 16 : 32) * nb;
#pragma omp parallel for schedule(static)
  for (int64_t r0 = 0; r0 < n; r0 += WR) {
    const int64_t r1 = r0 + 1 < n ? r0 + 1 : r0; /* an odd last row: computed twice, kept once */
    const void *w0 = (const uint8_t *)w + r0 * wbytes, *w1 = (const uint8_t *)w + r1 * wbytes;
    for (int64_t i0 = 0; i0 < m_rows; i0 += XR) {
      const int nx = m_rows - i0 < XR ? (int)(m_rows - i0) : XR;
      float sums[WR][XR];
      switch (nx) { /* the tile's row count as a constant: its accumulators stay in registers */
      case 1: tile(q4, 1, w0, w1, d + r0 * nb, d + r1 * nb, &xr, i0, nb, sums); break;
      case 2: tile(q4, 2, w0, w1, d + r0 * nb, d + r1 * nb, &xr, i0, nb, sums); break;
      case 3: tile(q4, 3, w0, w1, d + r0 * nb, d + r1 * nb, &xr, i0, nb, sums); break;
      default: tile(q4, 4, w0, w1, d + r0 * nb, d + r1 * nb, &xr, i0, nb, sums);
      }
      for (int a = 0; a < (r1 > r0 ? WR : 1); a++)
        for (int c = 0; c < nx; c++) {
          float total = sums[a][c];
          if (q4)
            total += min_term(m + (r0 + a) * nb, xr.s + (i0 + c) * nb, nb);
          float *out = y + (i0 + c) * n + r0 + a;
          *out = (acc_into ? *out : 0.0f) + total;
        }
    }
  }
  release(&xr);
  return 0;
}

int q4_1_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *qs, const uint16_t *d,
                const uint16_t *m, int64_t n, float *y, int acc_into) {
  return matmul16(1, x, m_rows, k, qs, d, m, n, y, acc_into);
}

int q8_0_matmul(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const uint16_t *d,
                int64_t n, float *y, int acc_into) {
  return matmul16(0, x, m_rows, k, q, d, NULL, n, y, acc_into);
}

/* W [n, k] in blocks (q4: Q4_1, else Q8_0) -> float32 [n, k], for products with many rows of
 * x, which a float32 GEMM (torch's, MKL) does faster than the 16-bit integer path */
void dequantize(const void *w, const uint16_t *d, const uint16_t *m, int64_t q4, int64_t n,
                int64_t k, float *out) {
  const int64_t nb = k / QK, wbytes = (q4 ? 16 : 32) * nb;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; row++) {
    const uint8_t *wr = (const uint8_t *)w + row * wbytes;
    for (int64_t b = 0; b < nb; b++) {
      __m256i lo, hi;
      unpack((int)q4, wr, b, &lo, &hi);
      const __m256 scale = _mm256_set1_ps(_cvtsh_ss(d[row * nb + b]));
      const __m256 min = _mm256_set1_ps(q4 ? _cvtsh_ss(m[row * nb + b]) : 0.0f);
      const __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)),
                                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)),
                                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)),
                                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1))};
      float *dst = out + row * k + b * QK;
      for (int j = 0; j < 4; j++)
        _mm256_storeu_ps(dst + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[j]), scale, min));
    }
  }
}

/* --- the rest of a layer -------------------------------------------------------------------- */

/* out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w, for T rows of width h */
void rms_norm(const float *x, const float *w, int64_t t_rows, int64_t h, float eps, float *out) {
  for (int64_t t = 0; t < t_rows; t++) {
    const float *src = x + t * h;
    float *dst = out + t * h;
    __m256 ss = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= h; j += 8) {
      const __m256 v = _mm256_loadu_ps(src + j);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    float sum = hsum(ss);
    for (; j < h; j++)
      sum += src[j] * src[j];
    const float r = 1.0f / sqrtf(sum / (float)h + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (j = 0; j + 8 <= h; j += 8)
      _mm256_storeu_ps(dst + j,
                       _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + j), rv),
                                     _mm256_loadu_ps(w + j)));
    for (; j < h; j++)
      dst[j] = src[j] * r * w[j];
  }
}

/* Rotary embedding in place over interleaved pairs, for the first `heads` heads of each of T
 * rows (stride floats apart): pair i of a head at position p turns by the angle whose cos and
 * sin are table[p * half + i] (half = head_dim / 2). */
void rope(float *qk, int64_t t_rows, int64_t stride, int64_t heads, int64_t head_dim,
          const int64_t *pos, const float *cos_t, const float *sin_t) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < t_rows; t++) {
    const float *c = cos_t + pos[t] * half, *s = sin_t + pos[t] * half;
    for (int64_t hd = 0; hd < heads; hd++) {
      float *v = qk + t * stride + hd * head_dim;
      for (int64_t i = 0; i < half; i++) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c[i] - b * s[i];
        v[2 * i + 1] = a * s[i] + b * c[i];
      }
    }
  }
}

/* exp(x) for 8 lanes: x = k ln2 + r, exp(r) by a degree-6 polynomial on |r| <= ln2/2, times
 * 2^k through the exponent bits (relative error ~2e-7; under -87 it is 0, over 88 clamped) */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* out[t] = silu(gu[t, :i]) * gu[t, i:] */
void silu_mul(const float *gu, int64_t t_rows, int64_t inter, float *out) {
#pragma omp parallel for schedule(static) if (t_rows * inter > 65536)
  for (int64_t t = 0; t < t_rows; t++) {
    const float *g = gu + t * 2 * inter, *u = g + inter;
    float *o = out + t * inter;
    int64_t j = 0;
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    for (; j + 8 <= inter; j += 8) {
      const __m256 gv = _mm256_loadu_ps(g + j);
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, neg))));
      _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + j)));
    }
    for (; j < inter; j++)
      o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
  }
}

/* sums of four vectors' lanes: [sum(a), sum(b), sum(c), sum(d)] */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* The g query heads of one kv head over its n cached positions: o_i = softmax(q_i . k_j *
 * scale) . v_j, each key and value (float16) read once for all g (head_dim a multiple of 8,
 * g <= 8). q: g rows of head_dim; o: g rows (row stride o_stride); sc: scratch, g * n floats. */
static void attend(const float *q, int64_t g, const uint16_t *keys, const uint16_t *vals,
                   int64_t n, int64_t head_dim, float scale, float *sc, float *o) {
  for (int64_t j = 0; j < n; j++) {
    const uint16_t *k = keys + j * head_dim;
    __m256 a[8];
    for (int i = 0; i < g; i++)
      a[i] = _mm256_setzero_ps();
    for (int64_t e = 0; e < head_dim; e += 8) {
      const __m256 kv = load_half(k + e);
      for (int i = 0; i < g; i++)
        a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * head_dim + e), kv, a[i]);
    }
    for (int i = 0; i < g; i++)
      sc[i * n + j] = hsum(a[i]) * scale;
  }
  for (int i = 0; i < g; i++) { /* softmax of each query's scores, in place */
    float *row = sc + i * n, mx = -INFINITY, total;
    int64_t j;
    for (j = 0; j < n; j++)
      mx = row[j] > mx ? row[j] : mx;
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 tv = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
      _mm256_storeu_ps(row + j, p);
      tv = _mm256_add_ps(tv, p);
    }
    total = hsum(tv);
    for (; j < n; j++)
      total += (row[j] = expf(row[j] - mx));
    const float inv = 1.0f / total;
    for (j = 0; j < n; j++)
      row[j] *= inv;
  }
  memset(o, 0, sizeof(float) * (size_t)(g * head_dim));
  for (int64_t j = 0; j < n; j++) { /* o_i += p_ij v_j, each value row read once */
    const uint16_t *v = vals + j * head_dim;
    for (int64_t e = 0; e < head_dim; e += 8) {
      const __m256 vv = load_half(v + e);
      for (int i = 0; i < g; i++) {
        float *oi = o + i * head_dim + e;
        _mm256_storeu_ps(oi, _mm256_fmadd_ps(_mm256_set1_ps(sc[i * n + j]), vv,
                                             _mm256_loadu_ps(oi)));
      }
    }
  }
}

/* Attention for T tokens of one forward. Token t (its q, k, v inside qkv, a row of `stride`
 * floats) sits at position pos[t] of cache row rows[t]: first every token's key and value are
 * written there (as float16), then each query head attends over positions 0..pos[t] of that row
 * (query head h uses kv head h / (heads / kv_heads)), which covers a decode row's history and a
 * prompt chunk's causal mask alike. Cache of one layer: [cache rows, kv_heads, cap, head_dim]
 * float16. out: [T, heads * head_dim]. */
int attention(const float *qkv, int64_t t_rows, int64_t stride, int64_t heads, int64_t kv_heads,
              int64_t head_dim, uint16_t *kc, uint16_t *vc, int64_t cap, const int64_t *rows,
              const int64_t *pos, float scale, float *out) {
  const int64_t group = heads / kv_heads, row_size = kv_heads * cap * head_dim;
  const float *kbase = qkv + heads * head_dim, *vbase = kbase + kv_heads * head_dim;
  int64_t longest = 0;
  for (int64_t t = 0; t < t_rows; t++) {
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t at = rows[t] * row_size + h * cap * head_dim + pos[t] * head_dim;
      const float *k = kbase + t * stride + h * head_dim, *v = vbase + t * stride + h * head_dim;
      for (int64_t e = 0; e < head_dim; e += 8) {
        _mm_storeu_si128((__m128i *)(kc + at + e), _mm256_cvtps_ph(_mm256_loadu_ps(k + e), 0));
        _mm_storeu_si128((__m128i *)(vc + at + e), _mm256_cvtps_ph(_mm256_loadu_ps(v + e), 0));
      }
    }
    longest = pos[t] + 1 > longest ? pos[t] + 1 : longest;
  }
  float *scores = scratch(sizeof(float) * (size_t)(t_rows * heads * longest));
  if (!scores)
    return -1;
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int64_t t = 0; t < t_rows; t++)
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t kv = rows[t] * row_size + h * cap * head_dim, first = h * group;
      for (int64_t i0 = 0; i0 < group; i0 += 8) { /* query heads in groups of at most 8 */
        const int64_t g = group - i0 < 8 ? group - i0 : 8, qh = first + i0;
        attend(qkv + t * stride + qh * head_dim, g, kc + kv, vc + kv, pos[t] + 1, head_dim,
               scale, scores + (t * heads + qh) * longest,
               out + t * heads * head_dim + qh * head_dim);
      }
    }
  free(scores);
  return 0;
}

/* --- a whole stack of layers in one call ------------------------------------------------------ */

typedef struct {
  const void *w;      /* Q4_1 nibbles or Q8_0 values, [n, k] in blocks */
  const uint16_t *d;  /* [n, k/32] float16 scales */
  const uint16_t *m;  /* [n, k/32] float16 minimums (Q4_1) or NULL */
  const float *bias;  /* [n] or NULL */
  int64_t n, k;
  int64_t q4;
} linear_t;

typedef struct {
  const float *attn_norm, *mlp_norm;
  linear_t qkv, o, gate_up, down;
} layer_t;

typedef struct {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter;
  float eps, scale;
  const layer_t *layer;
  const float *cos, *sin; /* rope tables [positions, head_dim / 2] */
} stack_t;

/* y (+)= x @ W^T (+ bias, when not accumulating) */
static int apply(const linear_t *l, const float *x, int64_t t_rows, float *y, int acc_into) {
  const int r = l->q4 ? matmul16(1, x, t_rows, l->k, l->w, l->d, l->m, l->n, y, acc_into)
                      : matmul16(0, x, t_rows, l->k, l->w, l->d, NULL, l->n, y, acc_into);
  if (r == 0 && l->bias)
    for (int64_t t = 0; t < t_rows; t++)
      for (int64_t j = 0; j < l->n; j++)
        y[t * l->n + j] += l->bias[j];
  return r;
}

/* Every layer of the model over T tokens: x [T, hidden] in, the residual stream out (in place).
 * Token t is at position pos[t] of cache row rows[t]. kc, vc: the cache, [layers, cache_rows,
 * kv_heads, cap, head_dim] float16. The same operations as the Python path, with no trip back
 * to Python between them. */
int layers_forward(const stack_t *s, float *x, int64_t t_rows, const int64_t *rows,
                   const int64_t *pos, uint16_t *kc, uint16_t *vc, int64_t cache_rows,
                   int64_t cap) {
  const int64_t h = s->hidden, qkv_n = (s->heads + 2 * s->kv_heads) * s->head_dim;
  const int64_t layer_size = cache_rows * s->kv_heads * cap * s->head_dim;
  float *norm = scratch(sizeof(float) * (size_t)(t_rows * h));
  float *qkv = scratch(sizeof(float) * (size_t)(t_rows * qkv_n));
  float *attn = scratch(sizeof(float) * (size_t)(t_rows * s->heads * s->head_dim));
  float *gu = scratch(sizeof(float) * (size_t)(t_rows * 2 * s->inter));
  float *act = scratch(sizeof(float) * (size_t)(t_rows * s->inter));
  int r = (norm && qkv && attn && gu && act) ? 0 : -1;
  for (int64_t i = 0; i < s->layers && r == 0; i++) {
    const layer_t *l = s->layer + i;
    rms_norm(x, l->attn_norm, t_rows, h, s->eps, norm);
    r |= apply(&l->qkv, norm, t_rows, qkv, 0);
    rope(qkv, t_rows, qkv_n, s->heads + s->kv_heads, s->head_dim, pos, s->cos, s->sin);
    r |= attention(qkv, t_rows, qkv_n, s->heads, s->kv_heads, s->head_dim, kc + i * layer_size,
                   vc + i * layer_size, cap, rows, pos, s->scale, attn);
    r |= apply(&l->o, attn, t_rows, x, 1);
    rms_norm(x, l->mlp_norm, t_rows, h, s->eps, norm);
    r |= apply(&l->gate_up, norm, t_rows, gu, 0);
    silu_mul(gu, t_rows, s->inter, act);
    r |= apply(&l->down, act, t_rows, x, 1);
  }
  free(norm), free(qkv), free(attn), free(gu), free(act);
  return r;
}

/* for the loader's check that this library and torch share one OpenMP runtime */
int threads(void) {
  int t = 1;
#pragma omp parallel
#pragma omp single
  t = omp_get_num_threads();
  return t;
}
