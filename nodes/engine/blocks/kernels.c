/* The CPU kernels of our runner (x86-64): matrix products over weights in GGUF's own blocks,
 * read where they lie (the mapped file), and the few other operations of a layer, each one
 * call, so a decode step is a few C calls instead of several hundred torch operators.
 *
 * Products: y[M, N] (+)= x[M, K] @ W[N, K]^T, W a row of blocks per output, in any of GGUF's
 *   Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   blocks of 32 weights, one float16 scale (and minimum)
 *   Q4_K Q5_K                  super-blocks of 256: eight sub-blocks of 32, 6-bit scales and
 *                              minimums under a float16 scale of each
 *   Q6_K                       super-blocks of 256: sixteen sub-blocks of 16, int8 scales
 *   IQ4_NL IQ4_XS              4-bit indices into sixteen non-linear levels, runs of 32 under a
 *                              float16 scale (NL), or super-blocks of 256 with 6-bit scales (XS)
 *   F16 BF16 F32               plain rows (a separate, simple kernel)
 * Every blocked type is seen as runs of 32 weights: `codes` turns one into 32 bytes, unsigned
 * (0..63: the symmetric Q4_0, Q5_0 and Q6_K keep an OFFSET, subtracted after as offset * sum(x))
 * or, for Q8_0 and IQ4, signed as stored; `scales8` gives eight runs' float scale and minimum
 * at once (a K super-block is exactly eight runs). The activations are rounded per row to 8-bit
 * integers, each run of 32 on its own step (quantize8), so a run's dot product is one byte
 * product (VNNI's vpdpbusd, or maddubs + madd) per 64 weights:
 *       sum_runs  scale_w * step_x * sum(q * qx)  +  (min_w - offset * scale_w) * step_x * sum(qx)
 * A K super-block's eight runs share the weights' d and, up to an integer factor each, the
 * activations' step, so their integer dot products times each run's integer scale add up as
 * integers and are scaled once. The product is exactly the dequantized weights times the
 * rounded x: 8-bit activations per run of 32 keep perplexity within 0.1% of the float32 product
 * (per 256 values, as llama.cpp's K-quant path rounds them, 1.4-2.2% on the 135M model;
 * docs/benchmarks.md).
 * Rows of x are taken four at a time, so a run is unpacked once per four rows; each thread
 * streams its own share of weight rows one after another (two rows at a time, interleaved,
 * read Q6_K at 23 GB/s where one at a time reads it at 37, on 2 EPYC cores).
 * Q4_K and Q6_K, the types of a Q4_K_M file, are repacked at load by the AVX-512 builds, eight
 * rows interleaved (Q4_K8, Q6_K8, below): one vector then holds eight rows' weights, each lane
 * one row's, which spares the per-row scale shuffles and sums (Q4_K: 1.7x the products per
 * second on one core where the weights sit in the cache; Q6_K 1.2x).
 *
 * Vector paths, one source: built with -mavx2 (maddubs + madd on 256 bits), -mavx512bw (the
 * same on 512), or -mavx512vnni (vpdpbusd, and vpdpwssd for the integer scales). kernels.py
 * builds the widest the CPU's flags allow (TREECHAT_KERNELS=avx2 or avx512 forces a narrower).
 *
 * Prompt tokens: where the CPU multiplies bfloat16 in hardware (AVX512_BF16: Zen 4, Sapphire
 * Rapids), their products with a block type dequantize the weights in panels into bfloat16 and
 * call the bfloat16 GEMM kernels.py provides (torch's: oneDNN's, 210-220 Gmac/s on 2 Zen 4 cores
 * where MKL's float32 sgemm does 80-90 and these kernels 90-100). The caller says which rows are
 * prompt tokens (layers_forward's split): the path follows a row's kind, never the count, so a
 * row's numbers never depend on what shares its product (path_of). Without that GEMM, products
 * of 128 rows or more dequantize into float32 for the BLAS sgemm that torch carries. Float
 * weights stay float: bfloat16 only where 8-bit activations already set the precision.
 *
 * Threads: OpenMP, linked by soname, so in a process where torch already loaded its libgomp the
 * two share one thread pool. Scratch is allocated per call, 64-byte aligned; a failed allocation
 * returns -1.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GGUF's tensor types (gguf.GGMLQuantizationType) */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13,
       Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30,
       Q4_K8 = 112, Q6_K8 = 114 /* ours, not GGUF's: Q4_K, Q6_K in panels of eight rows */ };

/* IQ4_NL's and IQ4_XS's sixteen levels (ggml's kvalues_iq4nl) */
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};

#define RUN 32       /* weights per run */
#define XR 4         /* rows of x per pass over a weight row */
#define WR 1         /* weight rows per tile (one at a time streams fastest; docs/benchmarks.md) */
#define AHEAD 2048   /* bytes prefetched ahead, in whole rows: SmolLM2's 576-wide Q4_1 and Q5_0
                        rows (360, 396 bytes) read 18% faster than from one row ahead */
#define DENSE_FROM 128 /* rows of x from which a product goes through sgemm (without gemm16) */
#define PANEL 256    /* weight rows dequantized at once for sgemm */

static void *scratch(size_t bytes) {
  void *p = NULL;
  return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

static inline float half(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* float32 -> bfloat16, rounded to nearest even (weights and activations: no NaNs to keep) */
static inline uint16_t bf16_of(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline __m128i bf16_8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(up), _mm256_extracti128_si256(up, 1));
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* --- the block types ------------------------------------------------------------------------ */

/* bytes of one block, and runs of 32 it holds */
static inline int64_t block_bytes(int type) {
  switch (type) {
  case Q4_0: return 18;
  case Q4_1: return 20;
  case Q5_0: return 22;
  case Q5_1: return 24;
  case Q8_0: return 34;
  case Q4_K: return 144;
  case Q5_K: return 176;
  case Q6_K: return 210;
  case IQ4_NL: return 18;
  case IQ4_XS: return 136;
  default: return 0;
  }
}

/* the super-block types: 256 weights, eight runs under one d */
static inline int is_k(int type) {
  return type == Q4_K || type == Q5_K || type == Q6_K || type == IQ4_XS;
}

/* 32 indices (0..15) -> IQ4's levels */
static inline __m256i iq4_levels(__m256i idx) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
  return _mm256_shuffle_epi8(table, idx);
}

/* IQ4_XS's 6-bit scale of run j, as stored (ls - 32 is the signed scale) */
static inline int iq4xs_scale(const uint8_t *sb, int j) {
  uint16_t h;
  memcpy(&h, sb + 2, 2);
  return ((sb[4 + j / 2] >> 4 * (j % 2)) & 0xF) | (((h >> 2 * j) & 3) << 4);
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (ggml's bytes_from_bits_32) */
static inline __m256i bits_to_bytes(const uint8_t *p) {
  uint32_t bits;
  memcpy(&bits, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles (weights 0..15), then high (16..31) */
static inline __m256i nibbles(const uint8_t *p) {
  const __m128i raw = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m), _mm_and_si128(raw, m));
}

/* run r (0..7) of a K super-block's 4-bit field: 32 bytes, low nibbles for even runs */
static inline __m256i k_nibbles(const uint8_t *qs, int r) {
  const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * (r >> 1)));
  return _mm256_and_si256(r & 1 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
}

/* What a type's codes carry above its integers: Q4_0, Q5_0 and Q6_K keep theirs unsigned
 * (products subtract offset * sum(x) after). Q8_0 and IQ4's are signed as they are. */
static inline int OFFSET(const int type) {
  return type == Q4_0 ? 8 : type == Q5_0 ? 16 : type == Q6_K ? 32 : 0;
}

/* Run r (0..7) of a K super-block at sb as 32 codes (scales and offset apart) */
static inline __attribute__((always_inline)) __m256i codes_k(const int type, const uint8_t *sb,
                                                             const int r) {
  if (type == Q4_K)
    return k_nibbles(sb + 16, r);
  if (type == IQ4_XS) /* d, scales_h, scales_l[4], then 16 bytes of nibbles per run */
    return iq4_levels(nibbles(sb + 8 + 16 * r));
  if (type == Q5_K) {
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(sb + 16));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(r)),
                                        _mm256_set1_epi8(1));
    return _mm256_or_si256(k_nibbles(sb + 48, r), _mm256_slli_epi16(hi, 4));
  }
  /* Q6_K: ql[128] qh[64] scales[16] d; run r of half h = r / 4 */
  const int h = r >> 2, part = r & 3;
  const uint8_t *ql = sb + 64 * h + 32 * (part & 1), *qh = sb + 128 + 32 * h;
  __m256i lo = _mm256_loadu_si256((const __m256i *)ql);
  lo = _mm256_and_si256(part & 2 ? _mm256_srli_epi16(lo, 4) : lo, _mm256_set1_epi8(0x0F));
  __m256i hi = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qh),
                                _mm_cvtsi32_si128(2 * part));
  hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
  return _mm256_or_si256(lo, hi);
}

/* The 32 codes of run b of a row (scale, minimum and offset apart) */
static inline __attribute__((always_inline)) __m256i codes(const int type, const uint8_t *row,
                                                           int64_t b) {
  if (is_k(type))
    return codes_k(type, row + (b >> 3) * block_bytes(type), (int)(b & 7));
  const uint8_t *blk = row + b * block_bytes(type);
  switch (type) {
  case Q4_0:
  case Q4_1: return nibbles(blk + (type == Q4_0 ? 2 : 4));
  case IQ4_NL: return iq4_levels(nibbles(blk + 2));
  case Q5_0:
  case Q5_1: {
    const int off = type == Q5_0 ? 2 : 4;
    const __m256i hi = _mm256_and_si256(bits_to_bytes(blk + off), _mm256_set1_epi8(0x10));
    return _mm256_or_si256(nibbles(blk + off + 4), hi);
  }
  default: /* Q8_0 */
    return _mm256_loadu_si256((const __m256i *)(blk + 2));
  }
}

/* The 32 weights of run b of a row as int8 integers (scale and minimum apart) */
static inline __attribute__((always_inline)) __m256i unpack(const int type, const uint8_t *row,
                                                            int64_t b) {
  const __m256i q = codes(type, row, b);
  return OFFSET(type) ? _mm256_sub_epi8(q, _mm256_set1_epi8((char)OFFSET(type))) : q;
}

/* a K super-block's eight 6-bit scales and minimums (12 bytes) as floats times d and -dmin
 * (the bit shuffle of ggml's get_scale_min_k4, for all eight at once) */
static inline __m128i k_bytes(const uint8_t *q) { /* bytes 0..7: the scales, 8..15: the minimums */
  uint32_t u[4];
  memcpy(u, q, 12);
  const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
  u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
  const uint32_t low_mins = u[1] & m1;
  u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
  u[2] = low_mins;
  u[0] &= m1;
  return _mm_loadu_si128((const __m128i *)u);
}

static inline void k_scales(const uint8_t *q, float d, float dmin, float *ws, float *wm) {
  const __m128i b = k_bytes(q);
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  _mm256_storeu_ps(ws, _mm256_mul_ps(sc, _mm256_set1_ps(d)));
  _mm256_storeu_ps(wm, _mm256_mul_ps(mn, _mm256_set1_ps(-dmin)));
}

/* four bytes at p, wherever they lie */
static inline int load4(const uint8_t *p) {
  int v;
  memcpy(&v, p, 4);
  return v;
}

/* int32 lanes 0..g-1 all ones, the others zero: a mask for the g runs of a last, short group */
static inline __m256i first_lanes(int g) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* the float scale and minimum of runs b0 .. b0+g-1 (g <= 8; b0 a multiple of 8) */
static inline __attribute__((always_inline)) void scales8(const int type, const uint8_t *row,
                                                          int64_t b0, int g, float *ws,
                                                          float *wm) {
  if (is_k(type)) {
    const uint8_t *sb = row + (b0 >> 3) * block_bytes(type);
    if (type == Q6_K) {
      const float d = half(sb + 208);
      for (int j = 0; j < 8; j++)
        ws[j] = d, wm[j] = 0.0f;
      return;
    }
    if (type == IQ4_XS) {
      const float d = half(sb);
      for (int j = 0; j < 8; j++)
        ws[j] = d * (float)(iq4xs_scale(sb, j) - 32), wm[j] = 0.0f;
      return;
    }
    k_scales(sb + 4, half(sb), half(sb + 2), ws, wm);
    return;
  }
  const int64_t bytes = block_bytes(type);
  const int has_min = type == Q4_1 || type == Q5_1;
  /* the blocks' first four bytes: d, and m where it is (blocks past g: zeros). Eight scalar
   * loads: a gather's latency (Zen 4) held up every product of a group behind it */
#define HEAD(j) ((j) < g ? load4(row + (b0 + (j)) * bytes) : 0)
  const __m256i dm = _mm256_setr_epi32(HEAD(0), HEAD(1), HEAD(2), HEAD(3), HEAD(4), HEAD(5),
                                       HEAD(6), HEAD(7));
#undef HEAD
  const __m256i lo16 = _mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF));
  const __m128i d16 = _mm_packus_epi32(_mm256_castsi256_si128(lo16),
                                       _mm256_extracti128_si256(lo16, 1));
  _mm256_storeu_ps(ws, _mm256_cvtph_ps(d16));
  if (has_min) {
    const __m256i hi16 = _mm256_srli_epi32(dm, 16);
    _mm256_storeu_ps(wm, _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hi16),
                                                          _mm256_extracti128_si256(hi16, 1))));
  } else {
    _mm256_storeu_ps(wm, _mm256_setzero_ps());
  }
}

/* --- the vector paths ---------------------------------------------------------------------- */

/* Products take weights 64 at a time (two runs) as bytes: unsigned codes (u <= 63; the type's
 * offset apart) or, for the signed types, |w| against x carrying w's signs. dot4 sums each group
 * of four bytes' products into an int32 lane, so lanes 0..7 hold the first run's, 8..15 the
 * second's (on AVX2: two vectors of eight lanes, one per run). */
#ifdef __AVX512BW__
typedef __m512i bvec; /* 64 bytes */
typedef __m512i ivec; /* 16 int32 */
typedef __m512 fvec;  /* 16 floats */
static inline bvec bpair(__m256i a, __m256i b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}
static inline bvec bload(const int8_t *x) { return _mm512_loadu_si512(x); }
static inline ivec izero(void) { return _mm512_setzero_si512(); }
static inline fvec fzero(void) { return _mm512_setzero_ps(); }
/* acc + in each int32 lane the sum of its four products u * x (u unsigned, x signed) */
static inline ivec dot4(ivec acc, bvec u, bvec x) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x),
                                                 _mm512_set1_epi16(1)));
#endif
}
static inline bvec babs(bvec w) { return _mm512_abs_epi8(w); }
/* x with w's signs (x where w > 0, -x where w < 0; where w is 0, |w| is too) */
static inline bvec bsign(bvec x, bvec w) {
  return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
/* A K super-block's integer scales times the activations' run factors (kfold, below), widened
 * once (kall), and a pair's per-lane scales (kscale): with VNNI each int32 lane's low 16 bits
 * (vpdpwssd multiplies dot4's lanes, which fit 16 bits, by them), else the scale in both 16-bit
 * halves (vpmaddwd of maddubs' pair sums). Q6_K: sixteen scales of 16 weights, four lanes each;
 * the others: eight of 32, eight lanes each. */
typedef __m512i kvec;
typedef kvec kpair;
static inline kvec kall(__m256i s16) {
  const __m512i v = _mm512_cvtepu16_epi32(s16); /* the bits in the low half, 0 in the high */
#ifdef __AVX512VNNI__
  return v;
#else
  return _mm512_or_si512(v, _mm512_slli_epi32(v, 16));
#endif
}
static inline kvec kscale(const int type, kvec all, const int p) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx = type == Q6_K
                          ? _mm512_add_epi32(_mm512_set1_epi32(4 * p), _mm512_srli_epi32(lane, 2))
                          : _mm512_add_epi32(_mm512_set1_epi32(2 * p), _mm512_srli_epi32(lane, 3));
  return _mm512_permutexvar_epi32(idx, all);
}
/* acc + each lane's four products u * x times its scale */
static inline ivec kdot(ivec acc, bvec u, bvec x, kvec s) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x), s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), s));
#endif
}
/* a pair's float scales: s0 for the first run's lanes, s1 for the second's */
typedef __m512 svec;
static inline svec fscale(float s0, float s1) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s0)),
                                             _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}
static inline svec smul(svec a, svec b) { return _mm512_mul_ps(a, b); }
static inline svec sload(const float *v) { return _mm512_loadu_ps(v); }
/* v[j], v[j + 1] of eight floats spread over a pair's lanes */
static inline svec spread(__m256 v, const int j) {
  const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi32(j), _mm256_set1_epi32(j + 1), 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(v));
}
/* Runs 2p and 2p + 1 of a K super-block, or runs b and b + 1 of a row of 32-blocks, at once:
 * 64-byte loads and per-half shifts where the two runs share their bytes */
static inline __attribute__((always_inline)) bvec pair_k(const int type, const uint8_t *sb,
                                                         const int p) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  if (type == Q4_K) { /* 32 bytes: run 2p in the low nibbles, 2p + 1 in the high */
    const __m512i raw =
        _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(sb + 16 + 32 * p)));
    return _mm512_and_si512(_mm512_srlv_epi64(raw, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)), nib);
  }
  if (type == Q6_K) { /* runs 2p, 2p + 1: 64 bytes of ql (low or high nibbles), 32 of qh */
    const int h = p >> 1, shift = 4 * (p & 1);
    const __m512i lo = _mm512_and_si512(
        _mm512_srli_epi16(_mm512_loadu_si512(sb + 64 * h), shift), nib);
    const __m512i qh =
        _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(sb + 128 + 32 * h)));
    const long long s0 = 2 * (2 * p & 3);
    const __m512i hi = _mm512_and_si512(
        _mm512_srlv_epi64(qh, _mm512_setr_epi64(s0, s0, s0, s0, s0 + 2, s0 + 2, s0 + 2, s0 + 2)),
        _mm512_set1_epi8(3));
    return _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
  }
  return bpair(codes_k(type, sb, 2 * p), codes_k(type, sb, 2 * p + 1));
}
/* two 32-blocks' 16 bytes of nibbles each (q0, q1) as their 64 weights, as `nibbles` lays a run */
static inline bvec nibble_pair(const uint8_t *q0, const uint8_t *q1) {
  /* [q0 q0 q1 q1]: two broadcast loads and one insert, no cross-lane permute */
  const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q0));
  const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q1));
  const __m512i raw = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  return _mm512_and_si512(_mm512_srlv_epi64(raw, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
                          _mm512_set1_epi8(0x0F));
}
static inline __attribute__((always_inline)) bvec pair(const int type, const uint8_t *row,
                                                       int64_t b) {
  const int64_t bytes = block_bytes(type);
  if (type == Q4_0 || type == Q4_1) {
    const uint8_t *q0 = row + b * bytes + (type == Q4_0 ? 2 : 4);
    return nibble_pair(q0, q0 + bytes);
  }
  if (type == Q5_0 || type == Q5_1) { /* the same nibbles, and the fifth bits as a mask */
    const uint8_t *h0 = row + b * bytes + (type == Q5_0 ? 2 : 4), *h1 = h0 + bytes;
    uint32_t bits0, bits1;
    memcpy(&bits0, h0, 4);
    memcpy(&bits1, h1, 4);
    const bvec low = nibble_pair(h0 + 4, h1 + 4); /* + 16 where the fifth bit is set */
    return _mm512_mask_add_epi8(low, (__mmask64)bits0 | (__mmask64)bits1 << 32, low,
                                _mm512_set1_epi8(0x10));
  }
  return bpair(codes(type, row, b), codes(type, row, b + 1));
}
static inline fvec fdot(fvec acc, ivec t, svec s) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc);
}
static inline fvec fma_i(fvec acc, ivec t, float scale) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(scale), acc);
}
static inline float fsum(fvec v) { return _mm512_reduce_add_ps(v); }
#else
typedef struct {
  __m256i a, b; /* the first run, the second */
} bvec;
typedef bvec ivec;
typedef __m256 fvec;
static inline bvec bpair(__m256i a, __m256i b) { return (bvec){a, b}; }
static inline bvec bload(const int8_t *x) {
  return (bvec){_mm256_loadu_si256((const __m256i *)x),
                _mm256_loadu_si256((const __m256i *)(x + 32))};
}
static inline ivec izero(void) { return (ivec){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline fvec fzero(void) { return _mm256_setzero_ps(); }
static inline __m256i dot4_256(__m256i u, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}
static inline ivec dot4(ivec acc, bvec u, bvec x) {
  return (ivec){_mm256_add_epi32(acc.a, dot4_256(u.a, x.a)),
                _mm256_add_epi32(acc.b, dot4_256(u.b, x.b))};
}
static inline bvec babs(bvec w) { return (bvec){_mm256_abs_epi8(w.a), _mm256_abs_epi8(w.b)}; }
static inline bvec bsign(bvec x, bvec w) {
  return (bvec){_mm256_sign_epi8(x.a, w.a), _mm256_sign_epi8(x.b, w.b)};
}
/* the sixteen (Q6_K) or eight scales as int16, and a pair's: each run's 16-bit lanes (pair sums
 * of 2 weights) scaled by its scale, or for Q6_K lanes 0..7 and 8..15 by their sub-block's */
typedef __m256i kvec;
static inline kvec kall(__m256i s16) { return s16; }
typedef struct {
  __m256i a, b;
} kpair;
static inline __m256i k_spread(kvec all, const int first, const int second) {
  const __m256i lo = _mm256_permute2x128_si256(all, all, 0x00);
  const __m256i hi = _mm256_permute2x128_si256(all, all, 0x11);
  const __m256i i0 = _mm256_set1_epi16((short)((2 * (first & 7)) | (2 * (first & 7) + 1) << 8));
  const __m256i i1 = _mm256_set1_epi16((short)((2 * (second & 7)) | (2 * (second & 7) + 1) << 8));
  const __m256i a = _mm256_shuffle_epi8(first < 8 ? lo : hi, i0);
  const __m256i b = _mm256_shuffle_epi8(second < 8 ? lo : hi, i1);
  return _mm256_permute2x128_si256(a, b, 0x20); /* a's low half, then b's */
}
static inline kpair kscale(const int type, kvec all, const int p) {
  if (type == Q6_K)
    return (kpair){k_spread(all, 4 * p, 4 * p + 1), k_spread(all, 4 * p + 2, 4 * p + 3)};
  return (kpair){k_spread(all, 2 * p, 2 * p), k_spread(all, 2 * p + 1, 2 * p + 1)};
}
static inline ivec kdot(ivec acc, bvec u, bvec x, kpair s) {
  return (ivec){_mm256_add_epi32(acc.a, _mm256_madd_epi16(_mm256_maddubs_epi16(u.a, x.a), s.a)),
                _mm256_add_epi32(acc.b, _mm256_madd_epi16(_mm256_maddubs_epi16(u.b, x.b), s.b))};
}
typedef struct {
  __m256 a, b;
} svec;
static inline svec fscale(float s0, float s1) {
  return (svec){_mm256_set1_ps(s0), _mm256_set1_ps(s1)};
}
static inline svec smul(svec a, svec b) {
  return (svec){_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)};
}
static inline svec sload(const float *v) {
  return (svec){_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)};
}
static inline svec spread(__m256 v, const int j) {
  return (svec){_mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)),
                _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j + 1))};
}
static inline __attribute__((always_inline)) bvec pair_k(const int type, const uint8_t *sb,
                                                         const int p) {
  return bpair(codes_k(type, sb, 2 * p), codes_k(type, sb, 2 * p + 1));
}
static inline __attribute__((always_inline)) bvec pair(const int type, const uint8_t *row,
                                                       int64_t b) {
  return bpair(codes(type, row, b), codes(type, row, b + 1));
}
static inline fvec fdot(fvec acc, ivec t, svec s) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t.a), s.a, acc);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(t.b), s.b, acc);
}
static inline fvec fma_i(fvec acc, ivec t, float scale) {
  const __m256 sum = _mm256_cvtepi32_ps(_mm256_add_epi32(t.a, t.b));
  return _mm256_fmadd_ps(sum, _mm256_set1_ps(scale), acc);
}
static inline float fsum(fvec v) { return hsum8(v); }
#endif

/* --- dequantizing helpers: a run's 32 integers widened to 16 bits, scaled, stored as floats -- */

#ifdef __AVX512BW__
typedef __m512i wvec; /* 32 int16 */
static inline wvec widen(__m256i q) { return _mm512_cvtepi8_epi16(q); }
/* Q6_K: the sixteen sub-block scales as int16, and run r's pair of them spread over its 32
 * weights (run r of half h uses scales 8h + 2(r % 4) and the next) by one permute */
typedef __m512i q6vec;
static inline q6vec q6_scales(const uint8_t *sb) {
  return _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(sb + 192))));
}
static inline q6vec q6_none(void) { return _mm512_setzero_si512(); }
static inline wvec q6_scale(wvec w, q6vec s, const int r) {
  const int first = 8 * (r >> 2) + 2 * (r & 3);
  const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16((short)first),
                                         _mm256_set1_epi16((short)(first + 1)), 1);
  return _mm512_mullo_epi16(w, _mm512_permutexvar_epi16(idx, s));
}
/* 16 floats as bfloat16, rounded to nearest even (one instruction with AVX512_BF16, else
 * bf16_8's arithmetic on 16 lanes) */
static inline __m256i bf16_16(__m512 v) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
#endif
}
/* 32 weights as floats, w * scale + min: float32 into dst, or bfloat16 into dst16 */
static inline void wstore(float *dst, uint16_t *dst16, wvec w, float scale, float min) {
  const __m512 s = _mm512_set1_ps(scale), m = _mm512_set1_ps(min);
  const __m512 lo = _mm512_fmadd_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w))), s, m);
  const __m512 hi = _mm512_fmadd_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1))), s, m);
  if (dst16) {
    _mm256_storeu_si256((__m256i *)dst16, bf16_16(lo));
    _mm256_storeu_si256((__m256i *)(dst16 + 16), bf16_16(hi));
  } else {
    _mm512_storeu_ps(dst, lo);
    _mm512_storeu_ps(dst + 16, hi);
  }
}
#else
typedef struct {
  __m256i lo, hi; /* weights 0..15, 16..31 as int16 */
} wvec;
static inline wvec widen(__m256i q) {
  return (wvec){_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1))};
}
/* Q6_K: the sixteen sub-block scales as int16 (two vectors: 0..7, 8..15), run r's pair
 * broadcast by byte shuffles */
typedef struct {
  __m256i lo, hi;
} q6vec;
static inline q6vec q6_scales(const uint8_t *sb) {
  const __m256i all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(sb + 192)));
  return (q6vec){_mm256_permute2x128_si256(all, all, 0x00),
                 _mm256_permute2x128_si256(all, all, 0x11)};
}
static inline q6vec q6_none(void) {
  return (q6vec){_mm256_setzero_si256(), _mm256_setzero_si256()};
}
static inline wvec q6_scale(wvec w, q6vec s, const int r) {
  const int first = 2 * (r & 3); /* within the half's eight scales */
  const __m256i src = r >> 2 ? s.hi : s.lo;
  const __m256i i0 = _mm256_set1_epi16((short)((2 * first) | (2 * first + 1) << 8));
  const __m256i i1 = _mm256_set1_epi16((short)((2 * first + 2) | (2 * first + 3) << 8));
  return (wvec){_mm256_mullo_epi16(w.lo, _mm256_shuffle_epi8(src, i0)),
                _mm256_mullo_epi16(w.hi, _mm256_shuffle_epi8(src, i1))};
}
static inline void wstore(float *dst, uint16_t *dst16, wvec w, float scale, float min) {
  const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(min);
  const __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(w.lo)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(w.lo, 1)),
                            _mm256_cvtepi16_epi32(_mm256_castsi256_si128(w.hi)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(w.hi, 1))};
  for (int j = 0; j < 4; j++) {
    const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[j]), s, m);
    if (dst16)
      _mm_storeu_si128((__m128i *)(dst16 + 8 * j), bf16_8(v));
    else
      _mm256_storeu_ps(dst + 8 * j, v);
  }
}
#endif

/* A K super-block's integer scales times its eight runs' activation factors f, as 16 int16:
 * Q4_K, Q5_K lanes 0..7 (s_r f_r <= 63 * 128); Q6_K lanes 0..15 (s_j f_(j/2), |.| <= 128 * 128) */
static inline __m256i kfold(const int type, __m128i scale_bytes, const int16_t *f) {
  const __m128i f8 = _mm_loadu_si128((const __m128i *)f);
  if (type != Q6_K)
    return _mm256_zextsi128_si256(_mm_mullo_epi16(_mm_cvtepu8_epi16(scale_bytes), f8));
  const __m256i f16 = _mm256_set_m128i(_mm_unpackhi_epi16(f8, f8), _mm_unpacklo_epi16(f8, f8));
  return _mm256_mullo_epi16(_mm256_cvtepi8_epi16(scale_bytes), f16);
}

/* --- activations as 8-bit integers --------------------------------------------------------- */

#define GROUP 8 /* runs per activation step: 256 values, a K super-block */

/* Each run of x is rounded to 8-bit integers on its own step: f / 128 of its group's (max|x| /
 * 127 over 256 values), f in 1..128 the smallest that the run's own max fits. So one outlier
 * costs only its run the precision (one step per 256 values cost the 135M model 1.4-2.2%
 * perplexity at one row per product), and a K super-block's runs still add up as integers,
 * each times its f. */
typedef struct {
  int8_t *q;  /* [M, K] (and 64 bytes more: a pair's load past the last run) */
  float *d;   /* [M, groups] the group's step over 128: run r's is d * f_r */
  int16_t *f; /* [M, K/32] f_r of each run */
  float *rs;  /* [M, K/32, 8] each run's step, eight times (one per lane) */
  float *st;  /* [M, K/32] the same steps once each: a one-row product's */
  float *o;   /* [M, K/32] step * sum(q) of each run: for the minimums and the codes' offsets */
  float *os;  /* [M, K/32, 8] the same, eight times (one per lane): Q4_K8's minimums */
  float *o6;  /* [M, K/16] the same per 16 values: for Q6_K's offset, whose scales are per 16 */
} qrows;

static void release(qrows *r) {
  free(r->q), free(r->d), free(r->f), free(r->rs), free(r->st), free(r->o), free(r->os),
      free(r->o6);
}

static inline int64_t groups_of(int64_t nb) { return (nb + GROUP - 1) / GROUP; }

static inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

static inline float run_max(const float *src) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < RUN; j += 8)
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + j)));
  return hmax8(m);
}

/* x [M, K] -> the integers, steps and sums above */
static int quantize8(const float *x, int64_t m_rows, int64_t k, qrows *out) {
  const int64_t nb = k / RUN, ng = groups_of(nb);
  out->q = scratch((size_t)(m_rows * k + 64));
  out->d = scratch(sizeof(float) * (size_t)(m_rows * ng));
  out->f = scratch(sizeof(int16_t) * (size_t)(m_rows * nb));
  out->rs = scratch(sizeof(float) * (size_t)(m_rows * nb * 8));
  out->st = scratch(sizeof(float) * (size_t)(m_rows * nb));
  out->o = scratch(sizeof(float) * (size_t)(m_rows * nb));
  out->os = scratch(sizeof(float) * (size_t)(m_rows * nb * 8));
  out->o6 = scratch(sizeof(float) * (size_t)(m_rows * nb * 2));
  if (!out->q || !out->d || !out->f || !out->rs || !out->st || !out->o || !out->os ||
      !out->o6) {
    release(out);
    return -1;
  }
  memset(out->q + m_rows * k, 0, 64);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#pragma omp parallel for schedule(static) if (m_rows * k > 65536)
  for (int64_t i = 0; i < m_rows * ng; i++) {
    const int64_t row = i / ng, b0 = (i % ng) * GROUP;
    const int64_t b1 = b0 + GROUP < nb ? b0 + GROUP : nb;
    const float *src = x + row * k;
    float mx[GROUP], gmax = 0.0f;
    for (int64_t b = b0; b < b1; b++) {
      mx[b - b0] = run_max(src + b * RUN);
      gmax = fmaxf(gmax, mx[b - b0]);
    }
    const float step = gmax / 127.0f;
    for (int64_t b = b0; b < b1; b++) {
      /* f in 1..128: the run's step is f / 128 of the group's, the finest that its max fits */
      const int f =
          gmax > 0.0f ? (int)fminf(128.0f, fmaxf(1.0f, ceilf(128.0f * mx[b - b0] / gmax))) : 128;
      const float rstep = step * (float)f / 128.0f;
      const __m256 inv = _mm256_set1_ps(gmax > 0.0f ? 1.0f / rstep : 0.0f);
      __m256i q32[4];
      for (int j = 0; j < 4; j++)
        q32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + b * RUN + 8 * j), inv));
      /* 32 int32 -> 32 int8; packs interleave 128-bit lanes, one permute puts them back */
      const __m256i q16a = _mm256_packs_epi32(q32[0], q32[1]);
      const __m256i q16b = _mm256_packs_epi32(q32[2], q32[3]);
      const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), order);
      _mm256_storeu_si256((__m256i *)(out->q + row * k + b * RUN), q8);
      out->f[row * nb + b] = (int16_t)f;
      const int32_t first = hsum8i(_mm256_add_epi32(q32[0], q32[1]));
      const int32_t second = hsum8i(_mm256_add_epi32(q32[2], q32[3]));
      _mm256_storeu_ps(out->rs + (row * nb + b) * 8, _mm256_set1_ps(rstep));
      out->st[row * nb + b] = rstep;
      out->o[row * nb + b] = rstep * (float)(first + second);
      _mm256_storeu_ps(out->os + (row * nb + b) * 8, _mm256_set1_ps(out->o[row * nb + b]));
      out->o6[(row * nb + b) * 2] = rstep * (float)first;
      out->o6[(row * nb + b) * 2 + 1] = rstep * (float)second;
    }
    out->d[i] = step / 128.0f;
  }
  return 0;
}

/* --- the blocked product ------------------------------------------------------------------- */

typedef struct {
  int64_t type;
  const uint8_t *w;  /* [n] rows of row_bytes */
  int64_t n, k, row_bytes;
  const float *bias; /* [n] or NULL */
} linear_t;

/* every block type, for switches that build each one's code with its type a constant */
#define EACH_BLOCK_TYPE(X)                                                                    \
  X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q8_0) X(Q4_K) X(Q5_K) X(Q6_K) X(IQ4_NL) X(IQ4_XS)

/* Inside a parallel region: this thread's share [begin, end) of n items, in whole units.
 * (A type-specialized function is called inside the region, not inlined into it: GCC outlines
 * a parallel loop's body before it inlines, so a type passed into the loop stays a variable.) */
static inline void share(int64_t n, int64_t unit, int64_t *begin, int64_t *end) {
  const int64_t units = (n + unit - 1) / unit, t = omp_get_num_threads(), i = omp_get_thread_num();
  *begin = units * i / t * unit;
  *end = units * (i + 1) / t * unit < n ? units * (i + 1) / t * unit : n;
}

/* Runs b, b + 1 of the 32-block types (b alone if !two: its pair's lanes get zeros) of WR
 * weight rows against NX rows of x, into acc: each run's dot products times its float scale
 * (ws[a][j], j = b's place in its group) and step; for one row of x (a decode step), the two
 * multiplied once per group (sx[a] lane j), which spares a load and a product per pair (with
 * more rows that would take a lane shuffle per row and pair instead: slower) */
static inline __attribute__((always_inline)) void pairs(const int type, const int NX,
                                                        const uint8_t *const *w, const qrows *xr,
                                                        int64_t i0, int64_t nb, int64_t b,
                                                        const float ws[WR][8],
                                                        const __m256 sx[WR], const int j,
                                                        const int two, fvec acc[WR][XR]) {
  const int is_signed = type == Q8_0 || type == IQ4_NL || type == IQ4_XS;
  bvec u[WR];
  svec s[WR];
#pragma GCC unroll 4
  for (int a = 0; a < WR; a++) {
    u[a] = two ? pair(type, w[a], b) : bpair(codes(type, w[a], b), _mm256_setzero_si256());
    /* scales8 set ws past the group's runs to 0 */
    s[a] = NX == 1 ? spread(sx[a], j) : spread(_mm256_loadu_ps(ws[a]), j);
  }
#pragma GCC unroll 4
  for (int c = 0; c < NX; c++) {
    const bvec xv = bload(xr->q + ((i0 + c) * nb + b) * RUN);
    /* one row: s[a] holds the steps already (sx), `steps` goes unused */
    const svec steps = NX == 1 ? s[0] : sload(xr->rs + ((i0 + c) * nb + b) * 8);
#pragma GCC unroll 4
    for (int a = 0; a < WR; a++)
      acc[a][c] = fdot(acc[a][c], is_signed ? dot4(izero(), babs(u[a]), bsign(xv, u[a]))
                                            : dot4(izero(), u[a], xv),
                       NX == 1 ? s[a] : smul(s[a], steps));
  }
}

/* One tile: weight rows w[0..WR) against NX rows of x (a constant, so the accumulators stay in
 * registers), into sums[WR][NX]. Per group of eight runs (a K super-block, or eight blocks):
 *   Q4_K Q5_K Q6_K   each pair's dot products times the runs' integer scales (times the
 *                    activations' run factors) add up as integers, scaled once by d and the
 *                    activations' group step
 *   the others       each pair's dot products times the runs' float scales and steps
 * and beside them, in float, the minimums and the codes' offsets times the sums of the
 * quantized x: so the product is exactly the dequantized weights times the quantized x. */
static inline __attribute__((always_inline)) void tile(const int type, const int NX,
                                                       const uint8_t *const *w, const qrows *xr,
                                                       int64_t i0, int64_t nb, int64_t ahead,
                                                       float sums[WR][XR]) {
  const int64_t ng = groups_of(nb);
  fvec acc[WR][XR];
  __m256 corr[WR][XR];
#pragma GCC unroll 4
  for (int a = 0; a < WR; a++)
#pragma GCC unroll 4
    for (int c = 0; c < NX; c++)
      acc[a][c] = fzero(), corr[a][c] = _mm256_setzero_ps();
  const int64_t group_bytes = GROUP * block_bytes(type) / (is_k(type) ? GROUP : 1);
  for (int64_t b0 = 0; b0 < nb; b0 += GROUP) {
    const int64_t grp = b0 / GROUP;
#pragma GCC unroll 4
    for (int a = 0; a < WR; a++) { /* the next tile's blocks: the hardware prefetcher alone
                                      left a decode step waiting on memory (3x slower on Q6_K) */
      const uint8_t *next = w[a] + grp * group_bytes + ahead;
      for (int64_t off = 0; off < group_bytes; off += 64)
        _mm_prefetch((const char *)next + off, _MM_HINT_T0);
    }
    const int8_t *xq[XR];
#pragma GCC unroll 4
    for (int c = 0; c < NX; c++)
      xq[c] = xr->q + (i0 + c) * nb * RUN + b0 * RUN;
    if (type == Q4_K || type == Q5_K || type == Q6_K) {
      const uint8_t *sb[WR];
      kvec all[WR][XR];
      float d[WR];
#pragma GCC unroll 4
      for (int a = 0; a < WR; a++) {
        sb[a] = w[a] + (b0 >> 3) * block_bytes(type);
        __m128i scales;
        if (type == Q6_K) { /* offset 32 on every code: -32 d sum_j s_j (step sum q)_j */
          scales = _mm_loadu_si128((const __m128i *)(sb[a] + 192));
          d[a] = half(sb[a] + 208);
          const __m256 m = _mm256_set1_ps(-32.0f * d[a]);
          const __m256 lo = _mm256_mul_ps(m, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales)));
          const __m256 hi = _mm256_mul_ps(
              m, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(scales, 8))));
#pragma GCC unroll 4
          for (int c = 0; c < NX; c++) {
            const float *o = xr->o6 + ((i0 + c) * nb + b0) * 2;
            corr[a][c] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(o), corr[a][c]);
            corr[a][c] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(o + 8), corr[a][c]);
          }
        } else { /* the runs' minimums: -dmin m_r (step sum q)_r */
          scales = k_bytes(sb[a] + 4);
          d[a] = half(sb[a]);
          const __m256i mins = _mm256_cvtepu8_epi32(_mm_srli_si128(scales, 8));
          const __m256 m =
              _mm256_mul_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(-half(sb[a] + 2)));
#pragma GCC unroll 4
          for (int c = 0; c < NX; c++)
            corr[a][c] =
                _mm256_fmadd_ps(m, _mm256_loadu_ps(xr->o + (i0 + c) * nb + b0), corr[a][c]);
        }
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++)
          all[a][c] = kall(kfold(type, scales, xr->f + (i0 + c) * nb + b0));
      }
      ivec isum[WR][XR];
#pragma GCC unroll 4
      for (int a = 0; a < WR; a++)
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++)
          isum[a][c] = izero();
#pragma GCC unroll 4
      for (int p = 0; p < 4; p++) {
        bvec u[WR];
#pragma GCC unroll 4
        for (int a = 0; a < WR; a++)
          u[a] = pair_k(type, sb[a], p);
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++) {
          const bvec xv = bload(xq[c] + 64 * p);
#pragma GCC unroll 4
          for (int a = 0; a < WR; a++)
            isum[a][c] = kdot(isum[a][c], u[a], xv, kscale(type, all[a][c], p));
        }
      }
#pragma GCC unroll 4
      for (int a = 0; a < WR; a++)
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++)
          acc[a][c] = fma_i(acc[a][c], isum[a][c], d[a] * xr->d[(i0 + c) * ng + grp]);
      continue;
    }
    const int g = nb - b0 < GROUP ? (int)(nb - b0) : GROUP;
    float ws[WR][8], wm[WR][8];
    __m256 sx[WR]; /* one row of x: its steps times the runs' scales (past g: zeros) */
#pragma GCC unroll 4
    for (int a = 0; a < WR; a++) {
      scales8(type, w[a], b0, g, ws[a], wm[a]);
      if (NX == 1) {
        const float *st = xr->st + i0 * nb + b0;
        sx[a] = _mm256_mul_ps(_mm256_loadu_ps(ws[a]),
                              g == GROUP ? _mm256_loadu_ps(st)
                                         : _mm256_maskload_ps(st, first_lanes(g)));
      }
      const float off = (float)OFFSET(type);
      if (type == Q4_1 || type == Q5_1 || off > 0.0f) {
        const float *xs = xr->o + i0 * nb + b0;
        __m256 m = _mm256_loadu_ps(off > 0.0f ? ws[a] : wm[a]);
        if (off > 0.0f)
          m = _mm256_mul_ps(m, _mm256_set1_ps(-off));
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++) /* a short group's sums end with the row's: masked */
          corr[a][c] = _mm256_fmadd_ps(m, g == GROUP ? _mm256_loadu_ps(xs + c * nb)
                                                     : _mm256_maskload_ps(xs + c * nb,
                                                                          first_lanes(g)),
                                       corr[a][c]);
      }
    }
    if (g == GROUP) {
#pragma GCC unroll 4
      for (int j = 0; j < GROUP; j += 2)
        pairs(type, NX, w, xr, i0, nb, b0 + j, ws, sx, j, 1, acc);
    } else {
      for (int j = 0; j < g; j += 2)
        pairs(type, NX, w, xr, i0, nb, b0 + j, ws, sx, j, j + 1 < g, acc);
    }
  }
#pragma GCC unroll 4
  for (int a = 0; a < WR; a++)
#pragma GCC unroll 4
    for (int c = 0; c < NX; c++)
      sums[a][c] = fsum(acc[a][c]) + hsum8(corr[a][c]);
}

/* y[i, r] (+)= x_i . W_r for r in [r_begin, r_end) (a multiple of WR apart), rows of y ldy
 * floats apart */
static inline __attribute__((always_inline)) void blocked_rows(
    const int type, const qrows *xr, int64_t m_rows, int64_t k, const uint8_t *w,
    int64_t row_bytes, int64_t n, float *y, int64_t ldy, int acc_into, int64_t r_begin,
    int64_t r_end) {
  const int64_t nb = k / RUN;
  const int64_t ahead = (AHEAD + WR * row_bytes - 1) / (WR * row_bytes) * WR * row_bytes;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += WR) {
    const uint8_t *rows[WR]; /* past the last row: the last again, computed but not kept */
    for (int a = 0; a < WR; a++)
      rows[a] = w + (r0 + a < n ? r0 + a : n - 1) * row_bytes;
    const int kept = n - r0 < WR ? (int)(n - r0) : WR;
    for (int64_t i0 = 0; i0 < m_rows; i0 += XR) {
      const int nx = m_rows - i0 < XR ? (int)(m_rows - i0) : XR;
      float sums[WR][XR];
      switch (nx) {
      case 1: tile(type, 1, rows, xr, i0, nb, ahead, sums); break;
      case 2: tile(type, 2, rows, xr, i0, nb, ahead, sums); break;
      case 3: tile(type, 3, rows, xr, i0, nb, ahead, sums); break;
      default: tile(type, 4, rows, xr, i0, nb, ahead, sums);
      }
      for (int a = 0; a < kept; a++)
        for (int c = 0; c < nx; c++) {
          float *out = y + (i0 + c) * ldy + r0 + a;
          *out = (acc_into ? *out : 0.0f) + sums[a][c];
        }
    }
  }
}

typedef void (*blocked_fn)(const qrows *, int64_t, int64_t, const uint8_t *, int64_t, int64_t,
                           float *, int64_t, int, int64_t, int64_t);
#define BLOCKED_ROWS(T)                                                                       \
  static void blocked_##T(const qrows *xr, int64_t m_rows, int64_t k, const uint8_t *w,       \
                          int64_t row_bytes, int64_t n, float *y, int64_t ldy, int acc_into,  \
                          int64_t r_begin, int64_t r_end) {                                  \
    blocked_rows(T, xr, m_rows, k, w, row_bytes, n, y, ldy, acc_into, r_begin, r_end);        \
  }
EACH_BLOCK_TYPE(BLOCKED_ROWS)
#undef BLOCKED_ROWS

/* --- Q4_K in panels of eight rows (Q4_K8) ---------------------------------------------------
 * Row by row, a decode step's Q4_K product spends most of its instructions on each row's own
 * scales and on spreading them over a vector's lanes (kscale), then sums each row's lanes. So the
 * AVX-512 builds repack a Q4_K matrix at load (repack_panels; the file's pages are given back):
 * eight rows' super-blocks of the same columns lie together, one vector holds eight rows' weights
 * with each lane one row's, the activations are broadcast, and eight rows' sums come out side by
 * side. A tile (eight rows by 256 columns, Q4K8_BYTES; tiles of a panel one after another):
 *   d[8], dmin[8]       row r's float16 scales
 *   sc[8][8], mn[8][8]  run j's scale and minimum of row r at [j][r] (6 bits each, unpacked)
 *   qs[16][64]          vector 4p + q: int32 lane 2r + h holds row r's bytes 32p + 8q + 4h .. +3
 *                       of the super-block's 128 (low nibbles: run 2p's weights 8q + 4h .. +3,
 *                       high nibbles: run 2p + 1's), so one 8-byte broadcast of x serves a lane
 * 1184 bytes for the 1152 of eight super-blocks. The arithmetic is Q4_K's (tile, above): runs'
 * integer products times their integer scales add up per super-block, minimums beside in float.
 * Products that dequantize (prompt rows) unpack a row's super-blocks first (q4k8_row). */
#define Q4K8_BYTES 1184

/* row r of a tile from its Q4_K super-block */
static void q4k8_put(uint8_t *tile, int r, const uint8_t *sb) {
  uint8_t scales[16]; /* the scales, then the minimums */
  _mm_storeu_si128((__m128i *)scales, k_bytes(sb + 4));
  memcpy(tile + 2 * r, sb, 2), memcpy(tile + 16 + 2 * r, sb + 2, 2);
  for (int j = 0; j < 8; j++)
    tile[32 + 8 * j + r] = scales[j], tile[96 + 8 * j + r] = scales[8 + j];
  for (int v = 0; v < 16; v++)
    for (int h = 0; h < 2; h++)
      memcpy(tile + 160 + 64 * v + 4 * (2 * r + h), sb + 16 + 32 * (v / 4) + 8 * (v % 4) + 4 * h,
             4);
}

/* row `row` of a Q4_K8 matrix back as Q4_K super-blocks (k / 256 of 144 bytes) */
static void q4k8_row(const uint8_t *w, int64_t k, int64_t row, uint8_t *sbs) {
  const int64_t nsb = k / 256;
  const int r = (int)(row % 8);
  for (int64_t s = 0; s < nsb; s++) {
    const uint8_t *tile = w + (row / 8 * nsb + s) * Q4K8_BYTES;
    uint8_t *sb = sbs + s * 144, *q = sb + 4;
    memcpy(sb, tile + 2 * r, 2), memcpy(sb + 2, tile + 16 + 2 * r, 2);
    for (int j = 0; j < 4; j++) {
      const uint8_t s0 = tile[32 + 8 * j + r], s1 = tile[32 + 8 * (j + 4) + r];
      const uint8_t m0 = tile[96 + 8 * j + r], m1 = tile[96 + 8 * (j + 4) + r];
      q[j] = s0 | (s1 >> 4) << 6, q[j + 4] = m0 | (m1 >> 4) << 6;
      q[j + 8] = (s1 & 0xF) | (m1 & 0xF) << 4;
    }
    for (int v = 0; v < 16; v++)
      for (int h = 0; h < 2; h++)
        memcpy(sb + 16 + 32 * (v / 4) + 8 * (v % 4) + 4 * h,
               tile + 160 + 64 * v + 4 * (2 * r + h), 4);
  }
}

/* Q6_K8, Q6_K's panels, the same way: a tile (Q6K8_BYTES, the 1680 of eight super-blocks) holds
 *   d[8]                row r's float16 scale
 *   sc[16][8]           group g's int8 scale (16 weights) of row r at [g][r]
 *   [8][3][64]          for half n and quarter q (index 4n + q) three vectors, int32 lane 2r + h
 *                       of each holding row r's bytes at 8q + 4h .. +3 of: ql's 64n (A),
 *                       ql's 64n + 32 (B), qh's 32n (C); so A's and B's low and high nibbles
 *                       with C's four 2-bit fields are the codes of runs 4n .. 4n + 3 */
#define Q6K8_BYTES 1680

/* a panel type's tile: eight rows' super-blocks */
static inline int64_t tile_bytes(int type) { return type == Q4_K8 ? Q4K8_BYTES : Q6K8_BYTES; }
static inline int is_panels(int type) { return type == Q4_K8 || type == Q6_K8; }

/* row r of a tile from its Q6_K super-block */
static void q6k8_put(uint8_t *tile, int r, const uint8_t *sb) {
  memcpy(tile + 2 * r, sb + 208, 2);
  for (int g = 0; g < 16; g++)
    tile[16 + 8 * g + r] = sb[192 + g];
  for (int i = 0; i < 8; i++) /* i = 4n + q */
    for (int h = 0; h < 2; h++) {
      uint8_t *lane = tile + 144 + 192 * i + 4 * (2 * r + h);
      const int at = 8 * (i % 4) + 4 * h;
      memcpy(lane, sb + 64 * (i / 4) + at, 4);
      memcpy(lane + 64, sb + 64 * (i / 4) + 32 + at, 4);
      memcpy(lane + 128, sb + 128 + 32 * (i / 4) + at, 4);
    }
}

/* n rows of Q4_K or Q6_K (`type`; n a multiple of 8) into out in panels: n / 8 panels of k / 256
 * tiles; -2 where the build has no panel kernels (AVX2) or the type or shape does not fit */
int repack_panels(int type, const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
#ifndef __AVX512BW__
  return -2;
#endif
  if ((type != Q4_K && type != Q6_K) || n % 8 || k % 256)
    return -2;
  const int64_t nsb = k / 256, sb_bytes = block_bytes(type), row_bytes = nsb * sb_bytes;
  const int64_t tile = tile_bytes(type == Q4_K ? Q4_K8 : Q6_K8);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n / 8 * nsb; t++)
    for (int r = 0; r < 8; r++) {
      const uint8_t *sb = w + (t / nsb * 8 + r) * row_bytes + t % nsb * sb_bytes;
      (type == Q4_K ? q4k8_put : q6k8_put)(out + t * tile, r, sb);
    }
  return 0;
}

/* row `row` of a Q6_K8 matrix back as Q6_K super-blocks (k / 256 of 210 bytes) */
static void q6k8_row(const uint8_t *w, int64_t k, int64_t row, uint8_t *sbs) {
  const int64_t nsb = k / 256;
  const int r = (int)(row % 8);
  for (int64_t s = 0; s < nsb; s++) {
    const uint8_t *tile = w + (row / 8 * nsb + s) * Q6K8_BYTES;
    uint8_t *sb = sbs + s * 210;
    memcpy(sb + 208, tile + 2 * r, 2);
    for (int g = 0; g < 16; g++)
      sb[192 + g] = tile[16 + 8 * g + r];
    for (int i = 0; i < 8; i++)
      for (int h = 0; h < 2; h++) {
        const uint8_t *lane = tile + 144 + 192 * i + 4 * (2 * r + h);
        const int at = 8 * (i % 4) + 4 * h;
        memcpy(sb + 64 * (i / 4) + at, lane, 4);
        memcpy(sb + 64 * (i / 4) + 32 + at, lane + 64, 4);
        memcpy(sb + 128 + 32 * (i / 4) + at, lane + 128, 4);
      }
  }
}

#ifdef __AVX512BW__
/* lanes 2r and 2r + 1 added: the eight rows' sums of a panel's accumulator */
static inline __m256 row_sums(__m512 acc) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512 both = _mm512_add_ps(acc, _mm512_permute_ps(acc, 0xB1));
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(evens, both));
}

/* acc + each int32 lane's low 16 bits times s's (a's fit 16 bits; s's high halves are 0) */
static inline __m512i wdot(__m512i acc, __m512i a, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, s));
#endif
}

/* One panel (eight weight rows) against NX rows of x: out[c][r]. Integer bounds: a lane's sum
 * over a run's four vectors is at most 16 * 15 * 127 = 30480 (it fits the 16 bits vpdpwssd
 * reads), times a scale times the run's factor (63 * 128) over eight runs: 1.97e9 < 2^31. */
static inline __attribute__((always_inline)) void q4k8_tile(const int NX, const uint8_t *panel,
                                                            const qrows *xr, int64_t i0,
                                                            int64_t nb, float out[XR][8]) {
  const int64_t nsb = nb / GROUP;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  /* int16 lane 2l of a run's scales: row l / 2's (run 2p: bytes 0..7, 2p + 1: 8..15) */
  const __m512i run0 = _mm512_srli_epi16(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 1);
  const __m512i run1 = _mm512_add_epi16(run0, _mm512_set1_epi16(8));
  const __m512i pairs_of = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  __m512 acc[XR], corr[XR];
#pragma GCC unroll 4
  for (int c = 0; c < NX; c++)
    acc[c] = _mm512_setzero_ps(), corr[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nsb; s++) {
    const uint8_t *t = panel + s * Q4K8_BYTES;
    for (int off = 0; off < Q4K8_BYTES; off += 64) /* all the tile's lines asked for at once: */
      _mm_prefetch((const char *)t + off, _MM_HINT_T0); /* faster here than tiles ahead */
    /* d per lane 2r + h (the products), dmin per lane r + 8 (run parity) (the minimums) */
    const __m512 d = _mm512_permutexvar_ps(
        pairs_of, _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t))));
    const __m512 dmin = _mm512_castpd_ps(_mm512_broadcast_f64x4(
        _mm256_castps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16))))));
    __m512i isum[XR];
#pragma GCC unroll 4
    for (int c = 0; c < NX; c++)
      isum[c] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++) {
      __m512i lo_acc[XR], hi_acc[XR];
#pragma GCC unroll 4
      for (int c = 0; c < NX; c++)
        lo_acc[c] = _mm512_setzero_si512(), hi_acc[c] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int q = 0; q < 4; q++) {
        const __m512i v = _mm512_loadu_si512(t + 160 + 64 * (4 * p + q));
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++) {
          const int8_t *x = xr->q + (i0 + c) * nb * RUN + s * 256 + 64 * p + 8 * q;
          int64_t x0, x1;
          memcpy(&x0, x, 8), memcpy(&x1, x + 32, 8);
          lo_acc[c] = dot4(lo_acc[c], lo, _mm512_set1_epi64(x0));
          hi_acc[c] = dot4(hi_acc[c], hi, _mm512_set1_epi64(x1));
        }
      }
      /* runs 2p and 2p + 1: scales per lane 2r + h; minimums times dmin per lane r + 8 * run */
      const __m512i sc = _mm512_castsi256_si512(
          _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(t + 32 + 16 * p))));
      const __m512i sc0 = _mm512_maskz_permutexvar_epi16(0x55555555, run0, sc);
      const __m512i sc1 = _mm512_maskz_permutexvar_epi16(0x55555555, run1, sc);
      const __m128i mn = _mm_loadu_si128((const __m128i *)(t + 96 + 16 * p));
      const __m512 mins = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
#pragma GCC unroll 4
      for (int c = 0; c < NX; c++) {
        const int64_t run = (i0 + c) * nb + s * GROUP + 2 * p;
        const __m512i f0 = _mm512_set1_epi32(xr->f[run]), f1 = _mm512_set1_epi32(xr->f[run + 1]);
        isum[c] = wdot(isum[c], lo_acc[c], _mm512_madd_epi16(sc0, f0)); /* scale * factor */
        isum[c] = wdot(isum[c], hi_acc[c], _mm512_madd_epi16(sc1, f1));
        corr[c] = _mm512_fnmadd_ps(mins, _mm512_loadu_ps(xr->os + run * 8), corr[c]);
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NX; c++)
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]),
                               _mm512_mul_ps(d, _mm512_set1_ps(xr->d[(i0 + c) * nsb + s])),
                               acc[c]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < NX; c++) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(corr[c]), 1));
    const __m256 mins = _mm256_add_ps(_mm512_castps512_ps256(corr[c]), high);
    _mm256_storeu_ps(out[c], _mm256_add_ps(row_sums(acc[c]), mins));
  }
}

/* One Q6_K8 panel against NX rows of x: out[c][r]. A group's (16 weights') two vectors add up in
 * int32 (dpbusd, unsigned codes), minus the offset 32 as 16 * sum(q) on each of its two lanes,
 * and go to float with the group's scale times d and the run's step. */
static inline __attribute__((always_inline)) void q6k8_tile(const int NX, const uint8_t *panel,
                                                            const qrows *xr, int64_t i0,
                                                            int64_t nb, float out[XR][8]) {
  const int64_t nsb = nb / GROUP;
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  const __m512i pairs_of = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i pairs_hi = _mm512_add_epi32(pairs_of, _mm512_set1_epi32(8));
  __m512 acc[XR];
#pragma GCC unroll 4
  for (int c = 0; c < NX; c++)
    acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nsb; s++) {
    const uint8_t *t = panel + s * Q6K8_BYTES;
    for (int off = 0; off < Q6K8_BYTES; off += 64) /* as Q4_K8's */
      _mm_prefetch((const char *)t + off, _MM_HINT_T0);
    const __m512 d = _mm512_castpd_ps(_mm512_broadcast_f64x4(
        _mm256_castps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t)))));
#pragma GCC unroll 2
    for (int n = 0; n < 2; n++) {
      __m512 sd[4]; /* runs 4n + j's two groups' scales times d, per lane r + 8g */
#pragma GCC unroll 4
      for (int j = 0; j < 4; j++) {
        const __m128i sc = _mm_loadu_si128((const __m128i *)(t + 16 + 8 * (8 * n + 2 * j)));
        sd[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
      }
#pragma GCC unroll 2
      for (int g = 0; g < 2; g++) {
        __m512i a[XR][4];
#pragma GCC unroll 4
        for (int c = 0; c < NX; c++)
#pragma GCC unroll 4
          for (int j = 0; j < 4; j++)
            a[c][j] = _mm512_setzero_si512();
#pragma GCC unroll 2
        for (int q = 2 * g; q < 2 * g + 2; q++) {
          const uint8_t *v = t + 144 + 192 * (4 * n + q);
          const __m512i A = _mm512_loadu_si512(v), B = _mm512_loadu_si512(v + 64);
          const __m512i C = _mm512_loadu_si512(v + 128);
          __m512i u[4];
          u[0] = _mm512_or_si512(_mm512_and_si512(A, m4),
                                 _mm512_and_si512(_mm512_slli_epi16(C, 4), m30));
          u[1] = _mm512_or_si512(_mm512_and_si512(B, m4),
                                 _mm512_and_si512(_mm512_slli_epi16(C, 2), m30));
          u[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(A, 4), m4),
                                 _mm512_and_si512(C, m30));
          u[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(B, 4), m4),
                                 _mm512_and_si512(_mm512_srli_epi16(C, 2), m30));
#pragma GCC unroll 4
          for (int c = 0; c < NX; c++) {
            const int8_t *x = xr->q + (i0 + c) * nb * RUN + s * 256 + 128 * n + 8 * q;
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
              int64_t xj;
              memcpy(&xj, x + 32 * j, 8);
              a[c][j] = dot4(a[c][j], u[j], _mm512_set1_epi64(xj));
            }
          }
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
          /* group 8n + 2j + g's, per lane 2r + h */
          const __m512 sg = _mm512_permutexvar_ps(g ? pairs_hi : pairs_of, sd[j]);
#pragma GCC unroll 4
          for (int c = 0; c < NX; c++) {
            const int64_t run = (i0 + c) * nb + s * GROUP + 4 * n + j;
            /* step * (sum - 32 * sum(q) over two lanes) = step * sum - 16 * (step * sum(q)) */
            const __m512 part = _mm512_fmsub_ps(_mm512_cvtepi32_ps(a[c][j]),
                                                _mm512_set1_ps(xr->st[run]),
                                                _mm512_set1_ps(16.0f * xr->o6[run * 2 + g]));
            acc[c] = _mm512_fmadd_ps(part, sg, acc[c]);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < NX; c++)
    _mm256_storeu_ps(out[c], row_sums(acc[c]));
}
#endif

/* y[i, r] (+)= x_i . W_r for rows r in [r_begin, r_end) (multiples of 8) of a panel type */
static inline __attribute__((always_inline)) void blocked_panels(
    const int type, const qrows *xr, int64_t m_rows, int64_t k, const uint8_t *w, float *y,
    int64_t ldy, int acc_into, int64_t r_begin, int64_t r_end) {
#ifdef __AVX512BW__
  const int64_t nb = k / RUN, panel_bytes = k / 256 * tile_bytes(type);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += 8) {
    const uint8_t *panel = w + r0 / 8 * panel_bytes;
    for (int64_t i0 = 0; i0 < m_rows; i0 += XR) {
      const int nx = m_rows - i0 < XR ? (int)(m_rows - i0) : XR;
      float sums[XR][8];
#define PANEL_TILE(NX)                                                                        \
  (type == Q4_K8 ? q4k8_tile(NX, panel, xr, i0, nb, sums) : q6k8_tile(NX, panel, xr, i0, nb, sums))
      switch (nx) {
      case 1: PANEL_TILE(1); break;
      case 2: PANEL_TILE(2); break;
      case 3: PANEL_TILE(3); break;
      default: PANEL_TILE(4);
      }
#undef PANEL_TILE
      for (int c = 0; c < nx; c++)
        for (int a = 0; a < 8; a++) {
          float *o = y + (i0 + c) * ldy + r0 + a;
          *o = (acc_into ? *o : 0.0f) + sums[c][a];
        }
    }
  }
#else
  (void)type, (void)xr, (void)m_rows, (void)k, (void)w, (void)y, (void)ldy, (void)acc_into,
      (void)r_begin, (void)r_end;
#endif
}

#define BLOCKED_PANELS(T)                                                                     \
  static void blocked_##T(const qrows *xr, int64_t m_rows, int64_t k, const uint8_t *w,       \
                          int64_t row_bytes, int64_t n, float *y, int64_t ldy, int acc_into,  \
                          int64_t r_begin, int64_t r_end) {                                  \
    (void)row_bytes, (void)n;                                                                 \
    blocked_panels(T, xr, m_rows, k, w, y, ldy, acc_into, r_begin, r_end);                    \
  }
BLOCKED_PANELS(Q4_K8)
BLOCKED_PANELS(Q6_K8)
#undef BLOCKED_PANELS

/* y[i, r] (+)= x_i . W_r for every row r of `count` matrices side by side (q|k|v: their
 * outputs one after another in y's rows), in one parallel region: the threads share the rows of
 * all of them, so a decode step pays one fork and join per fused product, not one per part.
 * -2: not a blocked type. The threads share each part's rows, panels' in whole panels. */
static int blocked(const linear_t *parts, int64_t count, const qrows *xr, int64_t m_rows,
                   float *y, int64_t ldy, int acc_into) {
  blocked_fn rows[3];
  if (count > 3)
    return -2;
  for (int64_t i = 0; i < count; i++) {
    switch ((int)parts[i].type) {
#define PICK(T) case T: rows[i] = blocked_##T; break;
      EACH_BLOCK_TYPE(PICK)
#undef PICK
    case Q4_K8: rows[i] = blocked_Q4_K8; break;
    case Q6_K8: rows[i] = blocked_Q6_K8; break;
    default: return -2;
    }
  }
#pragma omp parallel
  {
    for (int64_t i = 0, at = 0; i < count; at += parts[i].n, i++) {
      const linear_t *l = parts + i;
      int64_t begin, end;
      share(l->n, is_panels((int)l->type) ? 8 : WR, &begin, &end);
      if (begin < end)
        rows[i](xr, m_rows, l->k, l->w, l->row_bytes, l->n, y + at, ldy, acc_into, begin, end);
    }
  }
  return 0;
}

/* a float row's element j as float32 */
static inline float float_at(int type, const uint8_t *row, int64_t j) {
  if (type == F32) {
    float f;
    memcpy(&f, row + 4 * j, 4);
    return f;
  }
  if (type == F16)
    return half(row + 2 * j);
  uint32_t bits = 0; /* BF16 */
  memcpy(&bits, row + 2 * j, 2);
  bits <<= 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* 8 elements of a float row from j as float32 */
static inline __m256 float8(int type, const uint8_t *row, int64_t j) {
  if (type == F32)
    return _mm256_loadu_ps((const float *)(row + 4 * j));
  const __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * j));
  if (type == F16)
    return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* y (+)= x @ W^T for float rows (F32, F16, BF16): plain float dots, four x rows at a time */
static void floats_product(int type, const float *x, int64_t m_rows, int64_t k,
                           const uint8_t *w, int64_t row_bytes, int64_t n, float *y, int64_t ldy,
                           int acc_into) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; r++) {
    const uint8_t *row = w + r * row_bytes;
    for (int64_t i0 = 0; i0 < m_rows; i0 += XR) {
      const int nx = m_rows - i0 < XR ? (int)(m_rows - i0) : XR;
      __m256 acc[XR] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                        _mm256_setzero_ps()};
      float tail[XR] = {0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 8 <= k; j += 8) {
        const __m256 wv = float8(type, row, j);
        for (int c = 0; c < nx; c++)
          acc[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (i0 + c) * k + j), acc[c]);
      }
      for (; j < k; j++)
        for (int c = 0; c < nx; c++)
          tail[c] += float_at(type, row, j) * x[(i0 + c) * k + j];
      for (int c = 0; c < nx; c++) {
        float *out = y + (i0 + c) * ldy + r;
        *out = (acc_into ? *out : 0.0f) + hsum8(acc[c]) + tail[c];
      }
    }
  }
}

/* --- dequantizing ------------------------------------------------------------------------- */

/* rows i in [i_begin, i_end) of W's rows (ids[i], or r0 + i when ids is NULL) as float32
 * rows of k, into out + i * k */
static inline __attribute__((always_inline)) void dequant_rows_t(
    const int type, const uint8_t *w, int64_t row_bytes, int64_t k, const int64_t *ids,
    int64_t r0, float *out, uint16_t *out16, int64_t i_begin, int64_t i_end) {
  const int64_t nb = k / RUN;
  for (int64_t i = i_begin; i < i_end; i++) {
    const uint8_t *row = w + (ids ? ids[i] : r0 + i) * row_bytes;
    float *dst = out16 ? NULL : out + i * k;
    uint16_t *dst16 = out16 ? out16 + i * k : NULL;
    if (type == F32 || type == F16 || type == BF16) {
      int64_t j = 0;
      for (; j + 8 <= k; j += 8) {
        if (dst16)
          _mm_storeu_si128((__m128i *)(dst16 + j), bf16_8(float8(type, row, j)));
        else
          _mm256_storeu_ps(dst + j, float8(type, row, j));
      }
      for (; j < k; j++) {
        if (dst16)
          dst16[j] = bf16_of(float_at(type, row, j));
        else
          dst[j] = float_at(type, row, j);
      }
      continue;
    }
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int g = nb - b0 < 8 ? (int)(nb - b0) : 8;
      float ws[8], wm[8];
      scales8(type, row, b0, g, ws, wm);
      const q6vec q6 = type == Q6_K ? q6_scales(row + (b0 >> 3) * block_bytes(Q6_K)) : q6_none();
      for (int j = 0; j < g; j++) {
        const wvec q = widen(unpack(type, row, b0 + j));
        const wvec scaled = type == Q6_K ? q6_scale(q, q6, j) : q;
        wstore(dst16 ? NULL : dst + (b0 + j) * RUN, dst16 ? dst16 + (b0 + j) * RUN : NULL, scaled,
               ws[j], wm[j]);
      }
    }
  }
}

#define EACH_TYPE(X) EACH_BLOCK_TYPE(X) X(F32) X(F16) X(BF16)
typedef void (*dequant_fn)(const uint8_t *, int64_t, int64_t, const int64_t *, int64_t, float *,
                           uint16_t *, int64_t, int64_t);
#define DEQUANT_ROWS(T)                                                                       \
  static void dequant_##T(const uint8_t *w, int64_t row_bytes, int64_t k, const int64_t *ids, \
                          int64_t r0, float *out, uint16_t *out16, int64_t i_begin,           \
                          int64_t i_end) {                                                   \
    dequant_rows_t(T, w, row_bytes, k, ids, r0, out, out16, i_begin, i_end);                 \
  }
EACH_TYPE(DEQUANT_ROWS)
#undef DEQUANT_ROWS

/* Q4_K8 and Q6_K8 rows: each one's super-blocks unpacked, then dequantized as Q4_K, Q6_K */
static inline __attribute__((always_inline)) void dequant_panels(
    const int type, const uint8_t *w, int64_t k, const int64_t *ids, int64_t r0, float *out,
    uint16_t *out16, int64_t i_begin, int64_t i_end) {
  const int64_t bytes = k / 256 * block_bytes(type == Q4_K8 ? Q4_K : Q6_K);
  uint8_t sbs[bytes];
  for (int64_t i = i_begin; i < i_end; i++) {
    float *dst = out ? out + i * k : NULL;
    uint16_t *dst16 = out16 ? out16 + i * k : NULL;
    if (type == Q4_K8) {
      q4k8_row(w, k, ids ? ids[i] : r0 + i, sbs);
      dequant_Q4_K(sbs, bytes, k, NULL, 0, dst, dst16, 0, 1);
    } else {
      q6k8_row(w, k, ids ? ids[i] : r0 + i, sbs);
      dequant_Q6_K(sbs, bytes, k, NULL, 0, dst, dst16, 0, 1);
    }
  }
}

#define DEQUANT_PANELS(T)                                                                     \
  static void dequant_##T(const uint8_t *w, int64_t row_bytes, int64_t k, const int64_t *ids, \
                          int64_t r0, float *out, uint16_t *out16, int64_t i_begin,           \
                          int64_t i_end) {                                                   \
    (void)row_bytes;                                                                          \
    dequant_panels(T, w, k, ids, r0, out, out16, i_begin, i_end);                             \
  }
DEQUANT_PANELS(Q4_K8)
DEQUANT_PANELS(Q6_K8)
#undef DEQUANT_PANELS

/* rows of W (ids[i], or r0 + i when ids is NULL) as float32 [count, k]; -2: unknown type */
static int dequantize_any(int type, const uint8_t *w, int64_t row_bytes, int64_t k,
                          const int64_t *ids, int64_t r0, int64_t count, float *out,
                          uint16_t *out16) {
  dequant_fn rows;
  switch (type) {
#define PICK(T) case T: rows = dequant_##T; break;
    EACH_TYPE(PICK)
#undef PICK
  case Q4_K8: rows = dequant_Q4_K8; break;
  case Q6_K8: rows = dequant_Q6_K8; break;
  default: return -2;
  }
#pragma omp parallel if (count * k > 65536)
  {
    int64_t begin, end;
    share(count, 1, &begin, &end);
    rows(w, row_bytes, k, ids, r0, out, out16, begin, end);
  }
  return 0;
}

int dequantize_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t k, const int64_t *ids,
                    int64_t r0, int64_t count, float *out) {
  return dequantize_any(type, w, row_bytes, k, ids, r0, count, out, NULL);
}

/* the same rows as bfloat16 (the bits of each float rounded to nearest even) */
int dequantize_rows_bf16(int type, const uint8_t *w, int64_t row_bytes, int64_t k,
                         const int64_t *ids, int64_t r0, int64_t count, uint16_t *out) {
  return dequantize_any(type, w, row_bytes, k, ids, r0, count, NULL, out);
}

/* --- the product, whatever the type and the row count ---------------------------------------- */

typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *,
                        const float *, const float *, const int *, const float *, const int *,
                        const float *, float *, const int *);
static sgemm_t sgemm = NULL;

void set_sgemm(void *f) { sgemm = (sgemm_t)f; }

/* A bfloat16 GEMM the host provides (kernels.py: torch's, which is oneDNN's on a CPU with
 * AVX512_BF16, at 2.5x MKL's float32 sgemm): y[m, n] (rows ldy apart) (+)= x[m, k] . w[n, k]^T,
 * 0 on success. Set, prompt rows of a block type go through it (see path_of). */
typedef int (*gemm16_t)(const uint16_t *, int64_t, int64_t, const uint16_t *, int64_t, float *,
                        int64_t, int);
static gemm16_t gemm16 = NULL;

void set_gemm16(void *f) { gemm16 = (gemm16_t)f; }

/* the float product of many rows: W dequantized PANEL rows at a time, sgemm into y */
static int dense_product(const linear_t *l, const float *x, int64_t m_rows, float *y,
                         int64_t ldy, int acc_into) {
  const int64_t panel = l->n < PANEL ? l->n : PANEL;
  float *wf = scratch(sizeof(float) * (size_t)(panel * l->k));
  if (!wf)
    return -1;
  for (int64_t r0 = 0; r0 < l->n; r0 += panel) {
    const int count = (int)(l->n - r0 < panel ? l->n - r0 : panel);
    dequantize_rows((int)l->type, l->w, l->row_bytes, l->k, NULL, r0, count, wf);
    /* column-major: y^T[count, m] = wf[count, k] . x^T[k, m] */
    const int m = (int)m_rows, k = (int)l->k, ld = (int)ldy;
    const float one = 1.0f, beta = acc_into ? 1.0f : 0.0f;
    sgemm("T", "N", &count, &m, &k, &one, wf, &k, x, &k, &beta, y + r0, &ld);
  }
  free(wf);
  return 0;
}

/* the bfloat16 product of prompt rows: x rounded to bfloat16 once, W dequantized to bfloat16 a
 * panel of about PANEL16_BYTES at a time (it stays in the cache for the GEMM), gemm16 into y,
 * GEMM16_ROWS rows a call (the last padded with copies of the first). Always that one shape,
 * because oneDNN's sums depend on it: with Sapphire Rapids' AMX a row multiplied among 48 rows
 * and among 64 could differ in its last bit (and a single row takes another kernel on every
 * CPU), where a row's numbers must not depend on how many share its product; and oneDNN keeps
 * code for every shape it meets (0.3-0.4 MB each with AMX), so a node that met every prompt
 * length grew by hundreds of MB. */
#define PANEL16_BYTES (4 << 20)
#define GEMM16_ROWS 64
static int dense16_product(const linear_t *l, const float *x, int64_t m_rows, float *y,
                           int64_t ldy, int acc_into) {
  const int64_t k = l->k, fit = PANEL16_BYTES / (2 * k) / 64 * 64;
  const int64_t m = (m_rows + GEMM16_ROWS - 1) / GEMM16_ROWS * GEMM16_ROWS;
  const int64_t panel = l->n < fit ? l->n : fit > 64 ? fit : 64;
  uint16_t *x16 = scratch(2 * (size_t)(m * k)), *w16 = scratch(2 * (size_t)(panel * k));
  float *y2 = m == m_rows ? NULL : scratch(sizeof(float) * (size_t)(m * l->n));
  int r = x16 && w16 && (m == m_rows || y2) ? 0 : -1;
  if (r == 0) {
#pragma omp parallel for schedule(static) if (m * k > 65536)
    for (int64_t t = 0; t < m; t++) {
      const float *src = x + (t < m_rows ? t : 0) * k;
      int64_t j = 0;
      for (; j + 8 <= k; j += 8)
        _mm_storeu_si128((__m128i *)(x16 + t * k + j), bf16_8(_mm256_loadu_ps(src + j)));
      for (; j < k; j++)
        x16[t * k + j] = bf16_of(src[j]);
    }
  }
  for (int64_t r0 = 0; r0 < l->n && r == 0; r0 += panel) {
    const int64_t count = l->n - r0 < panel ? l->n - r0 : panel;
    r = dequantize_any((int)l->type, l->w, l->row_bytes, k, NULL, r0, count, NULL, w16);
    for (int64_t t0 = 0; t0 < m && r == 0; t0 += GEMM16_ROWS) {
      const uint16_t *xs = x16 + t0 * k;
      r = (y2 ? gemm16(xs, GEMM16_ROWS, k, w16, count, y2 + t0 * l->n + r0, l->n, 0)
              : gemm16(xs, GEMM16_ROWS, k, w16, count, y + t0 * ldy + r0, ldy, acc_into))
              ? -3 : 0;
    }
  }
  if (r == 0 && y2)
    for (int64_t t = 0; t < m_rows; t++)
      for (int64_t j = 0; j < l->n; j++)
        y[t * ldy + j] = (acc_into ? y[t * ldy + j] : 0.0f) + y2[t * l->n + j];
  free(x16), free(w16), free(y2);
  return r;
}

/* y[:, 0:n] (+)= x @ W^T (+ bias) for x [m_rows, k]; y's rows ldy floats apart. xr: x already
 * quantized (blocked types, fewer rows than go dense), or NULL to quantize here. */
static inline void add_bias(const linear_t *l, int64_t m_rows, float *y, int64_t ldy) {
  if (l->bias)
    for (int64_t t = 0; t < m_rows; t++)
      for (int64_t j = 0; j < l->n; j++)
        y[t * ldy + j] += l->bias[j];
}

static inline int is_float(int type) { return type == F32 || type == F16 || type == BF16; }

/* How a product of m rows of x by a matrix of `type` runs. With gemm16, by the rows' kind,
 * never by how many share the product: prompt rows (`prompt`) of a block type through gemm16,
 * every other row of a block type on our 8-bit kernels, so a row's numbers are the same
 * whatever else the step computes (a seed's answer does not depend on the batch, and a request
 * resumed elsewhere recomputes its delivered tokens exactly). Float weights keep float products
 * (sgemm from DENSE_FROM rows). Without gemm16, by the count: sgemm from DENSE_FROM rows. */
enum { BLOCKED, FLOATS, SGEMM, GEMM16 };
static inline int path_of(int type, int64_t m_rows, int prompt) {
  if (gemm16 && !is_float(type))
    return prompt ? GEMM16 : BLOCKED;
  if (sgemm && m_rows >= DENSE_FROM)
    return SGEMM;
  return is_float(type) ? FLOATS : BLOCKED;
}

static int product_q(const linear_t *l, const float *x, const qrows *xr, int64_t m_rows, float *y,
                     int64_t ldy, int acc_into, int prompt) {
  const int type = (int)l->type, path = path_of(type, m_rows, prompt);
  int r = 0;
  if (path == GEMM16) {
    r = dense16_product(l, x, m_rows, y, ldy, acc_into);
  } else if (path == SGEMM) {
    r = dense_product(l, x, m_rows, y, ldy, acc_into);
  } else if (path == FLOATS) {
    floats_product(type, x, m_rows, l->k, l->w, l->row_bytes, l->n, y, ldy, acc_into);
  } else {
    qrows own;
    if (!xr) {
      if (quantize8(x, m_rows, l->k, &own))
        return -1;
      xr = &own;
    }
    r = blocked(l, 1, xr, m_rows, y, ldy, acc_into);
    if (xr == &own)
      release(&own);
  }
  if (r == 0)
    add_bias(l, m_rows, y, ldy);
  return r;
}

/* Several products of the same x side by side (q|k|v, gate|up; or one: o, down), y (+)= each:
 * x quantized once, and all of them in one parallel region when all are blocked (a decode
 * step's) */
static int products(const linear_t *parts, int64_t count, const float *x, int64_t m_rows,
                    float *y, int64_t ldy, int acc_into, int prompt) {
  qrows xr;
  int blocked_x = 0, all_blocked = 1;
  for (int64_t i = 0; i < count; i++) {
    const int path = path_of((int)parts[i].type, m_rows, prompt);
    blocked_x |= path == BLOCKED;
    all_blocked &= path == BLOCKED;
  }
  if (blocked_x && quantize8(x, m_rows, parts[0].k, &xr))
    return -1;
  int r = 0;
  if (all_blocked && (r = blocked(parts, count, &xr, m_rows, y, ldy, acc_into)) == 0) {
    for (int64_t i = 0, at = 0; i < count; at += parts[i].n, i++)
      add_bias(parts + i, m_rows, y + at, ldy);
  } else if (!all_blocked) {
    for (int64_t i = 0, at = 0; i < count && r == 0; at += parts[i].n, i++) {
      const int blocked = path_of((int)parts[i].type, m_rows, prompt) == BLOCKED;
      r = product_q(parts + i, x, blocked ? &xr : NULL, m_rows, y + at, ldy, acc_into, prompt);
    }
  }
  if (blocked_x)
    release(&xr);
  return r;
}

/* y (+)= x @ W^T for m rows of x; `prompt`: they are prompt rows (see path_of) */
int matmul(const linear_t *l, const float *x, int64_t m_rows, float *y, int acc_into, int prompt) {
  return product_q(l, x, NULL, m_rows, y, l->n, acc_into, prompt);
}

/* Rows [0, split) of a layer's batch are generated tokens, [split, T) prompt tokens: each part
 * of a product runs on its own kind's path */
static int split_products(const linear_t *parts, int64_t count, const float *x, int64_t t_rows,
                          int64_t split, float *y, int64_t ldy, int acc_into) {
  int r = 0;
  if (split > 0)
    r = products(parts, count, x, split, y, ldy, acc_into, 0);
  if (split < t_rows && r == 0)
    r = products(parts, count, x + split * parts[0].k, t_rows - split, y + split * ldy, ldy,
                 acc_into, 1);
  return r;
}

/* --- the rest of a layer -------------------------------------------------------------------- */

/* out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w, for T rows of width h (in place allowed) */
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
    float sum = hsum8(ss);
    for (; j < h; j++)
      sum += src[j] * src[j];
    const float r = 1.0f / sqrtf(sum / (float)h + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (j = 0; j + 8 <= h; j += 8)
      _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + j), rv),
                                              _mm256_loadu_ps(w + j)));
    for (; j < h; j++)
      dst[j] = src[j] * r * w[j];
  }
}

/* Rotary embedding in place, for the first `heads` heads of each of T rows (stride floats
 * apart), over the first `rot` dimensions of each head (the rest pass: Phi-4's partial rotary).
 * Pair i of a head at position p turns by the angle whose cos and sin are table[p * half + i]
 * (half = rot / 2); the pair is (2i, 2i+1) (interleaved: llama.cpp's Llama files) or
 * (i, i + half) (neox: Hugging Face's layout, and every other family's files). */
void rope(float *qk, int64_t t_rows, int64_t stride, int64_t heads, int64_t head_dim,
          int64_t rot, const int64_t *pos, const float *cos_t, const float *sin_t, int64_t neox) {
  const int64_t half_dim = rot / 2;
  const int64_t step = neox ? 1 : 2, other = neox ? half_dim : 1;
  for (int64_t t = 0; t < t_rows; t++) {
    const float *c = cos_t + pos[t] * half_dim, *s = sin_t + pos[t] * half_dim;
    for (int64_t hd = 0; hd < heads; hd++) {
      float *v = qk + t * stride + hd * head_dim;
      for (int64_t i = 0; i < half_dim; i++) {
        float *a = v + i * step, *b = a + other;
        const float x0 = *a, x1 = *b;
        *a = x0 * c[i] - x1 * s[i];
        *b = x0 * s[i] + x1 * c[i];
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

/* out[t] = act(gu[t, :i]) * gu[t, i:], act 0: silu (SwiGLU), 1: gelu, tanh approximation
 * (GeGLU: gelu(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3))) */
void glu(const float *gu, int64_t t_rows, int64_t inter, int64_t act, float *out) {
#pragma omp parallel for schedule(static) if (t_rows * inter > 65536)
  for (int64_t t = 0; t < t_rows; t++) {
    const float *g = gu + t * 2 * inter, *u = g + inter;
    float *o = out + t * inter;
    int64_t j = 0;
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    const __m256 c1 = _mm256_set1_ps(1.5957691216057308f), c3 = _mm256_set1_ps(0.044715f);
    for (; j + 8 <= inter; j += 8) {
      const __m256 gv = _mm256_loadu_ps(g + j);
      __m256 z = gv;
      if (act) /* 2 sqrt(2/pi) (g + 0.044715 g^3) */
        z = _mm256_mul_ps(c1, _mm256_fmadd_ps(_mm256_mul_ps(c3, gv), _mm256_mul_ps(gv, gv), gv));
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(z, neg))));
      _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + j)));
    }
    for (; j < inter; j++) {
      const float z = act ? 1.5957691216057308f * (g[j] + 0.044715f * g[j] * g[j] * g[j]) : g[j];
      o[j] = g[j] / (1.0f + expf(-z)) * u[j];
    }
  }
}

/* The g query heads of one kv head over cached positions first..last: o_i = softmax(q_i . k_j *
 * scale) . v_j, each key and value (float16) read once for all g (head_dim a multiple of 8,
 * g <= 8). Scores past a soft cap c become c * tanh(s / c) (Gemma 2). sc: g * n floats. */
static void attend(const float *q, int64_t g, const uint16_t *keys, const uint16_t *vals,
                   int64_t first, int64_t last, int64_t head_dim, float scale, float cap,
                   float *sc, float *o) {
  const int64_t n = last - first + 1;
  for (int64_t j = 0; j < n; j++) {
    const uint16_t *k = keys + (first + j) * head_dim;
    __m256 a[8];
    for (int i = 0; i < g; i++)
      a[i] = _mm256_setzero_ps();
    for (int64_t e = 0; e < head_dim; e += 8) {
      const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + e)));
      for (int i = 0; i < g; i++)
        a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * head_dim + e), kv, a[i]);
    }
    for (int i = 0; i < g; i++) {
      const float s = hsum8(a[i]) * scale;
      sc[i * n + j] = cap > 0.0f ? cap * tanhf(s / cap) : s;
    }
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
    total = hsum8(tv);
    for (; j < n; j++)
      total += (row[j] = expf(row[j] - mx));
    const float inv = 1.0f / total;
    for (j = 0; j < n; j++)
      row[j] *= inv;
  }
  memset(o, 0, sizeof(float) * (size_t)(g * head_dim));
  for (int64_t j = 0; j < n; j++) { /* o_i += p_ij v_j, each value row read once */
    const uint16_t *v = vals + (first + j) * head_dim;
    for (int64_t e = 0; e < head_dim; e += 8) {
      const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + e)));
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
 * (the last `window` of them when window > 0: a sliding-window layer), query head h using kv
 * head h / (heads / kv_heads): a decode row's history and a prompt chunk's causal mask alike.
 * Cache of one layer: [cache rows, kv_heads, cap, head_dim] float16. out: [T, heads*head_dim]. */
int attention(const float *qkv, int64_t t_rows, int64_t stride, int64_t heads, int64_t kv_heads,
              int64_t head_dim, uint16_t *kc, uint16_t *vc, int64_t cap, const int64_t *rows,
              const int64_t *pos, float scale, int64_t window, float softcap, float *out) {
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
      const int64_t kv = rows[t] * row_size + h * cap * head_dim, first_head = h * group;
      const int64_t first = window > 0 && pos[t] >= window ? pos[t] - window + 1 : 0;
      for (int64_t i0 = 0; i0 < group; i0 += 8) { /* query heads in groups of at most 8 */
        const int64_t g = group - i0 < 8 ? group - i0 : 8, qh = first_head + i0;
        attend(qkv + t * stride + qh * head_dim, g, kc + kv, vc + kv, first, pos[t], head_dim,
               scale, softcap, scores + (t * heads + qh) * longest,
               out + t * heads * head_dim + qh * head_dim);
      }
    }
  free(scores);
  return 0;
}

/* --- a whole stack of layers in one call ------------------------------------------------------ */

typedef struct {
  const float *attn_norm, *mlp_norm;
  const float *q_norm, *k_norm;               /* per-head RMSNorm of queries, keys; or NULL */
  const float *post_attn_norm, *post_mlp_norm; /* norms of the branches' outputs; or NULL */
  linear_t qkv[3], o, gate_up[2], down;
  int64_t qkv_parts, gate_up_parts;
  const float *cos, *sin; /* this layer's rotary tables [positions, rot / 2] */
  int64_t window;         /* sliding window of this layer (0: none) */
} layer_t;

typedef struct {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter;
  float eps, scale, softcap;
  int64_t act, neox, rot; /* rot: rotary dimensions of a head */
  const layer_t *layer;
} stack_t;

/* branch output b [T, hidden] into the residual x: x += norm(b) (or b with no norm) */
static void add_branch(float *x, float *b, const float *norm, int64_t t_rows, int64_t h,
                       float eps) {
  if (norm)
    rms_norm(b, norm, t_rows, h, eps, b);
  for (int64_t i = 0; i < t_rows * h; i++)
    x[i] += b[i];
}

/* Every layer of the model over T tokens: x [T, hidden] in, the residual stream out (in place).
 * Token t is at position pos[t] of cache row rows[t]. kc, vc: the cache, [layers, cache_rows,
 * kv_heads, cap, head_dim] float16. A layer:
 *     h = attn_norm(x); q|k|v = qkv(h); q, k = q_norm(q), k_norm(k); rope(q, k)
 *     x += post_attn_norm(o(attention))          (the norm only where the family has it)
 *     x += post_mlp_norm(down(act(gate) * up)),  gate|up = gate_up(mlp_norm(x))
 * Tokens [0, split) are generated ones (decode rows, a resumed request's delivered tokens),
 * [split, T) prompt tokens: each runs its kind's products (path_of). */
int layers_forward(const stack_t *s, float *x, int64_t t_rows, int64_t split, const int64_t *rows,
                   const int64_t *pos, uint16_t *kc, uint16_t *vc, int64_t cache_rows,
                   int64_t cap) {
  const int64_t h = s->hidden, qd = s->heads * s->head_dim;
  const int64_t qkv_n = (s->heads + 2 * s->kv_heads) * s->head_dim;
  const int64_t layer_size = cache_rows * s->kv_heads * cap * s->head_dim;
  float *norm = scratch(sizeof(float) * (size_t)(t_rows * h));
  float *branch = scratch(sizeof(float) * (size_t)(t_rows * h));
  float *qkv = scratch(sizeof(float) * (size_t)(t_rows * qkv_n));
  float *attn = scratch(sizeof(float) * (size_t)(t_rows * qd));
  float *gu = scratch(sizeof(float) * (size_t)(t_rows * 2 * s->inter));
  float *act = scratch(sizeof(float) * (size_t)(t_rows * s->inter));
  int r = (norm && branch && qkv && attn && gu && act) ? 0 : -1;
  for (int64_t i = 0; i < s->layers && r == 0; i++) {
    const layer_t *l = s->layer + i;
    rms_norm(x, l->attn_norm, t_rows, h, s->eps, norm);
    r |= split_products(l->qkv, l->qkv_parts, norm, t_rows, split, qkv, qkv_n, 0);
    for (int64_t t = 0; t < t_rows && (l->q_norm || l->k_norm); t++) {
      float *row = qkv + t * qkv_n;
      if (l->q_norm)
        rms_norm(row, l->q_norm, s->heads, s->head_dim, s->eps, row);
      if (l->k_norm)
        rms_norm(row + qd, l->k_norm, s->kv_heads, s->head_dim, s->eps, row + qd);
    }
    rope(qkv, t_rows, qkv_n, s->heads + s->kv_heads, s->head_dim, s->rot, pos, l->cos, l->sin,
         s->neox);
    r |= attention(qkv, t_rows, qkv_n, s->heads, s->kv_heads, s->head_dim, kc + i * layer_size,
                   vc + i * layer_size, cap, rows, pos, s->scale, l->window, s->softcap, attn);
    if (l->post_attn_norm) {
      r |= split_products(&l->o, 1, attn, t_rows, split, branch, h, 0);
      add_branch(x, branch, l->post_attn_norm, t_rows, h, s->eps);
    } else {
      r |= split_products(&l->o, 1, attn, t_rows, split, x, h, 1);
    }
    rms_norm(x, l->mlp_norm, t_rows, h, s->eps, norm);
    r |= split_products(l->gate_up, l->gate_up_parts, norm, t_rows, split, gu, 2 * s->inter, 0);
    glu(gu, t_rows, s->inter, s->act, act);
    if (l->post_mlp_norm) {
      r |= split_products(&l->down, 1, act, t_rows, split, branch, h, 0);
      add_branch(x, branch, l->post_mlp_norm, t_rows, h, s->eps);
    } else {
      r |= split_products(&l->down, 1, act, t_rows, split, x, h, 1);
    }
  }
  free(norm), free(branch), free(qkv), free(attn), free(gu), free(act);
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

/* the vector width this build was made for: 256 (AVX2) or 512 (AVX-512), + 1 with VNNI */
int vector_bits(void) {
#ifdef __AVX512BW__
#ifdef __AVX512VNNI__
  return 513;
#else
  return 512;
#endif
#else
  return 256;
#endif
}
