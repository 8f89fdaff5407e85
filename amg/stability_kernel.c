/* The CPU kernel of amg.stability_bounds: per candidate (low-res logits l x l), may
 * count(> t0) / count(> t1) over its full-size pixels reach `ratio`? One pass per candidate
 * does every level of bounds (see amg/stability_bounds.py): whole blocks from the window
 * extrema, then the mixed blocks' frame cells, then their pixels; candidates split over
 * OpenMP's team (torch's). The axis tables are amg.upsample._Axis'. Built and loaded by
 * amg/stability_bounds.py through model/native.py.
 *
 * The bounds carry a margin m = 1e-4 (1 + max |v|) far outside float rounding, so the order
 * the arithmetic takes (fused multiply-adds or not) does not change what they rule out. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* One axis of the two resizes, as amg.upsample._Axis holds it (n_low blocks, f frame
 * positions and m output positions per block). */
typedef struct {
  int64_t radius, f, m;
  const int64_t *size, *low_first, *frame_i0, *frame_i1, *cells, *out_f0, *out_f1;
  const float *frame_w0, *frame_w1, *out_w0, *out_w1;
  const uint8_t *valid;
} axis_t;

/* Max and -min of v (l x l) over each position's (2 ry + 1) x (2 rx + 1) window, clipped at
 * the borders, into hi and neg_lo (l x l); col_max, col_min (l) are scratch. Per output row:
 * the extrema over its window's rows, then over shifts along the row (loops over contiguous
 * rows with comparisons and selects, which the compiler vectorizes). */
void window_extrema(const float *v, int l, int ry, int rx, float *col_max, float *col_min, float *hi,
                    float *neg_lo) {
  for (int i = 0; i < l; i++) {
    int first = i - ry > 0 ? i - ry : 0, last = i + ry < l - 1 ? i + ry : l - 1;
    for (int j = 0; j < l; j++) col_max[j] = col_min[j] = v[(long)first * l + j];
    for (int r = first + 1; r <= last; r++) {
      const float *row = v + (long)r * l;
      for (int j = 0; j < l; j++) {
        float a = row[j];
        col_max[j] = a > col_max[j] ? a : col_max[j];
        col_min[j] = a < col_min[j] ? a : col_min[j];
      }
    }
    float *row_hi = hi + (long)i * l, *row_lo = neg_lo + (long)i * l;
    for (int j = 0; j < l; j++) row_hi[j] = col_max[j], row_lo[j] = col_min[j];
    for (int e = 1; e <= rx; e++) {
      for (int j = 0; j < l - e; j++) {  /* the neighbour e to the right, then to the left */
        row_hi[j] = col_max[j + e] > row_hi[j] ? col_max[j + e] : row_hi[j];
        row_lo[j] = col_min[j + e] < row_lo[j] ? col_min[j + e] : row_lo[j];
      }
      for (int j = e; j < l; j++) {
        row_hi[j] = col_max[j - e] > row_hi[j] ? col_max[j - e] : row_hi[j];
        row_lo[j] = col_min[j - e] < row_lo[j] ? col_min[j - e] : row_lo[j];
      }
    }
    for (int j = 0; j < l; j++) row_lo[j] = -row_lo[j];
  }
}

/* amg.upsample._margin of one candidate in the same float32 arithmetic: 1e-4 (1 + max |v|),
 * NaN where v has a NaN. top (l) is scratch: column-wise maxima first, one short reduction last. */
static double margin(const float *v, int l, float *top) {
  int nans = 0;
  for (int j = 0; j < l; j++) top[j] = 0.0f;
  for (int i = 0; i < l; i++)
    for (int j = 0; j < l; j++) {
      float a = fabsf(v[(long)i * l + j]);
      nans += a != a;
      top[j] = a > top[j] ? a : top[j];
    }
  if (nans) return NAN;
  float most = 0.0f;
  for (int j = 0; j < l; j++) most = top[j] > most ? top[j] : most;
  return (double)(1e-4f * (1.0f + most));
}

/* The least float32 >= d: for a float32 x, x >= d and x < d compare the same against it in
 * float32 arithmetic. */
static float ceil32(double d) {
  float f = (float)d;
  return (double)f < d ? nextafterf(f, INFINITY) : f;
}

/* The square frame's values that block (i, j) reads (fr x fc, into out): along rows, then
 * between two rows; lerped (low_rows x fc) is scratch. */
static void frame_of(const float *v, int l, int i, int j, const axis_t *R, const axis_t *Cx, int low_rows,
                     float *lerped, float *out) {
  int fr = (int)R->f, fc = (int)Cx->f;
  long r_first = R->low_first[i];
  int n_rows = (int)(l - r_first < low_rows ? l - r_first : low_rows);
  const int64_t *ci0 = Cx->frame_i0 + (long)j * fc, *ci1 = Cx->frame_i1 + (long)j * fc;
  const float *cw0 = Cx->frame_w0 + (long)j * fc, *cw1 = Cx->frame_w1 + (long)j * fc;
  long c_first = Cx->low_first[j];
  for (int rr = 0; rr < n_rows; rr++) {
    const float *row = v + (r_first + rr) * l;
    for (int c = 0; c < fc; c++) {
      long c0 = c_first + ci0[c] < l - 1 ? c_first + ci0[c] : l - 1;
      long c1 = c_first + ci1[c] < l - 1 ? c_first + ci1[c] : l - 1;
      lerped[rr * fc + c] = row[c0] * cw0[c] + row[c1] * cw1[c];
    }
  }
  const int64_t *ri0 = R->frame_i0 + (long)i * fr, *ri1 = R->frame_i1 + (long)i * fr;
  const float *rw0 = R->frame_w0 + (long)i * fr, *rw1 = R->frame_w1 + (long)i * fr;
  for (int a = 0; a < fr; a++) {
    int r0 = (int)(ri0[a] < n_rows - 1 ? ri0[a] : n_rows - 1), r1 = (int)(ri1[a] < n_rows - 1 ? ri1[a] : n_rows - 1);
    for (int c = 0; c < fc; c++) out[a * fc + c] = lerped[r0 * fc + c] * rw0[a] + lerped[r1 * fc + c] * rw1[a];
  }
}

/* Pixels of one mixed block bounded by its frame cells (cells_r, cells_c: how many of its
 * positions each cell spans): upper, those of the cells any of whose 2 x 2 frame values is
 * above t; else those whose every value is. */
static long cell_pixels(const float *frame, int fr, int fc, const int64_t *cells_r, const int64_t *cells_c, double t,
                        int upper) {
  long total = 0;
  for (int a = 0; a < fr; a++) {
    if (!cells_r[a]) continue;
    int a1 = a + 1 < fr - 1 ? a + 1 : fr - 1;
    for (int c = 0; c < fc; c++) {
      if (!cells_c[c]) continue;
      int c1 = c + 1 < fc - 1 ? c + 1 : fc - 1;
      double p = frame[a * fc + c], q = frame[a * fc + c1], r = frame[a1 * fc + c], s = frame[a1 * fc + c1];
      int hit = upper ? (p > t || q > t || r > t || s > t) : (p > t && q > t && r > t && s > t);
      if (hit) total += cells_r[a] * cells_c[c];
    }
  }
  return total;
}

/* Pixels of mixed block (i, j) above t, from its frame values (along rows, then between two
 * rows, as the exact evaluation does); lerped (fr x m of the columns) is scratch. */
static long block_pixels(const float *frame, int i, int j, const axis_t *R, const axis_t *Cx, double t,
                         float *lerped) {
  int fr = (int)R->f, fc = (int)Cx->f, mr = (int)R->m, mc = (int)Cx->m;
  const int64_t *f0c = Cx->out_f0 + (long)j * mc, *f1c = Cx->out_f1 + (long)j * mc;
  const float *w0c = Cx->out_w0 + (long)j * mc, *w1c = Cx->out_w1 + (long)j * mc;
  const uint8_t *vc = Cx->valid + (long)j * mc;
  for (int a = 0; a < fr; a++)
    for (int c = 0; c < mc; c++) lerped[a * mc + c] = frame[a * fc + f0c[c]] * w0c[c] + frame[a * fc + f1c[c]] * w1c[c];
  const int64_t *f0r = R->out_f0 + (long)i * mr, *f1r = R->out_f1 + (long)i * mr;
  const float *w0r = R->out_w0 + (long)i * mr, *w1r = R->out_w1 + (long)i * mr;
  const uint8_t *vr = R->valid + (long)i * mr;
  long total = 0;
  for (int y = 0; y < mr; y++) {
    if (!vr[y]) continue;
    const float *l0 = lerped + f0r[y] * mc, *l1 = lerped + f1r[y] * mc;
    float u0 = w0r[y], u1 = w1r[y];
    for (int c = 0; c < mc; c++) total += vc[c] && (double)(l0[c] * u0 + l1[c] * u1) > t;
  }
  return total;
}

/* Per-thread scratch of one candidate's pass */
typedef struct {
  float *col_max, *col_min, *hi, *neg_lo, *frame, *lerped, *lerped_pixels;
  int32_t *mixed;
} scratch_t;

static int may_pass_one(const float *v, int l, double t0, double t1, double ratio, const axis_t *R,
                        const axis_t *Cx, int low_rows, const scratch_t *s) {
  double m = margin(v, l, s->col_max);
  if (m != m) return 1;  /* NaN logits: the exact evaluation decides */
  float *hi = s->hi, *neg_lo = s->neg_lo;
  window_extrema(v, l, (int)R->radius, (int)Cx->radius, s->col_max, s->col_min, hi, neg_lo);
  /* Bounds at three levels, each an upper bound of count(> t0), then a lower bound of
   * count(> t1): whole blocks alone (both in one pass), then also the frame cells of the
   * mixed blocks, then their pixels. Each level's bounds are tighter than the last's; the
   * earlier ones only save work. The score needs count(> t0) > 0 (thresholds are positive). */
  float below0 = ceil32(t0 - m), above0 = ceil32(-(t0 + m)), above1 = ceil32(-(t1 + m));
  long upper0 = 0, lower1 = 0, whole0 = 0;  /* pixels of blocks not wholly below t0, wholly above t1, t0 */
  for (int i = 0; i < l; i++) {
    const float *row_hi = hi + (long)i * l, *row_lo = neg_lo + (long)i * l;
    long cols0 = 0, cols1 = 0, cols2 = 0;
    for (int j = 0; j < l; j++) {
      long size = Cx->size[j];
      cols0 += row_hi[j] >= below0 ? size : 0;
      cols1 += row_lo[j] < above1 ? size : 0;
      cols2 += row_lo[j] < above0 ? size : 0;
    }
    upper0 += R->size[i] * cols0, lower1 += R->size[i] * cols1, whole0 += R->size[i] * cols2;
  }
  if (!(upper0 > 0 && (double)upper0 >= ratio * (double)lower1)) return 0;
  long whole1 = lower1;
  /* The blocks mixed for each threshold (neither wholly above nor wholly below it), listed
   * once: the levels below visit only these. */
  float below1 = ceil32(t1 - m);
  int32_t *mixed[2] = {s->mixed, s->mixed + (long)l * l};
  long n_mixed[2] = {0, 0};
  for (int i = 0; i < l; i++) {
    if (!R->size[i]) continue;
    for (int j = 0; j < l; j++) {
      if (!Cx->size[j]) continue;
      long at = (long)i * l + j;
      if (hi[at] >= below0 && !(neg_lo[at] < above0)) mixed[0][n_mixed[0]++] = (int32_t)at;
      if (hi[at] >= below1 && !(neg_lo[at] < above1)) mixed[1][n_mixed[1]++] = (int32_t)at;
    }
  }
  for (int level = 1; level < 3; level++)
    for (int k = 0; k < 2; k++) {  /* the count above t0, then above t1: often the first rules it out */
      double bound = k == 0 ? t0 - m : t1 + m;
      long total = k == 0 ? whole0 : whole1;
      for (long q = 0; q < n_mixed[k]; q++) {
        int i = mixed[k][q] / l, j = mixed[k][q] % l;
        frame_of(v, l, i, j, R, Cx, low_rows, s->lerped, s->frame);
        if (level == 1)
          total += cell_pixels(s->frame, (int)R->f, (int)Cx->f, R->cells + (long)i * R->f, Cx->cells + (long)j * Cx->f,
                               bound, k == 0);
        else
          total += block_pixels(s->frame, i, j, R, Cx, bound, s->lerped_pixels);
      }
      if (k == 0) upper0 = total;
      else lower1 = total;
      if (!(upper0 > 0 && (double)upper0 >= ratio * (double)lower1)) return 0;
    }
  return 1;
}

/* x: n x l x l float32 low-res logits; out[b]: whether candidate b's count(> t0) / count(> t1)
 * may reach ratio (t0 >= t1; with NaN logits it may). Returns 0, or -1 where scratch could
 * not be allocated. */
int stability_may_pass(int threads, const float *x, long n, int l, double t0, double t1, double ratio,
                       const axis_t *R, const axis_t *Cx, uint8_t *out) {
  int low_rows = 0, failed = 0;
  for (long k = 0; k < (long)l * R->f; k++) low_rows = R->frame_i1[k] + 1 > low_rows ? (int)R->frame_i1[k] + 1 : low_rows;
  long ll = (long)l * l;
#pragma omp parallel num_threads(threads)
  {
    scratch_t s = {0};
    float *floats = malloc(sizeof(float) * (2 * l + 2 * ll + R->f * Cx->f + (long)low_rows * Cx->f + R->f * Cx->m));
    s.mixed = malloc(sizeof(int32_t) * 2 * ll);
    int ready = floats && s.mixed;
    if (ready) {
      s.col_max = floats, s.col_min = s.col_max + l, s.hi = s.col_min + l, s.neg_lo = s.hi + ll;
      s.frame = s.neg_lo + ll, s.lerped = s.frame + R->f * Cx->f, s.lerped_pixels = s.lerped + (long)low_rows * Cx->f;
    } else {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 8)
    for (long b = 0; b < n; b++)
      if (ready) out[b] = (uint8_t)may_pass_one(x + b * ll, l, t0, t1, ratio, R, Cx, low_rows, &s);
    free(floats);
    free(s.mixed);
  }
  return failed ? -1 : 0;
}
