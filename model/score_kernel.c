/* The mask decoder for single-point prompts on a shared image side (the automatic generator's
 * grids), one prompt at a time: score_prompts is MaskDecoder.score (the two-way transformer's
 * blocks, the IoU token's final attention, the IoU head), mask_prompts is its finish and
 * masks_from. A prompt's image-side tensors (C x hw: 128 KB for the bundled model) stay in the
 * core's cache through all of its steps, where torch makes a pass over the whole batch's
 * tensors (8 MB per 64 prompts) for every op.
 *
 * Image-side tensors are channel-major (C x hw), so LayerNorms over channels, softmaxes over
 * the tokens and every per-pixel step run as vector operations across pixels. Same function as
 * model/transformer.py's folded inference paths and model/mask_decoder.py (float32 throughout;
 * sums run in another order, so the last bits may differ). Built and called by
 * model/score_kernel.py; weights arrive transposed where a matmul reads them as its right-hand
 * side. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Vectors as wide as the CPU's registers: GCC and Clang split a wider vector type into
 * register-sized pieces through the stack (AVX2 with 16-float vectors ran the matmuls 7x
 * slower than with 8). */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4 /* SSE2, NEON */
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsplat(float x) { return (vf){0} + x; }
static inline vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
static int round_lanes(int n) { return (n + VL - 1) / VL * VL; }
#if defined(__AVX512F__) || defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
/* the lanes of a vector that hold the first n (< 16: a tail) of the values left */
static inline __mmask16 lanes_of(long n) { return n >= VL ? 0xFFFF : (__mmask16)((1u << n) - 1); }
#endif

/* ---------------------------------------------------------------- matmul
 * C[i, j] = sum_k A[i * sai + k * sak] * B[k * ldb + j], i < M, j < N, k < K:
 * A read through any strides (its values are broadcast), B's rows contiguous. Column panels
 * of a few vectors (a panel of B stays in L1 while every row block passes over it), register
 * blocks as many as the CPU's vector registers hold (see gemm). */
static inline __attribute__((always_inline)) void kern(int R, int V, int K, const float *A, long sai, long sak,
                                                        const float *B, long ldb, float *C, long ldc) {
  vf c[8][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) c[r][v] = (vf){0};
  for (int k = 0; k < K; k++) {
    const float *b = B + k * ldb;
    vf bv[4];
    for (int v = 0; v < V; v++) bv[v] = vload(b + v * VL);
    for (int r = 0; r < R; r++) {
      float a = A[r * sai + k * sak];
      for (int v = 0; v < V; v++) c[r][v] += a * bv[v];
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) vstore(C + r * ldc + v * VL, c[r][v]);
}

#define KERN_ROWS(V, rows)                                                                           \
  switch (rows) {                                                                                    \
    case 8: kern(8, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 7: kern(7, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 6: kern(6, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 5: kern(5, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 4: kern(4, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 3: kern(3, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 2: kern(2, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
    case 1: kern(1, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc); break;       \
  }

/* The column panels of V vectors from column j on, in row blocks of at most R rows, as even
 * as they come (7 rows in blocks of 6: 4 and 3; a lone row's few sums would wait on each
 * other's multiply-adds); returns the first column left. */
static inline __attribute__((always_inline)) int panels(int V, int R, int j, int M, int N, int K, const float *A,
                                                        long sai, long sak, const float *B, long ldb, float *C,
                                                        long ldc) {
  int blocks = (M + R - 1) / R;
  for (; j + V * VL <= N; j += V * VL)
    for (int i = 0, b = 0; i < M; b++) {
      int rows = (M - i + blocks - b - 1) / (blocks - b);
      if (rows == R) kern(R, V, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc);
      else KERN_ROWS(V, rows)
      i += rows;
    }
  return j;
}

static void gemm(int M, int N, int K, const float *A, long sai, long sak, const float *B, long ldb, float *C,
                 long ldc) {
  int j = 0;
#if VL == 16 /* 32 vector registers: blocks of 4 x 4, 8 x 2, 8 x 1 vectors */
  j = panels(4, 4, j, M, N, K, A, sai, sak, B, ldb, C, ldc);
  j = panels(2, 8, j, M, N, K, A, sai, sak, B, ldb, C, ldc);
#else /* 16: 6 x 2 (12 sums, 2 of B's vectors and A's broadcast value), 8 x 1; up to 8 rows
       * (the tokens) in one block of 2 vectors, B's read from memory, and up to 3 rows in one of
       * 4 vectors (more sums in flight). AMD Zen 3, GFLOP/s: 7 x 256 x 16 52 against 43 in
       * blocks of 4 + 3 rows; 1 x 128 x 128 30 against 22; 3 x 256 x 16 50 against 43. */
  if (M <= 3) j = panels(4, 3, j, M, N, K, A, sai, sak, B, ldb, C, ldc);
  if (M <= 8) j = panels(2, 8, j, M, N, K, A, sai, sak, B, ldb, C, ldc);
  else j = panels(2, 6, j, M, N, K, A, sai, sak, B, ldb, C, ldc);
#endif
  j = panels(1, 8, j, M, N, K, A, sai, sak, B, ldb, C, ldc);
  for (; j < N; j++)
    for (int i = 0; i < M; i++) {
      float s = 0.0f;
      for (int k = 0; k < K; k++) s += A[i * sai + k * sak] * B[k * ldb + j];
      C[i * ldc + j] = s;
    }
}

/* ---------------------------------------------------------------- bf16 matmul
 * Where the CPU has AVX512-BF16 (and the caller asks for it: precision bf16), the largest
 * matmuls take bf16 operands with float32 sums: vdpbf16ps multiplies pairs of bf16 along k,
 * twice fp32's multiply-adds per instruction. Operands are rounded to bf16 (nearest even) as
 * they are packed: pairs (k, k + 1) side by side, an odd K padded with a zero row.
 *   k-major (K x N, rows along N contiguous, as image-side tensors and transposed weights lie):
 *     P[k2][n] = (x[2 k2][n], x[2 k2 + 1][n]), rows of round_lanes(N) pairs (padding zero);
 *   row-major (M x K, rows along K contiguous, as tokens lie): P[i][k2], rows of K2 pairs.
 * The product reads A's pairs through strides (a_i, a_k) and B's k-major pairs. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16 1
typedef uint32_t pair;

static inline uint32_t bf16_bits(float x) {  /* round to nearest even (finite x) */
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

static long pairs_k_major(int K, int N) { return (long)(K + 1) / 2 * round_lanes(N); }

static void pack_k_major(int K, int N, const float *x, long ldx, pair *P) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  int ld = round_lanes(N);
  for (int k = 0; k < K; k += 2) {
    const float *r0 = x + (long)k * ldx, *r1 = r0 + ldx;
    pair *dst = P + (long)(k / 2) * ld;
    for (int j = 0; j < ld; j += 16) {
      __mmask16 m = lanes_of(N - j);
      __m512 lo = _mm512_maskz_loadu_ps(m, r0 + j);
      __m512 hi = k + 1 < K ? _mm512_maskz_loadu_ps(m, r1 + j) : _mm512_setzero_ps();
      __m512i b = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  /* lanes 0-15: row k, 16-31: row k + 1 */
      _mm512_storeu_si512(dst + j, _mm512_permutexvar_epi16(interleave, b));
    }
  }
}

static long pairs_row_major(int M, int K) { return (long)M * ((K + 1) / 2); }

static void pack_row_major(int M, int K, const float *x, long ldx, pair *P) {
  int K2 = (K + 1) / 2;
  for (int i = 0; i < M; i++) {
    const float *r = x + (long)i * ldx;
    pair *dst = P + (long)i * K2;
    int k = 0;
    for (; k + 32 <= K; k += 32)  /* in order: bf16 values side by side are the pairs */
      _mm512_storeu_si512(dst + k / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + k + 16),
                                                                     _mm512_loadu_ps(r + k)));
    for (; k < K; k += 2)
      dst[k / 2] = bf16_bits(r[k]) | (k + 1 < K ? bf16_bits(r[k + 1]) << 16 : 0u);
  }
}

static inline __attribute__((always_inline)) void kern_bf16(int R, int V, int K2, const pair *A, long a_i,
                                                             long a_k, const pair *B, long ldb, float *C,
                                                             long ldc, __mmask16 last) {
  __m512 c[8][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) c[r][v] = _mm512_setzero_ps();
  for (int k = 0; k < K2; k++) {
    __m512bh bv[4];
    for (int v = 0; v < V; v++) bv[v] = (__m512bh)_mm512_loadu_si512(B + k * ldb + v * 16);
    for (int r = 0; r < R; r++) {
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[r * a_i + k * a_k]);
      for (int v = 0; v < V; v++) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, bv[v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) _mm512_mask_storeu_ps(C + r * ldc + v * 16, v == V - 1 ? last : 0xFFFF, c[r][v]);
}

#define KERN_BF16_ROWS(V, rows, last)                                                                 \
  switch (rows) {                                                                                    \
    case 8: kern_bf16(8, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 7: kern_bf16(7, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 6: kern_bf16(6, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 5: kern_bf16(5, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 4: kern_bf16(4, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 3: kern_bf16(3, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 2: kern_bf16(2, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
    case 1: kern_bf16(1, V, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last); break; \
  }

/* C (M x N, row stride ldc) = A B: A's pairs at A[i * a_i + k2 * a_k], B k-major pairs */
static void gemm_bf16(int M, int N, int K, const pair *A, long a_i, long a_k, const pair *B, float *C, long ldc) {
  int K2 = (K + 1) / 2, j = 0;
  long ldb = round_lanes(N);
  for (; j + 64 <= N; j += 64)
    for (int i = 0; i < M; i += 4) {
      if (M - i >= 4) kern_bf16(4, 4, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, 0xFFFF);
      else KERN_BF16_ROWS(4, M - i, 0xFFFF)
    }
  for (; j < N; j += 16) {
    __mmask16 last = lanes_of(N - j);
    for (int i = 0; i < M; i += 8) {
      if (M - i >= 8) kern_bf16(8, 1, K2, A + i * a_i, a_i, a_k, B + j, ldb, C + i * ldc + j, ldc, last);
      else KERN_BF16_ROWS(1, M - i, last)
    }
  }
}
#else
#define HAVE_BF16 0
typedef uint32_t pair;
static long pairs_k_major(int K, int N) { (void)K, (void)N; return 0; }
static long pairs_row_major(int M, int K) { (void)M, (void)K; return 0; }
#endif

/* Whether this build has the bf16 matmuls (score_prompts and mask_prompts take them when asked). */
int kernel_bf16(void) { return HAVE_BF16; }
/* floats per vector this build computes with (16: AVX-512, 8: AVX/AVX2, 4: SSE2/NEON) */
int kernel_lanes(void) { return VL; }

/* A kernel call's bf16 switch and the space its products pack operands into */
typedef struct { int on; pair *work; } bf16_ctx;

/* pairs mm() packs for an A of M x K (row-major: sak == 1, else k-major) and a B of K x N */
static long mm_pairs(int M, int N, int K, long sak) {
  return (sak == 1 ? pairs_row_major(M, K) : pairs_k_major(K, M)) + pairs_k_major(K, N);
}

/* C = A B as gemm() takes them; in bf16 where bf->on, A row-major (sak == 1) or k-major (sai
 * == 1), B k-major, each packed into bf->work unless the caller packed it already: ap, A's
 * k-major pairs, and bp, B's (an operand given packed is not read) */
static void mm(const bf16_ctx *bf, int M, int N, int K, const float *A, long sai, long sak, const pair *ap,
               const float *B, long ldb, const pair *bp, float *C, long ldc) {
#if HAVE_BF16
  if (bf->on) {
    pair *rest = bf->work;
    long a_i = 1, a_k = round_lanes(M);  /* k-major */
    if (!ap && sak == 1) {
      pack_row_major(M, K, A, sai, rest);
      ap = rest, a_i = (K + 1) / 2, a_k = 1, rest += pairs_row_major(M, K);
    } else if (!ap) {
      pack_k_major(K, M, A, sak, rest);
      ap = rest, rest += pairs_k_major(K, M);
    }
    if (!bp) pack_k_major(K, N, B, ldb, rest);
    gemm_bf16(M, N, K, ap, a_i, a_k, bp ? bp : rest, C, ldc);
    return;
  }
#endif
  (void)ap, (void)bp, (void)bf;
  gemm(M, N, K, A, sai, sak, B, ldb, C, ldc);
}

/* y (M x out) = x (M x in, row stride ldx) @ WT (in x out) + b; in bf16 where wp holds WT's
 * pairs (k-major; packed only where bf->on) */
static void linear_bf(const bf16_ctx *bf, int M, int in, int out, const float *x, long ldx, const float *WT,
                      const pair *wp, const float *b, float *y) {
  if (wp) mm(bf, M, out, in, x, ldx, 1, NULL, NULL, 0, wp, y, out);
  else gemm(M, out, in, x, ldx, 1, WT, out, y, out);
  if (b)
    for (int i = 0; i < M; i++)
      for (int j = 0; j < out; j++) y[i * out + j] += b[j];
}

static void linear(int M, int in, int out, const float *x, long ldx, const float *WT, const float *b, float *y) {
  linear_bf(NULL, M, in, out, x, ldx, WT, NULL, b, y);
}

/* out[i]: the sum of a[i]'s lanes, i < 16. With 16 lanes, a tree of lane shuffles and adds
 * (15 steps for 16 vectors where storing and adding lanes one by one takes 256); narrower
 * vectors, and compilers without __builtin_shufflevector (GCC before 12), add them one by one. */
#if VL == 16 && (defined(__clang__) || __GNUC__ >= 12)  /* __builtin_shufflevector */
#define SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
static inline void lane_sums(vf a[16], float out[16]) {
  vf h8[8], h4[4], h2[2];
  for (int i = 0; i < 8; i++)
    h8[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            SHUF(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; i++)
    h4[i] = SHUF(h8[2 * i], h8[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            SHUF(h8[2 * i], h8[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; i++)
    h2[i] = SHUF(h4[2 * i], h4[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            SHUF(h4[2 * i], h4[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  vstore(out, SHUF(h2[0], h2[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUF(h2[0], h2[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}
#else
static inline void lane_sums(vf a[16], float out[16]) {
  float lanes[VL];
  for (int i = 0; i < 16; i++) {
    vstore(lanes, a[i]);
    out[i] = 0.0f;
    for (int l = 0; l < VL; l++) out[i] += lanes[l];
  }
}
#endif

/* C[i * ldc + j] = sum_n A[i * N + n] B[j * N + n], i < M (a multiple of 4), j < J: products
 * of rows with few other rows (a softmax's weights per head), blocks of 4 x 4 dot products
 * across n, without padding the few rows to a vector's width. */
static void dots(int M, int J, int N, const float *A, const float *B, float *C, long ldc) {
  for (int j0 = 0; j0 < J; j0 += 4) {
    const float *b[4];
    for (int y = 0; y < 4; y++) b[y] = B + (long)(j0 + y < J ? j0 + y : J - 1) * N;  /* tail: repeats */
    for (int i0 = 0; i0 < M; i0 += 4) {
      vf acc[16];
      for (int k = 0; k < 16; k++) acc[k] = (vf){0};
      const float *a = A + (long)i0 * N;
      int n = 0;
      for (; n + VL <= N; n += VL) {
        vf bv[4];
        for (int y = 0; y < 4; y++) bv[y] = vload(b[y] + n);
        for (int x = 0; x < 4; x++) {
          vf av = vload(a + (long)x * N + n);
          for (int y = 0; y < 4; y++) acc[x * 4 + y] += av * bv[y];
        }
      }
      if (n < N) {
        float ab[4][VL] = {{0}}, bb[4][VL] = {{0}};
        for (int x = 0; x < 4; x++) memcpy(ab[x], a + (long)x * N + n, sizeof(float) * (N - n));
        for (int y = 0; y < 4; y++) memcpy(bb[y], b[y] + n, sizeof(float) * (N - n));
        for (int x = 0; x < 4; x++)
          for (int y = 0; y < 4; y++) acc[x * 4 + y] += vload(ab[x]) * vload(bb[y]);
      }
      float sums[16];
      lane_sums(acc, sums);
      for (int x = 0; x < 4; x++)
        for (int y = 0; y < 4 && j0 + y < J; y++) C[(long)(i0 + x) * ldc + j0 + y] = sums[x * 4 + y];
    }
  }
}

/* ---------------------------------------------------------------- elementwise */
/* exp(x) for a vector of x <= 0 (the softmaxes' shifted scores, erf's -x^2): Cody-Waite
 * reduction to r in [-ln2/2, ln2/2] (n rounded by the 1.5 * 2^23 trick) and a degree-6
 * polynomial (relative error ~1e-7); at or below -87.3 the result is 0, as for the softmax
 * weights it serves. */
static inline vf vexp(vf x) {
  const float lo = -87.33654f, magic = 12582912.0f;
  vi under = x <= lo;
  x = vsel(under, vsplat(lo), x);
  vf k = x * 1.44269504f + magic;  /* n + magic: its low mantissa bits hold n */
  vf n = k - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi kbits;
  memcpy(&kbits, &k, sizeof kbits);
  vi e = (kbits - 0x4B400000 + 127) << 23;  /* 2^n */
  vf scale;
  memcpy(&scale, &e, sizeof scale);
  return vsel(under, vsplat(0.0f), p * scale);
}

/* sum of x[0 .. n) and of its squares (x - shift)^2, a vector at a time */
static inline float vsum(const float *x, int n, float shift, int squares) {
  vf acc = {0};
  int i = 0;
  for (; i + VL <= n; i += VL) {
    vf v = vload(x + i) - shift;
    acc += squares ? v * v : v;
  }
  float buf[VL], s = 0.0f;
  vstore(buf, acc);
  for (int l = 0; l < VL; l++) s += buf[l];
  for (; i < n; i++) s += squares ? (x[i] - shift) * (x[i] - shift) : x[i];
  return s;
}

/* sum of a[i] b[i], i < n, a vector at a time */
static inline float vdot(const float *a, const float *b, int n) {
  vf acc = {0};
  int i = 0;
  for (; i + VL <= n; i += VL) acc += vload(a + i) * vload(b + i);
  float buf[VL], s = 0.0f;
  vstore(buf, acc);
  for (int l = 0; l < VL; l++) s += buf[l];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* r[j] = exp(r[j] - (m ? m[j] : shift)), j < n: every shifted value <= 0 */
static void exp_shifted(float *r, int n, const float *m, float shift) {
  int j = 0;
  for (; j + VL <= n; j += VL) vstore(r + j, vexp(vload(r + j) - (m ? vload(m + j) : vsplat(shift))));
  if (j < n) {
    float buf[VL], mb[VL] = {0};  /* unused lanes: exp(0) */
    for (int l = 0; l < VL; l++) buf[l] = m ? 0.0f : shift;
    memcpy(buf, r + j, sizeof(float) * (n - j));
    if (m) memcpy(mb, m + j, sizeof(float) * (n - j));
    vstore(buf, vexp(vload(buf) - (m ? vload(mb) : vsplat(shift))));
    memcpy(r + j, buf, sizeof(float) * (n - j));
  }
}

/* Weights below the smallest normal float become 0 (model/transformer.py's _softmax). */
static inline float flush(float w) { return w < 1.17549435e-38f ? 0.0f : w; }

/* softmax over each row of x (M x N, row stride ld), in place, or into xt transposed (N x
 * ldt, its columns M .. ldt zeroed) where the next product wants the weights as columns */
static void softmax_rows(int M, int N, float *x, long ld, float *xt, int ldt) {
  for (int i = 0; i < M; i++) {
    float *r = x + i * ld, m = r[0];
    int j = 0;
    if (N >= VL) {
      vf vm = vload(r);
      for (j = VL; j + VL <= N; j += VL) vm = vsel(vload(r + j) > vm, vload(r + j), vm);
      float buf[VL];
      vstore(buf, vm);
      for (int l = 0; l < VL; l++) m = buf[l] > m ? buf[l] : m;
    }
    for (; j < N; j++) m = r[j] > m ? r[j] : m;
    exp_shifted(r, N, NULL, m);
    float inv = 1.0f / vsum(r, N, 0.0f, 0);
    if (xt)
      for (j = 0; j < N; j++) xt[(long)j * ldt + i] = flush(r[j] * inv);
    else
      for (j = 0; j < N; j++) r[j] = flush(r[j] * inv);
  }
  if (xt)
    for (int j = 0; j < N; j++)
      for (int i = M; i < ldt; i++) xt[(long)j * ldt + i] = 0.0f;
}

/* softmax over each column j < N of x (M rows, row stride ld): across rows, vectors across columns */
static void softmax_cols(int M, int N, float *x, long ld, float *work /* 2 N */) {
  float *m = work, *s = work + N;
  for (int j = 0; j < N; j++) m[j] = x[j], s[j] = 0.0f;
  for (int i = 1; i < M; i++)
    for (int j = 0; j < N; j++) m[j] = x[i * ld + j] > m[j] ? x[i * ld + j] : m[j];
  for (int i = 0; i < M; i++) {
    float *r = x + i * ld;
    exp_shifted(r, N, m, 0.0f);
    for (int j = 0; j < N; j++) s[j] += r[j];
  }
  for (int j = 0; j < N; j++) s[j] = 1.0f / s[j];
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) x[i * ld + j] = flush(x[i * ld + j] * s[j]);
}

/* y = LayerNorm(x) over rows of C (y may be x) */
static void layernorm(int M, int C, const float *x, float *y, const float *w, const float *b, float eps) {
  for (int i = 0; i < M; i++) {
    const float *r = x + (long)i * C;
    float mean = vsum(r, C, 0.0f, 0) / C, var = vsum(r, C, mean, 1);
    float rstd = 1.0f / sqrtf(var / C + eps);
    float *o = y + (long)i * C;
    for (int c = 0; c < C; c++) o[c] = (r[c] - mean) * rstd * w[c] + b[c];
  }
}

static void add(long n, const float *a, const float *b, float *y) {
  for (long i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* y = LayerNorm(x) over the rows of each column: x, y C x N (channel-major; y may be x);
 * with pe (C x N), also ype = y + pe. stats: 2 N floats. Two sweeps along the rows, each
 * pixel's statistics in vectors across pixels: sums of the values and of their squares taken
 * relative to the first row's value (no cancellation for a column far from 0), then the
 * normalized rows. (Walking a column's C values instead strides by N, which for N a power of
 * two maps them to a few cache sets and misses on every pass.) */
static void layernorm_cols(int C, int N, const float *x, float *y, const float *w, const float *b, float eps,
                           const float *pe, float *ype, float *stats) {
  float *mean = stats, *rstd = stats + N;
  int n;
  for (n = 0; n < N; n++) mean[n] = rstd[n] = 0.0f;
  for (int c = 1; c < C; c++) {
    const float *r = x + (long)c * N;
    for (n = 0; n + VL <= N; n += VL) {
      vf d = vload(r + n) - vload(x + n);
      vstore(mean + n, vload(mean + n) + d);
      vstore(rstd + n, vload(rstd + n) + d * d);
    }
    for (; n < N; n++) {
      float d = r[n] - x[n];
      mean[n] += d, rstd[n] += d * d;
    }
  }
  for (n = 0; n < N; n++) {
    float m = mean[n] / C, var = rstd[n] / C - m * m;
    mean[n] = x[n] + m;
    rstd[n] = 1.0f / sqrtf((var > 0.0f ? var : 0.0f) + eps);
  }
  for (int c = 0; c < C; c++) {
    const float *r = x + (long)c * N;
    float *o = y + (long)c * N;
    float wc = w[c], bc = b[c];
    for (n = 0; n + VL <= N; n += VL) {
      vf v = (vload(r + n) - vload(mean + n)) * vload(rstd + n) * wc + bc;
      vstore(o + n, v);
      if (pe) vstore(ype + (long)c * N + n, v + vload(pe + (long)c * N + n));
    }
    for (; n < N; n++) {
      float v = (r[n] - mean[n]) * rstd[n] * wc + bc;
      o[n] = v;
      if (pe) ype[(long)c * N + n] = v + pe[(long)c * N + n];
    }
  }
}

/* ---------------------------------------------------------------- model */
/* Dimensions, in this order (dims[]), and whether to multiply in bf16 (where kernel_bf16()). */
enum { D_C, D_T, D_N, D_H, D_DI, D_MLP, D_IOU_HIDDEN, D_MASK_TOKENS, D_DEPTH, D_BF16, D_COUNT };

/* Weight pointers: per layer (L_* from layer * L_COUNT), then the final attention and IoU
 * head (F_* from depth * L_COUNT), then the image side shared by every prompt. WT: transposed
 * (in x out); W: as nn.Linear holds it (out x in), for the folded projections. */
enum {
  L_SA_WQT, L_SA_BQ, L_SA_WKT, L_SA_BK, L_SA_WVT, L_SA_BV, L_SA_WOT, L_SA_BO, L_N1_W, L_N1_B,
  L_TI_WQT, L_TI_BQ, L_TI_WK, L_TI_WVT, L_TI_BV, L_TI_WOT, L_TI_BO, L_N2_W, L_N2_B,
  L_M_W1T, L_M_B1, L_M_W2T, L_M_B2, L_N3_W, L_N3_B,
  L_IT_WKT, L_IT_BK, L_IT_WQ, L_IT_BQ, L_IT_WVT, L_IT_BV, L_IT_WOT, L_IT_BO, L_N4_W, L_N4_B,
  L_COUNT
};
enum {
  F_WQT, F_BQ, F_WK, F_WVT, F_BV, F_WOT, F_BO, F_NF_W, F_NF_B,
  F_IOU_W1T, F_IOU_B1, F_IOU_W2T, F_IOU_B2, F_IOU_W3T, F_IOU_B3,
  /* the image side, channel-major: src (C x N, the embedding plus the no-mask embedding),
   * its positional encoding (C x N), the first block's token -> image keys (Di x N) and
   * values (N x Di, row-major), and its image -> token queries (Di x N) */
  F_SRC, F_PE, F_K1T, F_V1, F_QIMG,
  F_COUNT
};
/* An attention's weights, as L_TI_WQT .. L_TI_BO and F_WQT .. F_BO lay them out. */
enum { A_WQT, A_BQ, A_WK, A_WVT, A_BV, A_WOT, A_BO };

static const float EPS = 1e-5f;

static long lmax(long a, long b) { return a > b ? a : b; }

/* scratch of tokens_to_image for T tokens */
static long t2i_floats(long C, long N, long H, long Di, long T) {
  long TH = T * H, P = round_lanes(TH);
  return 2 * T * Di + TH * C + TH * N + N * P + C * P + 2 * N;
}

/* The bf16 pairs of a block's token-side weights (self-attention's q, k, v and out, the MLP),
 * packed once per call where the call multiplies in bf16; wp[P_*] points at them. */
enum { P_SA_Q, P_SA_K, P_SA_V, P_SA_O, P_M1, P_M2, P_COUNT };
enum { MAX_DEPTH = 16 };

static long layer_pairs(long C, long mlp) {
  return 4 * pairs_k_major(C, C) + pairs_k_major(C, mlp) + pairs_k_major(mlp, C);
}

#if HAVE_BF16
static pair *pack_layer(const int *dims, const float *const *lw, pair *dst, const pair **wp) {
  int C = dims[D_C], mlp = dims[D_MLP];
  const int src[P_COUNT] = {L_SA_WQT, L_SA_WKT, L_SA_WVT, L_SA_WOT, L_M_W1T, L_M_W2T};
  const int in[P_COUNT] = {C, C, C, C, C, mlp}, out[P_COUNT] = {C, C, C, C, mlp, C};
  for (int i = 0; i < P_COUNT; i++) {
    pack_k_major(in[i], out[i], lw[src[i]], out[i], dst);
    wp[i] = dst;
    dst += pairs_k_major(in[i], out[i]);
  }
  return dst;
}
#endif

/* the packing space of tokens_to_image's and image_to_tokens' products for T tokens */
static long attention_pairs(long C, long N, long H, long T) {
  long TH = T * H;
  return lmax(lmax(mm_pairs(TH, N, C, 1), mm_pairs(C, round_lanes(TH), N, 1)),
              lmax(mm_pairs(T, N, C, 1), mm_pairs(C, N, TH, C)));
}

/* score_prompts' bf16 packing space: the blocks' weights, an image tensor, the products' operands */
static long score_pairs(const int *dims) {
  long C = dims[D_C], T = dims[D_T], N = dims[D_N], mlp = dims[D_MLP];
  return dims[D_DEPTH] * layer_pairs(C, mlp) + pairs_k_major(C, N) +
         lmax(attention_pairs(C, N, dims[D_H], T), pairs_row_major(T, lmax(C, mlp)));
}

long score_scratch_floats(const int *dims) {
  long C = dims[D_C], T = dims[D_T], N = dims[D_N], H = dims[D_H], Di = dims[D_DI], mlp = dims[D_MLP];
  long TH = T * H, hid = dims[D_IOU_HIDDEN];
  long sub = 4 * T * C + T * T;                                              /* self_attention */
  sub = lmax(sub, t2i_floats(C, N, H, Di, T));                               /* tokens_to_image */
  sub = lmax(sub, 2 * T * Di + T * N);                                       /* tokens_to_shared_image */
  sub = lmax(sub, 2 * T * Di + 2 * TH * C + TH * N + 2 * N);                 /* image_to_tokens */
  sub = lmax(sub, 3 * N + 2 * C + 2 * Di + 3 * H * C + 2 * H * N + C * H + 2 * hid + 2 * N);  /* iou_of */
  return 3 * N * C + score_pairs(dims) + 3 * T * C + T * mlp + sub;
}

/* Self-attention of the T tokens: q, k from qk_in, v from v_in; out (T x C). */
static void self_attention(const int *dims, const float *const *w, const float *qk_in, const float *v_in,
                           float *out, float *s, const bf16_ctx *bf, const pair *const *wp) {
  int C = dims[D_C], T = dims[D_T], H = dims[D_H], d = C / H;
  float *q = s, *k = q + T * C, *v = k + T * C, *att = v + T * C, *p = att + T * C;
  linear_bf(bf, T, C, C, qk_in, C, w[L_SA_WQT], wp[P_SA_Q], w[L_SA_BQ], q);
  linear_bf(bf, T, C, C, qk_in, C, w[L_SA_WKT], wp[P_SA_K], w[L_SA_BK], k);
  linear_bf(bf, T, C, C, v_in, C, w[L_SA_WVT], wp[P_SA_V], w[L_SA_BV], v);
  float scale = 1.0f / sqrtf((float)d);
  for (int h = 0; h < H; h++) {
    for (int i = 0; i < T; i++)
      for (int j = 0; j < T; j++) p[i * T + j] = vdot(q + i * C + h * d, k + j * C + h * d, d) * scale;
    softmax_rows(T, T, p, T, NULL, 0);
    for (int i = 0; i < T; i++) {  /* att[i, h] = sum_j p[i, j] v[j, h], a vector of channels at a time */
      float *a = att + i * C + h * d;
      memset(a, 0, sizeof(float) * d);
      for (int j = 0; j < T; j++) {
        const float *vj = v + j * C + h * d;
        float pij = p[i * T + j];
        int c = 0;
        for (; c + VL <= d; c += VL) vstore(a + c, vload(a + c) + pij * vload(vj + c));
        for (; c < d; c++) a[c] += pij * vj[c];
      }
    }
  }
  linear_bf(bf, T, C, C, att, C, w[L_SA_WOT], wp[P_SA_O], w[L_SA_BO], out);
}

/* Attention of T tokens (x: T x C) to per-prompt image keys + pe (kpT: C x N) with values keysT
 * (C x N), folded (transformer.py's Attention._few_queries); out (T x C). kp_pairs: kpT's
 * k-major pairs, where the caller packed them (bf->on), or NULL. */
static void tokens_to_image(const int *dims, const float *const *aw, int T, const float *x, const float *kpT,
                            const float *keysT, float *out, float *s, const bf16_ctx *bf, const pair *kp_pairs) {
  int C = dims[D_C], N = dims[D_N], H = dims[D_H], Di = dims[D_DI], d = Di / H;
  int TH = T * H, P = round_lanes(TH);
  float *qh = s, *att = qh + T * Di, *F = att + T * Di, *scores = F + TH * C, *wT = scores + (long)TH * N,
        *pooledT = wT + (long)N * P;
  linear(T, C, Di, x, C, aw[A_WQT], aw[A_BQ], qh);
  float scale = 1.0f / sqrtf((float)d);
  for (int i = 0; i < T * Di; i++) qh[i] *= scale;
  for (int h = 0; h < H; h++)  /* F[t * H + h] = qh[t, h] @ Wk[h] */
    gemm(T, C, d, qh + h * d, Di, 1, aw[A_WK] + (long)h * d * C, C, F + h * C, (long)H * C);
  mm(bf, TH, N, C, F, C, 1, NULL, kpT, N, kp_pairs, scores, N);  /* (t, h) x N */
  softmax_rows(TH, N, scores, N, wT, P);
  mm(bf, C, P, N, keysT, N, 1, NULL, wT, P, NULL, pooledT, P);  /* pooled^T: C x (t, h) */
  for (int h = 0; h < H; h++)  /* att[t, h] = pooled[t, h] @ Wv[h]^T */
    gemm(T, d, C, pooledT + h, H, P, aw[A_WVT] + h * d, Di, att + h * d, Di);
  for (int t = 0; t < T; t++)
    for (int i = 0; i < Di; i++) att[t * Di + i] += aw[A_BV][i];
  linear(T, Di, C, att, Di, aw[A_WOT], aw[A_BO], out);
}

/* The first block's tokens -> image attention: shared keys (K1T: Di x N) and values (V1:
 * N x Di), the plain path; out (T x C). */
static void tokens_to_shared_image(const int *dims, const float *const *w, const float *const *f,
                                   const float *x, float *out, float *s) {
  int C = dims[D_C], T = dims[D_T], N = dims[D_N], H = dims[D_H], Di = dims[D_DI], d = Di / H;
  float *q = s, *att = q + T * Di, *p = att + T * Di;
  linear(T, C, Di, x, C, w[L_TI_WQT], w[L_TI_BQ], q);
  float scale = 1.0f / sqrtf((float)d);
  for (int h = 0; h < H; h++) {
    gemm(T, N, d, q + h * d, Di, 1, f[F_K1T] + (long)h * d * N, N, p, N);
    for (int i = 0; i < T * N; i++) p[i] *= scale;
    softmax_rows(T, N, p, N, NULL, 0);
    gemm(T, d, N, p, N, 1, f[F_V1] + h * d, Di, att + h * d, Di);
  }
  linear(T, Di, C, att, Di, w[L_TI_WOT], w[L_TI_BO], out);
}

/* Image tokens attending to the T tokens (transformer.py's Attention._few_keys): outT (C x N),
 * residualT + attention. img: the image queries, either projected and shared (Di x N, the
 * first block) or the per-prompt keys + pe (C x N), folded into the token keys; where bf->on,
 * the latter's k-major pairs in img_pairs. */
static void image_to_tokens(const int *dims, const float *const *w, const float *tok_kp, const float *tok_v,
                            const float *img, int shared, const float *residualT, float *outT, float *s,
                            const bf16_ctx *bf, const pair *img_pairs) {
  int C = dims[D_C], T = dims[D_T], N = dims[D_N], H = dims[D_H], Di = dims[D_DI], d = Di / H;
  int TH = T * H;
  float *kh = s, *vh = kh + T * Di, *values = vh + T * Di, *folded = values + TH * C, *scores = folded + TH * C,
        *work = scores + (long)TH * N;
  linear(T, C, Di, tok_kp, C, w[L_IT_WKT], w[L_IT_BK], kh);
  float scale = 1.0f / sqrtf((float)d);
  for (int i = 0; i < T * Di; i++) kh[i] *= scale;
  for (int h = 0; h < H; h++) {  /* scores (h, t) x N */
    float *sh = scores + (long)h * T * N;
    if (shared) {
      gemm(T, N, d, kh + h * d, Di, 1, img + (long)h * d * N, N, sh, N);
    } else {  /* folded: row (h, t) = kh[t, h] @ Wq[h], plus kh[t, h] . bq[h] */
      gemm(T, C, d, kh + h * d, Di, 1, w[L_IT_WQ] + (long)h * d * C, C, folded + (long)h * T * C, C);
      mm(bf, T, N, C, folded + (long)h * T * C, C, 1, NULL, img, N, img_pairs, sh, N);
      for (int t = 0; t < T; t++) {
        float bias = 0.0f;
        for (int e = 0; e < d; e++) bias += kh[t * Di + h * d + e] * w[L_IT_BQ][h * d + e];
        for (int n = 0; n < N; n++) sh[(long)t * N + n] += bias;
      }
    }
    softmax_cols(T, N, sh, N, work);  /* over the tokens, for each pixel */
  }
  linear(T, C, Di, tok_v, C, w[L_IT_WVT], w[L_IT_BV], vh);
  for (int h = 0; h < H; h++) /* values[h, t] = vh[t, h] @ Wo[:, h]^T + bo / H */
    gemm(T, C, d, vh + h * d, Di, 1, w[L_IT_WOT] + (long)h * d * C, C, values + (long)h * T * C, C);
  for (int j = 0; j < TH; j++)
    for (int c = 0; c < C; c++) values[(long)j * C + c] += w[L_IT_BO][c] / H;
  mm(bf, C, N, TH, values, 1, C, NULL, scores, N, NULL, outT, N);  /* values^T @ weights */
  add((long)N * C, outT, residualT, outT);
}

/* The IoU token's final attention from the keys before the last LayerNorm (rawT: C x N;
 * transformer.py's Attention.few_queries_normalized) and the IoU head: iou (mask tokens). */
static void iou_of(const int *dims, const float *const *lw, const float *const *f, const float *queries,
                   const float *pe, const float *rawT, float *iou, float *s) {
  int C = dims[D_C], N = dims[D_N], H = dims[D_H], Di = dims[D_DI], d = Di / H, hid = dims[D_IOU_HIDDEN];
  const float *g = lw[L_N4_W], *b = lw[L_N4_B];
  float *mean = s, *scl = mean + N, *sq = scl + N, *x = sq + N, *qh = x + C, *folded = qh + Di, *gained = folded + H * C,
        *pooledT = gained + H * C, *scores = pooledT + C * H, *pos = scores + (long)H * N,
        *att = pos + (long)H * N, *o = att + Di, *h1 = o + C, *h2 = h1 + hid;
  float gsum[64], sm[64];
  memset(mean, 0, sizeof(float) * N);
  memset(sq, 0, sizeof(float) * N);
  for (int c = 0; c < C; c++) {  /* each pixel's mean and 1 / std over channels */
    const float *r = rawT + (long)c * N;
    for (int n = 0; n < N; n++) mean[n] += r[n], sq[n] += r[n] * r[n];
  }
  for (int n = 0; n < N; n++) {
    float m = mean[n] / C, var = sq[n] / C - m * m;
    mean[n] = m;
    scl[n] = 1.0f / sqrtf((var > 0.0f ? var : 0.0f) + EPS);
  }
  for (int c = 0; c < C; c++) x[c] = queries[c] + pe[c];
  linear(1, C, Di, x, C, f[F_WQT], f[F_BQ], qh);
  float scale = 1.0f / sqrtf((float)d);
  for (int i = 0; i < Di; i++) qh[i] *= scale;
  for (int h = 0; h < H; h++) {
    gemm(1, C, d, qh + h * d, 1, 1, f[F_WK] + (long)h * d * C, C, folded + h * C, C);
    gsum[h] = 0.0f;
    for (int c = 0; c < C; c++) {
      gained[h * C + c] = folded[h * C + c] * g[c];
      gsum[h] += gained[h * C + c];
    }
  }
  gemm(H, N, C, gained, C, 1, rawT, N, scores, N);
  gemm(H, N, C, folded, C, 1, f[F_PE], N, pos, N);
  for (int h = 0; h < H; h++)
    for (int n = 0; n < N; n++) {
      float *v = scores + (long)h * N + n;
      *v = (*v - gsum[h] * mean[n]) * scl[n] + pos[(long)h * N + n];
    }
  softmax_rows(H, N, scores, N, NULL, 0);
  for (int h = 0; h < H; h++) {
    sm[h] = 0.0f;
    for (int n = 0; n < N; n++) {
      float *v = scores + (long)h * N + n;
      *v *= scl[n];
      sm[h] += *v * mean[n];
    }
  }
  dots(C, H, N, rawT, scores, pooledT, H);  /* pooled^T: C x heads */
  for (int c = 0; c < C; c++)
    for (int h = 0; h < H; h++) pooledT[c * H + h] = (pooledT[c * H + h] - sm[h]) * g[c] + b[c];
  for (int h = 0; h < H; h++) gemm(1, d, C, pooledT + h, 1, H, f[F_WVT] + h * d, Di, att + h * d, Di);
  for (int i = 0; i < Di; i++) att[i] += f[F_BV][i];
  linear(1, Di, C, att, Di, f[F_WOT], f[F_BO], o);
  for (int c = 0; c < C; c++) o[c] += queries[c];
  layernorm(1, C, o, o, f[F_NF_W], f[F_NF_B], EPS);
  linear(1, C, hid, o, C, f[F_IOU_W1T], f[F_IOU_B1], h1);
  for (int i = 0; i < hid; i++) h1[i] = h1[i] > 0.0f ? h1[i] : 0.0f;
  linear(1, hid, hid, h1, hid, f[F_IOU_W2T], f[F_IOU_B2], h2);
  for (int i = 0; i < hid; i++) h2[i] = h2[i] > 0.0f ? h2[i] : 0.0f;
  linear(1, hid, dims[D_MASK_TOKENS], h2, hid, f[F_IOU_W3T], f[F_IOU_B3], iou);
}

/* Prompts [first, last): tokens (B x T x C, also their positional encoding) -> queries
 * (B x T x C, after the blocks), raw keys (B x C x N, channel-major, before the last
 * LayerNorm) and iou (B x mask tokens). scratch: score_scratch_floats(dims) floats. */
static void score_range(const int *dims, const float *const *w, int first, int last, const float *tokens,
                        float *queries_out, float *raw_out, float *iou_out, float *scratch) {
  int C = dims[D_C], T = dims[D_T], N = dims[D_N], depth = dims[D_DEPTH], mlp = dims[D_MLP];
  const float *const *f = w + (long)depth * L_COUNT;
  long NC = (long)N * C;
  float *keysT = scratch, *kpT = keysT + NC, *img_out = kpT + NC, *rest = img_out + NC + score_pairs(dims);
  float *q = rest, *x = q + T * C, *o = x + T * C, *hbuf = o + T * C, *sub = hbuf + (long)T * mlp;
  /* bf16: the blocks' token-side weights (packed once per call), an image tensor's pairs, the
   * products' operands */
  pair *layer_packs = (pair *)(img_out + NC), *img_pairs = layer_packs + depth * layer_pairs(C, mlp);
  bf16_ctx bfc = {HAVE_BF16 && dims[D_BF16], img_pairs + pairs_k_major(C, N)};
  const pair *wp[MAX_DEPTH][P_COUNT] = {{NULL}};
#if HAVE_BF16
  for (int l = 0; bfc.on && l < depth; l++) layer_packs = pack_layer(dims, w + (long)l * L_COUNT, layer_packs, wp[l]);
#endif
  for (int p = first; p < last; p++) {
    const float *pe = tokens + (long)p * T * C;
    float *rawT = raw_out + (long)p * NC;
    for (int l = 0; l < depth; l++) {
      const float *const *lw = w + (long)l * L_COUNT;
      int last_layer = l == depth - 1;
      if (l == 0) {
        self_attention(dims, lw, pe, pe, o, sub, &bfc, wp[l]);
        layernorm(T, C, o, q, lw[L_N1_W], lw[L_N1_B], EPS);
      } else {
        add(T * C, q, pe, x);
        self_attention(dims, lw, x, q, o, sub, &bfc, wp[l]);
        add(T * C, q, o, o);
        layernorm(T, C, o, q, lw[L_N1_W], lw[L_N1_B], EPS);
      }
      add(T * C, q, pe, x);
      if (l == 0) {
        tokens_to_shared_image(dims, lw, f, x, o, sub);
      } else {
#if HAVE_BF16
        if (bfc.on) pack_k_major(C, N, kpT, N, img_pairs);  /* for this block's two attentions */
#endif
        tokens_to_image(dims, lw + L_TI_WQT, T, x, kpT, keysT, o, sub, &bfc, bfc.on ? img_pairs : NULL);
      }
      add(T * C, q, o, o);
      layernorm(T, C, o, q, lw[L_N2_W], lw[L_N2_B], EPS);
      linear_bf(&bfc, T, C, mlp, q, C, lw[L_M_W1T], wp[l][P_M1], lw[L_M_B1], hbuf);
      for (long i = 0; i < (long)T * mlp; i++) hbuf[i] = hbuf[i] > 0.0f ? hbuf[i] : 0.0f;
      linear_bf(&bfc, T, mlp, C, hbuf, mlp, lw[L_M_W2T], wp[l][P_M2], lw[L_M_B2], o);
      add(T * C, q, o, o);
      layernorm(T, C, o, q, lw[L_N3_W], lw[L_N3_B], EPS);
      add(T * C, q, pe, x);
      float *dst = last_layer ? rawT : img_out;
      if (l == 0) image_to_tokens(dims, lw, x, q, f[F_QIMG], 1, f[F_SRC], dst, sub, &bfc, img_pairs);
      else image_to_tokens(dims, lw, x, q, kpT, 0, keysT, dst, sub, &bfc, img_pairs);
      if (!last_layer) layernorm_cols(C, N, img_out, keysT, lw[L_N4_W], lw[L_N4_B], EPS, f[F_PE], kpT, sub);
    }
    memcpy(queries_out + (long)p * T * C, q, sizeof(float) * T * C);
    iou_of(dims, w + (long)(depth - 1) * L_COUNT, f, q, pe, rawT, iou_out + (long)p * dims[D_MASK_TOKENS], sub);
  }
}

/* ---------------------------------------------------------------- mask logits
 * MaskDecoder.finish and masks_from for the prompts that passed the IoU filter: the chosen
 * mask tokens' final attention, their hypernetwork MLPs, the upscaling (2x2 stride-2
 * transposed convolutions as per-pixel matmuls, LayerNorm, GELU) and the mask products,
 * written in image order. The upscaling runs channel-major (channels x pixels), so the
 * LayerNorm over channels and the mask products are vector operations across pixels. */

#if defined(__AVX512F__) || defined(__AVX2__) && defined(__FMA__)
/* GELU(x) = x Phi(x), with Phi (the normal CDF) a polynomial of degree 6 in x - centre on each
 * of 16 intervals of width 0.75 covering [-6, 6), 0 below and 1 above; lane permutes pick each
 * lane's coefficients. The polynomials are least-squares fits to Phi (float64, 300 Chebyshev
 * nodes per interval): evaluated in float32, Phi within 6.5e-8, GELU within 4.1e-7 of exact
 * on [-8, 8] (torch's erf-based GELU: ~1e-7). No exp and no division: 1.7x faster than the
 * erf-based form below with AVX-512; with AVX2 (8-lane permutes, so the 8 intervals of [0, 6)
 * and the symmetry below 0; GELU within 4.0e-7) 1.4x (AMD Zen 3: 0.76 against 1.06 ns per
 * value; the 16 intervals by two permutes and a blend took 1.58). */
static const float PHI_COEF[7][16] = {
    {9.275064668e-09f, 5.440381804e-07f, 1.853672496e-05f, 3.690785085e-04f,
     4.332448487e-03f, 3.039636130e-02f, 1.302945172e-01f, 3.538302343e-01f,
     6.461697657e-01f, 8.697054828e-01f, 9.696036387e-01f, 9.956675515e-01f,
     9.996309215e-01f, 9.999814633e-01f, 9.999994560e-01f, 9.999999907e-01f},
    {5.379480911e-08f, 2.756973927e-06f, 8.054692510e-05f, 1.341120645e-03f,
     1.272411332e-02f, 6.878628350e-02f, 2.118768941e-01f, 3.718548968e-01f,
     3.718548968e-01f, 2.118768941e-01f, 6.878628350e-02f, 1.272411332e-02f,
     1.341120645e-03f, 8.054692510e-05f, 2.756973926e-06f, 5.379480888e-08f},
    {1.511979524e-07f, 6.718540957e-06f, 1.661176127e-04f, 2.263125760e-03f,
     1.670046003e-02f, 6.448723878e-02f, 1.191805965e-01f, 6.972261819e-02f,
     -6.972261819e-02f, -1.191805965e-01f, -6.448723878e-02f, -1.670046003e-02f,
     -2.263125760e-03f, -1.661176127e-04f, -6.718540961e-06f, -1.511979553e-07f},
    {2.708689560e-07f, 1.039832705e-05f, 2.146157630e-04f, 2.322406026e-03f,
     1.249611948e-02f, 2.883965778e-02f, 9.365788276e-03f, -5.324926040e-02f,
     -5.324926040e-02f, 9.365788276e-03f, 2.883965778e-02f, 1.249611948e-02f,
     2.322406026e-03f, 2.146157630e-04f, 1.039832706e-05f, 2.708689648e-07f},
    {3.580054731e-07f, 1.159157634e-05f, 1.939119550e-04f, 1.582866596e-03f,
     5.415623352e-03f, 2.767184852e-03f, -1.722473174e-02f, -1.660608485e-02f,
     1.660608485e-02f, 1.722473174e-02f, -2.767184852e-03f, -5.415623352e-03f,
     -1.582866596e-03f, -1.939119550e-04f, -1.159157625e-05f, -3.580054067e-07f},
    {4.141093099e-07f, 1.059114259e-05f, 1.330588757e-04f, 7.213566049e-04f,
     9.133788570e-04f, -3.281355688e-03f, -5.079970614e-03f, 6.582518227e-03f,
     6.582518227e-03f, -5.079970614e-03f, -3.281355688e-03f, 9.133788570e-04f,
     7.213566047e-04f, 1.330588757e-04f, 1.059114250e-05f, 4.141092489e-07f},
    {3.239164342e-07f, 6.759036586e-06f, 6.320491767e-05f, 1.889087464e-04f,
     -3.097110251e-04f, -1.353841222e-03f, 1.299612005e-03f, 2.550055781e-03f,
     -2.550055781e-03f, -1.299612005e-03f, 1.353841221e-03f, 3.097110249e-04f,
     -1.889087472e-04f, -6.320491763e-05f, -6.759037079e-06f, -3.239168003e-07f}};
#endif

#if defined(__AVX512F__)
static void gelu(long n, float *x) {
  __m512 c[7];
  for (int d = 0; d < 7; d++) c[d] = _mm512_loadu_ps(PHI_COEF[d]);
  for (long i = 0; i < n; i += VL) {
    __mmask16 lanes = lanes_of(n - i);
    __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
    __m512 u = _mm512_fmadd_ps(v, _mm512_set1_ps(16.0f / 12.0f), _mm512_set1_ps(8.0f));  /* interval */
    u = _mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()), _mm512_set1_ps(15.5f));
    __m512 lo = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512i k = _mm512_cvttps_epi32(lo);
    __m512 t = _mm512_sub_ps(v, _mm512_fmadd_ps(lo, _mm512_set1_ps(0.75f), _mm512_set1_ps(-5.625f)));
    __m512 p = _mm512_permutexvar_ps(k, c[6]);
    for (int d = 5; d >= 0; d--) p = _mm512_fmadd_ps(p, t, _mm512_permutexvar_ps(k, c[d]));
    p = _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(v, _mm512_set1_ps(-6.0f), _CMP_LT_OQ), _mm512_setzero_ps());
    p = _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(v, _mm512_set1_ps(6.0f), _CMP_GE_OQ), _mm512_set1_ps(1.0f));
    _mm512_mask_storeu_ps(x + i, lanes, _mm512_mul_ps(v, p));
  }
}
#else
#if defined(__AVX2__) && defined(__FMA__)
/* AVX2: the 8 intervals of [0, 6) (one 8-lane permute per coefficient) and Phi(x) = 1 -
 * Phi(-x) below 0 (the fits are symmetric: the same as the 16 intervals up to rounding). */
static inline vf vgelu(vf x) {
  __m256 v = (__m256)x, a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  __m256 lo = _mm256_floor_ps(_mm256_min_ps(_mm256_mul_ps(a, _mm256_set1_ps(16.0f / 12.0f)), _mm256_set1_ps(7.5f)));
  __m256i k = _mm256_cvttps_epi32(lo);
  __m256 t = _mm256_sub_ps(a, _mm256_fmadd_ps(lo, _mm256_set1_ps(0.75f), _mm256_set1_ps(0.375f)));
  __m256 p = _mm256_permutevar8x32_ps(_mm256_loadu_ps(PHI_COEF[6] + 8), k);
  for (int d = 5; d >= 0; d--) p = _mm256_fmadd_ps(p, t, _mm256_permutevar8x32_ps(_mm256_loadu_ps(PHI_COEF[d] + 8), k));
  p = _mm256_blendv_ps(p, _mm256_set1_ps(1.0f), _mm256_cmp_ps(a, _mm256_set1_ps(6.0f), _CMP_GE_OQ));
  p = _mm256_blendv_ps(p, _mm256_sub_ps(_mm256_set1_ps(1.0f), p), v);  /* sign bit: 1 - Phi(|x|) */
  return (vf)_mm256_mul_ps(v, p);
}
#else
/* erf(x): Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7) */
static inline vf verf(vf x) {
  vi bits;
  memcpy(&bits, &x, sizeof bits);
  vi sign = bits & INT32_MIN, abs_bits = bits & ~sign;
  vf a;
  memcpy(&a, &abs_bits, sizeof a);
  vf t = 1.0f / (0.3275911f * a + 1.0f);
  vf r = vsplat(1.061405429f);
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  vf y = 1.0f - r * t * vexp(-(a * a));
  vi ybits;
  memcpy(&ybits, &y, sizeof ybits);
  ybits |= sign;
  memcpy(&y, &ybits, sizeof y);
  return y;
}

static inline vf vgelu(vf x) { return x * 0.5f * (1.0f + verf(x * 0.70710678118654752f)); }
#endif

static void gelu(long n, float *x) {
  long i = 0;
  for (; i + VL <= n; i += VL) vstore(x + i, vgelu(vload(x + i)));
  if (i < n) {
    float buf[VL] = {0};
    memcpy(buf, x + i, sizeof(float) * (n - i));
    vstore(buf, vgelu(vload(buf)));
    memcpy(x + i, buf, sizeof(float) * (n - i));
  }
}
#endif

/* the upscaling's GELU in place on x[0 .. n), for tests of this build's form */
void kernel_gelu(long n, float *x) { gelu(n, x); }

/* Weight pointers of mask_prompts: the last block's key LayerNorm, the final attention
 * (A_* order), its LayerNorm, the keys' positional encoding (C x N), the upscaling (W1:
 * C x (4 C4), columns (ky, kx, out); its bias C4; LayerNorm C4; W2: C4 x (4 C8); bias C8),
 * then 6 per mask token: its hypernetwork MLP (W1T, b1, W2T, b2, W3T, b3). */
enum { M_N4_W, M_N4_B, M_ATT, M_NF_W = M_ATT + 7, M_NF_B, M_PE, M_UP1_W, M_UP1_B, M_LN_W, M_LN_B, M_UP2_W,
       M_UP2_B, M_HYPER };
/* mdims: upscaling channels C4 = C / 4 and C8 = C / 8, embedding h and w, mask tokens chosen */
enum { E_C4, E_C8, E_H, E_W, E_SEL, E_COUNT };
static const float EPS2D = 1e-6f;

/* mask_prompts' product operands packed per prompt: the final attention's, the upscalings' images */
static long mask_work_pairs(long C, long N, long H, long S) {
  return lmax(attention_pairs(C, N, H, S), pairs_k_major(C, N));
}

long mask_scratch_floats(const int *dims, const int *mdims) {
  long C = dims[D_C], N = dims[D_N], H = dims[D_H], Di = dims[D_DI], S = mdims[E_SEL];
  long C4 = mdims[E_C4], C8 = mdims[E_C8];
  long packs = pairs_k_major(C, 4 * C4) + pairs_k_major(C4, 4 * C8) + mask_work_pairs(C, N, H, S);
  return 2 * N * C + 4 * C4 * N + 4 * C8 * N + S * N + 2 * S * C + S * C8 + 2 * C + packs +
         t2i_floats(C, N, H, Di, S);
}

/* Prompts [first, last) of rows (indices into queries B x T x C, tokens B x T x C and raw keys
 * B x C x N): out[p] (S x 4h x 4w) the low-res logits of the mask tokens token_index[0 .. S)
 * (indices among the mask tokens). */
static void mask_range(const int *dims, const int *mdims, const float *const *w, int first, int last,
                       const int64_t *rows, const int64_t *token_index, const float *queries, const float *tokens,
                       const float *raw, float *out, float *scratch) {
  int C = dims[D_C], T = dims[D_T], N = dims[D_N];
  int C4 = mdims[E_C4], C8 = mdims[E_C8], h = mdims[E_H], wd = mdims[E_W], S = mdims[E_SEL];
  long NC = (long)N * C;
  float *KT = scratch, *kpT = KT + NC, *Y1 = kpT + NC, *Y2 = Y1 + 4L * C4 * N, *mt = Y2 + 4L * C8 * N,
        *x = mt + (long)S * N, *o = x + S * C, *hyper = o + S * C, *hid = hyper + S * C8, *hid2 = hid + C,
        *packs = hid2 + C;
  pair *w1p = (pair *)packs, *w2p = w1p + pairs_k_major(C, 4 * C4);
  bf16_ctx bfc = {HAVE_BF16 && dims[D_BF16], w2p + pairs_k_major(C4, 4 * C8)};
  float *sub = (float *)(bfc.work + mask_work_pairs(C, N, dims[D_H], S));
#if HAVE_BF16
  if (bfc.on) {  /* the upscaling weights as A operands: pairs along their input channels */
    pack_k_major(C, 4 * C4, w[M_UP1_W], 4 * C4, w1p);
    pack_k_major(C4, 4 * C8, w[M_UP2_W], 4 * C8, w2p);
  }
#endif
  for (int p = first; p < last; p++) {
    const float *rawT = raw + rows[p] * NC, *q = queries + rows[p] * T * C, *pe = tokens + rows[p] * T * C;
    layernorm_cols(C, N, rawT, KT, w[M_N4_W], w[M_N4_B], EPS, w[M_PE], kpT, sub);
    for (int t = 0; t < S; t++) {
      long tok = 1 + token_index[t];
      add(C, q + tok * C, pe + tok * C, x + t * C);
    }
    tokens_to_image(dims, w + M_ATT, S, x, kpT, KT, o, sub, &bfc, NULL);
    for (int t = 0; t < S; t++) add(C, o + t * C, q + (1 + token_index[t]) * C, o + t * C);
    layernorm(S, C, o, o, w[M_NF_W], w[M_NF_B], EPS);
    for (int t = 0; t < S; t++) {
      const float *const *mw = w + M_HYPER + 6 * token_index[t];
      linear(1, C, C, o + t * C, C, mw[0], mw[1], hid);
      for (int i = 0; i < C; i++) hid[i] = hid[i] > 0.0f ? hid[i] : 0.0f;
      linear(1, C, C, hid, C, mw[2], mw[3], hid2);
      for (int i = 0; i < C; i++) hid2[i] = hid2[i] > 0.0f ? hid2[i] : 0.0f;
      linear(1, C, C8, hid2, C, mw[4], mw[5], hyper + t * C8);
    }
    /* first upscaling: rows (ky1, kx1, c4) x pixels, then LayerNorm over c4 and GELU */
    mm(&bfc, 4 * C4, N, C, w[M_UP1_W], 1, 4 * C4, w1p, KT, N, NULL, Y1, N);
    for (int i = 0; i < 4 * C4; i++) {
      float bias = w[M_UP1_B][i % C4], *y = Y1 + (long)i * N;
      for (int n = 0; n < N; n++) y[n] += bias;
    }
    for (int s1 = 0; s1 < 4; s1++) {
      float *blk = Y1 + (long)s1 * C4 * N;
      layernorm_cols(C4, N, blk, blk, w[M_LN_W], w[M_LN_B], EPS2D, NULL, NULL, sub);
      gelu((long)C4 * N, blk);
    }
    /* second upscaling per first sub-pixel: rows (ky2, kx2, c8), GELU, the mask products */
    for (int s1 = 0; s1 < 4; s1++) {
      mm(&bfc, 4 * C8, N, C4, w[M_UP2_W], 1, 4 * C8, w2p, Y1 + (long)s1 * C4 * N, N, NULL, Y2, N);
      for (int i = 0; i < 4 * C8; i++) {
        float bias = w[M_UP2_B][i % C8], *y = Y2 + (long)i * N;
        for (int n = 0; n < N; n++) y[n] += bias;
      }
      gelu(4L * C8 * N, Y2);
      for (int s2 = 0; s2 < 4; s2++) {
        gemm(S, N, C8, hyper, C8, 1, Y2 + (long)s2 * C8 * N, N, mt, N);
        int dy = 2 * (s1 / 2) + s2 / 2, dx = 2 * (s1 % 2) + s2 % 2;
        for (int t = 0; t < S; t++) {
          float *dst = out + ((long)p * S + t) * 16L * N;
          const float *src = mt + (long)t * N;
          for (int y = 0; y < h; y++)
            for (int xx = 0; xx < wd; xx++) dst[(4L * y + dy) * 4 * wd + 4 * xx + dx] = src[y * wd + xx];
        }
      }
    }
  }
}

/* ---------------------------------------------------------------- entry points */
/* The n prompts split evenly over `threads` threads, thread i with its scratch at scratch +
 * i * stride. The threads are OpenMP's team, built with -fopenmp against the runtime torch
 * has loaded (same soname): the team torch runs its own parallel regions on, whose threads
 * would otherwise spin-wait for cores beside threads of our own. Without OpenMP, one thread. */

/* this thread's index in the team and its share [first, last) of n prompts */
static int share_of(int n, int *first, int *last) {
  int i = 0, k = 1;
#ifdef _OPENMP
  i = omp_get_thread_num(), k = omp_get_num_threads();
#endif
  *first = (int)((long)n * i / k), *last = (int)((long)n * (i + 1) / k);
  return i;
}

/* score_range for prompts [0, n) */
void score_prompts(int threads, const int *dims, const float *const *w, int n, const float *tokens,
                   float *queries_out, float *raw_out, float *iou_out, float *scratch, long stride) {
#pragma omp parallel num_threads(threads)
  {
    int first, last, i = share_of(n, &first, &last);
    score_range(dims, w, first, last, tokens, queries_out, raw_out, iou_out, scratch + i * stride);
  }
}

/* mask_range for rows [0, n) */
void mask_prompts(int threads, const int *dims, const int *mdims, const float *const *w, int n,
                  const int64_t *rows, const int64_t *token_index, const float *queries, const float *tokens,
                  const float *raw, float *out, float *scratch, long stride) {
#pragma omp parallel num_threads(threads)
  {
    int first, last, i = share_of(n, &first, &last);
    mask_range(dims, mdims, w, first, last, rows, token_index, queries, tokens, raw, out, scratch + i * stride);
  }
}

/* whether the kernels split prompts over threads (built with OpenMP) */
int kernel_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
