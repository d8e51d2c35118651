/* nmsparse_hf's CPU kernels: the N:M mask of a float32 weight grouped along its last dimension,
 * the effective weight W * (m + alpha (1 - m)), and the straight-through gradient terms, each one
 * pass over the weight. Every result is bit for bit the one of the ATen expressions they replace
 * (nmsparse_hf/masks.py, nmsparse_hf/autograd.py); build with -ffp-contract=off so that no
 * multiply-add is fused into one rounding. Loaded by nmsparse_hf/cpu_kernels.py through ctypes.
 * Built with -fopenmp where PyTorch runs on GNU OpenMP: the loops then share PyTorch's OpenMP
 * threads (the process's one libgomp, the count torch.set_num_threads sets); every iteration is
 * independent, so the split changes no result. */
#include <stdint.h>
#include <string.h>

typedef int32_t v4si __attribute__((vector_size(16)));
typedef int32_t v8si __attribute__((vector_size(32)));
typedef int32_t v16si __attribute__((vector_size(64)));
typedef uint8_t v4qu __attribute__((vector_size(4)));
typedef uint8_t v8qu __attribute__((vector_size(8)));
typedef uint8_t v16qu __attribute__((vector_size(16)));

#if defined(__clang__)
#define SHUFFLE(VT, v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(VT, v, ...) __builtin_shuffle(v, (VT){__VA_ARGS__})
#endif

/* lane i of ROTm(v, r) holds lane (i + r) mod m of v */
#define ROT4(v, r) SHUFFLE(v4si, v, (0 + r) % 4, (1 + r) % 4, (2 + r) % 4, (3 + r) % 4)
#define ROT8(v, r)                                                                                 \
  SHUFFLE(v8si, v, (0 + r) % 8, (1 + r) % 8, (2 + r) % 8, (3 + r) % 8, (4 + r) % 8, (5 + r) % 8,  \
          (6 + r) % 8, (7 + r) % 8)
#define ROT16(v, r)                                                                                \
  SHUFFLE(v16si, v, (0 + r) % 16, (1 + r) % 16, (2 + r) % 16, (3 + r) % 16, (4 + r) % 16,         \
          (5 + r) % 16, (6 + r) % 16, (7 + r) % 16, (8 + r) % 16, (9 + r) % 16, (10 + r) % 16,     \
          (11 + r) % 16, (12 + r) % 16, (13 + r) % 16, (14 + r) % 16, (15 + r) % 16)

/* One group per vector. The key of an entry is the bits of |w| read as an int32: ordered like |w|,
 * NaN above +inf (nmsparse_hf.masks._order_keys). Entry i is kept when fewer than n entries
 * outrank it: larger, or equal at a lower index. Rotation r compares lane i with entry
 * j = (i + r) mod m, which has the lower index exactly when i + r >= m; there "outranks" is
 * key_j >= key_i, i.e. key_j > key_i - 1 (keys are >= 0, so the subtraction cannot wrap). */
#define OUTRANK(VT, ROT, M, r) rank -= ROT(key, r) > key + (VT)(lane + r >= M)

#define MASK_KERNEL(M, VT, QT, STEPS)                                                              \
  static void mask_##M(const float *w, uint8_t *out, int64_t groups, int32_t n) {                  \
    VT lane;                                                                                       \
    for (int i = 0; i < M; i++) lane[i] = i;                                                       \
    _Pragma("omp parallel for schedule(static) if (groups > 4096)")                                 \
    for (int64_t g = 0; g < groups; g++) {                                                         \
      VT key, rank = {0};                                                                          \
      memcpy(&key, w + g * M, sizeof key);                                                         \
      key &= 0x7fffffff;                                                                           \
      STEPS;                                                                                       \
      QT keep = __builtin_convertvector((rank < n) & 1, QT);                                       \
      memcpy(out + g * M, &keep, M);                                                               \
    }                                                                                              \
  }

MASK_KERNEL(4, v4si, v4qu,
            OUTRANK(v4si, ROT4, 4, 1); OUTRANK(v4si, ROT4, 4, 2); OUTRANK(v4si, ROT4, 4, 3))
MASK_KERNEL(8, v8si, v8qu,
            OUTRANK(v8si, ROT8, 8, 1); OUTRANK(v8si, ROT8, 8, 2); OUTRANK(v8si, ROT8, 8, 3);
            OUTRANK(v8si, ROT8, 8, 4); OUTRANK(v8si, ROT8, 8, 5); OUTRANK(v8si, ROT8, 8, 6);
            OUTRANK(v8si, ROT8, 8, 7))
MASK_KERNEL(16, v16si, v16qu,
            OUTRANK(v16si, ROT16, 16, 1); OUTRANK(v16si, ROT16, 16, 2);
            OUTRANK(v16si, ROT16, 16, 3); OUTRANK(v16si, ROT16, 16, 4);
            OUTRANK(v16si, ROT16, 16, 5); OUTRANK(v16si, ROT16, 16, 6);
            OUTRANK(v16si, ROT16, 16, 7); OUTRANK(v16si, ROT16, 16, 8);
            OUTRANK(v16si, ROT16, 16, 9); OUTRANK(v16si, ROT16, 16, 10);
            OUTRANK(v16si, ROT16, 16, 11); OUTRANK(v16si, ROT16, 16, 12);
            OUTRANK(v16si, ROT16, 16, 13); OUTRANK(v16si, ROT16, 16, 14);
            OUTRANK(v16si, ROT16, 16, 15))

/* Groups of 32 or 64 (4 or 8 vectors), n <= 16: peel the largest key n times, four groups at a
 * time (independent chains, so the CPU overlaps them). Each round takes a group's largest
 * remaining key and how often it occurs, then removes those entries (-1 is below every key). The
 * round at which the keys taken reach n gives the threshold: every larger key is kept, and the
 * slots left go to the keys equal to it in index order (all of them when exactly as many remain). */
static inline v8si max8(v8si a, v8si b) {
  v8si greater = a > b;
  return (a & greater) | (b & ~greater);
}
static inline int32_t hmax8(v8si v) {
  v = max8(v, ROT8(v, 4));
  v = max8(v, ROT8(v, 2));
  return max8(v, ROT8(v, 1))[0];
}
static inline int32_t hsum8(v8si v) {
  v += ROT8(v, 4);
  v += ROT8(v, 2);
  return (v + ROT8(v, 1))[0];
}

#define PEEL_GROUPS 4
#define PEEL_MAX_CHUNKS 8
#define PEEL_MAX_N 16

static void peel_groups(const float *w, uint8_t *out, int count, int32_t m, int32_t n) {
  const int chunks = m / 8;
  v8si key[PEEL_GROUPS][PEEL_MAX_CHUNKS], left[PEEL_GROUPS][PEEL_MAX_CHUNKS];
  int32_t taken[PEEL_GROUPS] = {0}, threshold[PEEL_GROUPS] = {0}, slots[PEEL_GROUPS] = {0},
          equal[PEEL_GROUPS] = {0};
  for (int q = 0; q < count; q++) {
    for (int c = 0; c < chunks; c++) {
      memcpy(&key[q][c], w + (int64_t)q * m + 8 * c, sizeof(v8si));
      key[q][c] &= 0x7fffffff;
      left[q][c] = key[q][c];
    }
  }
  for (int32_t round = 0; round < n; round++) { /* each round takes >= 1 key: n rounds reach n */
    for (int q = 0; q < count; q++) {
      v8si top = left[q][0];
      for (int c = 1; c < chunks; c++) top = max8(top, left[q][c]);
      int32_t largest = hmax8(top);
      v8si found = {0};
      for (int c = 0; c < chunks; c++) {
        v8si is_largest = left[q][c] == largest;
        found -= is_largest;
        left[q][c] |= is_largest;
      }
      int32_t many = hsum8(found);
      int reached = taken[q] < n && taken[q] + many >= n;
      threshold[q] = reached ? largest : threshold[q];
      slots[q] = reached ? n - taken[q] : slots[q];
      equal[q] = reached ? many : equal[q];
      taken[q] += many;
    }
  }
  for (int q = 0; q < count; q++) {
    uint8_t *keep = out + (int64_t)q * m;
    int all_equal = equal[q] == slots[q];
    int32_t below = all_equal ? threshold[q] - 1 : threshold[q]; /* threshold >= 0: no wrap */
    for (int c = 0; c < chunks; c++) {
      v8qu bytes = __builtin_convertvector((key[q][c] > below) & 1, v8qu);
      memcpy(keep + 8 * c, &bytes, 8);
    }
    for (int32_t j = 0, free_slots = all_equal ? 0 : slots[q]; free_slots > 0; j++) {
      if (key[q][j / 8][j % 8] == threshold[q]) {
        keep[j] = 1;
        free_slots--;
      }
    }
  }
}

static void mask_peeled(const float *w, uint8_t *out, int64_t groups, int32_t m, int32_t n) {
#pragma omp parallel for schedule(static) if (groups > 1024)
  for (int64_t g = 0; g < groups; g += PEEL_GROUPS) {
    int count = groups - g < PEEL_GROUPS ? (int)(groups - g) : PEEL_GROUPS;
    peel_groups(w + g * m, out + g * m, count, m, n);
  }
}

/* The keep-mask (0/1 bytes) of `groups` consecutive groups of m float32 weights; n kept in each.
 * Returns 0, or -1 for an (m, n) without a kernel (nothing written). */
int nm_mask_f32(const float *w, uint8_t *out, int64_t groups, int32_t m, int32_t n) {
  switch (m) {
  case 4: mask_4(w, out, groups, n); return 0;
  case 8: mask_8(w, out, groups, n); return 0;
  case 16: mask_16(w, out, groups, n); return 0;
  case 32:
  case 64:
    if (n > PEEL_MAX_N) return -1;
    mask_peeled(w, out, groups, m, n);
    return 0;
  default: return -1;
  }
}

/* out = w * f with f = (1 - m) * alpha + m, computed as float32 operations in that order. */
void masked_f32(const float *w, const uint8_t *keep, float alpha, float *out, int64_t size) {
#pragma omp parallel for simd schedule(static) if (size > 32768)
  for (int64_t i = 0; i < size; i++) {
    float m = (float)keep[i];
    float f = (1.0f - m) * alpha + m;
    out[i] = w[i] * f;
  }
}

/* In place on the gradient g: g + (m ? +0 : w * lambda) when lambda != 0, then, when `freeze`,
 * +0 wherever m is 0. */
void straight_through_f32(float *g, const float *w, const uint8_t *keep, float lambda, int freeze,
                          int64_t size) {
  if (lambda != 0.0f) {
#pragma omp parallel for simd schedule(static) if (size > 32768)
    for (int64_t i = 0; i < size; i++) {
      float decay = w[i] * lambda;
      g[i] = g[i] + (keep[i] ? 0.0f : decay);
    }
  }
  if (freeze) {
#pragma omp parallel for simd schedule(static) if (size > 32768)
    for (int64_t i = 0; i < size; i++) g[i] = keep[i] ? g[i] : 0.0f;
  }
}
