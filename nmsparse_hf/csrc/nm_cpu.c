/* nmsparse_hf's CPU kernels: the N:M mask of a float32 weight grouped along its last dimension,
 * the effective weight W * (m + alpha (1 - m)), and the straight-through gradient terms, each one
 * pass over the weight. Every result is bit for bit the one of the ATen expressions they replace
 * (nmsparse_hf/masks.py, nmsparse_hf/autograd.py); build with -ffp-contract=off so that no
 * multiply-add is fused into one rounding. Loaded by nmsparse_hf/cpu_kernels.py through ctypes. */
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

/* The keep-mask (0/1 bytes) of `groups` consecutive groups of m float32 weights; n kept in each.
 * Returns 0, or -1 for an m without a kernel (nothing written). */
int nm_mask_f32(const float *w, uint8_t *out, int64_t groups, int32_t m, int32_t n) {
  switch (m) {
  case 4: mask_4(w, out, groups, n); return 0;
  case 8: mask_8(w, out, groups, n); return 0;
  case 16: mask_16(w, out, groups, n); return 0;
  default: return -1;
  }
}

/* out = w * f with f = (1 - m) * alpha + m, computed as float32 operations in that order. */
void masked_f32(const float *w, const uint8_t *keep, float alpha, float *out, int64_t size) {
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
    for (int64_t i = 0; i < size; i++) {
      float decay = w[i] * lambda;
      g[i] = g[i] + (keep[i] ? 0.0f : decay);
    }
  }
  if (freeze) {
    for (int64_t i = 0; i < size; i++) g[i] = keep[i] ? g[i] : 0.0f;
  }
}
