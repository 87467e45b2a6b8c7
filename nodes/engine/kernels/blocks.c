/* The llama runner's CPU kernels (x86-64, AVX2 + FMA): quantized matrix products and the small
 * per-layer operations, each one call, so a decode step is a few hundred C calls instead of
 * several hundred torch operators (each of which costs ~10 us of dispatch on a small CPU).
 *
 * Matrix products: y[M, N] (+)= x[M, K] @ W[N, K]^T, W in blocks of 32 weights along K:
 *   Q4_1: value = d * q + m, q in 0..15, 16 bytes of nibbles per block (byte j holds weight j in
 *         its low nibble and weight j + 16 in its high nibble: llama.cpp's layout)
 *   Q8_0: value = d * q, q in -127..127, 32 bytes per block
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
 * decode_attention (one query per cache row: writes the row's new key and value into the cache,
 * then attends over positions 0..pos of that row only).
 *
 * Threads: OpenMP. The library is linked against libgomp by soname, so in a process where torch
 * already loaded its libgomp both share one thread pool (torch.set_num_threads applies here).
 * Built at run time by kernels/__init__.py (cc -O3 -mavx2 -mfma -fopenmp). Scratch is malloc'd
 * per call (activations, attention scores: small); a failed malloc returns -1.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define XR 4 /* rows of x per pass over a weight row */

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

/* --- activations as 16-bit blocks ---------------------------------------------------------- */

typedef struct {
  int16_t *q; /* [M, K] */
  float *d;   /* [M, K/32] step of each block */
  float *s;   /* [M, K/32] sum(x) of each block (for Q4_1's minimum) */
} qrows;

static int quantize16(const float *x, int64_t m_rows, int64_t k, qrows *out) {
  const int64_t nb = k / QK;
  out->q = malloc(sizeof(int16_t) * (size_t)(m_rows * k));
  out->d = malloc(sizeof(float) * (size_t)(m_rows * nb));
  out->s = malloc(sizeof(float) * (size_t)(m_rows * nb));
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

/* sum over 32 pairs of 16-bit products: weights w0 (0..15) and w1 (16..31), x block xb */
static inline __m256 dot16(__m256i w0, __m256i w1, const int16_t *xb) {
  const __m256i a = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb));
  const __m256i b = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb + 16)));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
}

int q4_1_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *qs, const float *d,
                const float *m, int64_t n, float *y, int acc_into) {
  qrows xr;
  if (quantize16(x, m_rows, k, &xr))
    return -1;
  const int64_t nb = k / QK;
  const __m128i low = _mm_set1_epi8(0x0F);
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
        const __m128i raw = _mm_loadu_si128((const __m128i *)(wq + b * (QK / 2)));
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
        for (int r = 0; r < rows; r++) {
          const int64_t xb = (i0 + r) * nb + b;
          acc[r] = _mm256_fmadd_ps(dot16(w0, w1, xr.q + xb * QK),
                                   _mm256_set1_ps(wd[b] * xr.d[xb]), acc[r]);
          offset[r] += wm[b] * xr.s[xb];
        }
      }
      for (int r = 0; r < rows; r++) {
        float *out = y + (i0 + r) * n + row;
        *out = (acc_into ? *out : 0.0f) + hsum(acc[r]) + offset[r];
      }
    }
  }
  release(&xr);
  return 0;
}

int q8_0_matmul(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const float *d,
                int64_t n, float *y, int acc_into) {
  qrows xr;
  if (quantize16(x, m_rows, k, &xr))
    return -1;
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
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + b * QK)));
        const __m256i w1 =
            _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + b * QK + 16)));
        for (int r = 0; r < rows; r++) {
          const int64_t xb = (i0 + r) * nb + b;
          acc[r] = _mm256_fmadd_ps(dot16(w0, w1, xr.q + xb * QK),
                                   _mm256_set1_ps(wd[b] * xr.d[xb]), acc[r]);
        }
      }
      for (int r = 0; r < rows; r++) {
        float *out = y + (i0 + r) * n + row;
        *out = (acc_into ? *out : 0.0f) + hsum(acc[r]);
      }
    }
  }
  release(&xr);
  return 0;
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
 * scale) . v_j, each key and value read once for all g (head_dim a multiple of 8, g <= 8).
 * q: g rows of head_dim; o: g rows; sc: scratch for g * n scores. */
static void attend(const float *q, int64_t g, const float *keys, const float *vals, int64_t n,
                   int64_t head_dim, float scale, float *sc, float *o) {
  for (int64_t j = 0; j < n; j++) {
    const float *k = keys + j * head_dim;
    __m256 a[8];
    for (int i = 0; i < g; i++)
      a[i] = _mm256_setzero_ps();
    for (int64_t e = 0; e < head_dim; e += 8) {
      const __m256 kv = _mm256_loadu_ps(k + e);
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
    const float *v = vals + j * head_dim;
    for (int64_t e = 0; e < head_dim; e += 8) {
      const __m256 vv = _mm256_loadu_ps(v + e);
      for (int i = 0; i < g; i++) {
        float *oi = o + i * head_dim + e;
        _mm256_storeu_ps(oi, _mm256_fmadd_ps(_mm256_set1_ps(sc[i * n + j]), vv,
                                             _mm256_loadu_ps(oi)));
      }
    }
  }
}

/* D decode rows. Row b's token (its q, k, v inside qkv, a row of `stride` floats) is at position
 * pos[b] of cache row b: its key and value are written there, then each query head attends over
 * positions 0..pos[b] of its kv head (query head h uses kv head h / (heads / kv_heads)). Cache
 * layout of one layer: [rows, kv_heads, cap, head_dim]. out: [D, heads * head_dim]. */
int decode_attention(const float *qkv, int64_t n_rows, int64_t stride, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, float *kc, float *vc, int64_t cap,
                     const int64_t *pos, float scale, float *out) {
  const int64_t group = heads / kv_heads, row_size = kv_heads * cap * head_dim;
  const float *kbase = qkv + heads * head_dim, *vbase = kbase + kv_heads * head_dim;
  int64_t longest = 0;
  for (int64_t b = 0; b < n_rows; b++) {
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t at = b * row_size + h * cap * head_dim + pos[b] * head_dim;
      memcpy(kc + at, kbase + b * stride + h * head_dim, sizeof(float) * (size_t)head_dim);
      memcpy(vc + at, vbase + b * stride + h * head_dim, sizeof(float) * (size_t)head_dim);
    }
    longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
  }
  float *scores = malloc(sizeof(float) * (size_t)(n_rows * heads * longest));
  if (!scores)
    return -1;
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int64_t b = 0; b < n_rows; b++)
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t kv = b * row_size + h * cap * head_dim, first = h * group;
      for (int64_t i0 = 0; i0 < group; i0 += 8) { /* query heads in groups of at most 8 */
        const int64_t g = group - i0 < 8 ? group - i0 : 8, qh = first + i0;
        attend(qkv + b * stride + qh * head_dim, g, kc + kv, vc + kv, pos[b] + 1, head_dim,
               scale, scores + (b * heads + qh) * longest,
               out + b * heads * head_dim + qh * head_dim);
      }
    }
  free(scores);
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
