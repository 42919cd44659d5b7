/* Eager CPU decode over float32 quantized prompt rows (8, 4 or 2 bits), built and loaded by
   quantized_cpu.py:
   - dequantize_rows_f32: the rows dequantized into float32 rows in one pass (unpack, scale,
     add); its twin is the ATen path of kvpolicy.quantized (QuantizedRows.dequantize_into).
   - quantized_logits_f32 and quantized_values_f32: decode attention reading the packed rows
     where they lie (no dequantized row is written), the two halves around the softmax;
     their twin is quantized_attention_ref.py.

   Storage, as kvpolicy.quantized packs it:

   packed: uint8 [BG, M, D]; row n (of N = M * 8 / bits) of head h is block j = n / M,
   packed row m = n % M: code = (packed[h, m, d] >> j * bits) & (2**bits - 1).
   per_token == 0 (keys): scale, zero float32 [BG, ceil(N / group), D], read at (n / group, d);
   out = fma(code, scale, zero), one rounding, as ATen's addcmul.
   per_token == 1 (values): scale, zero float32 [BG, N, D / group], read at (n, d / group);
   out = code * scale, rounded, + zero, rounded, as ATen's mul_ then add_.
   out: float32, head h's row n at out + h * head_stride + n * D. */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void dequantize_rows_f32(const uint8_t *restrict packed, const float *restrict scale,
                         const float *restrict zero, float *restrict out, int64_t heads,
                         int64_t M, int64_t D, int bits, int per_token, int64_t group,
                         int64_t head_stride, int threads) {
  const int per = 8 / bits;
  const int mask = (1 << bits) - 1;
  const int64_t N = M * per;
  const int64_t groups = per_token ? D / group : (N + group - 1) / group;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t *src = packed + (h * M + m) * D;
      for (int j = 0; j < per; ++j) {
        const int64_t n = j * M + m;
        const int shift = j * bits;
        float *dst = out + h * head_stride + n * D;
        if (per_token) {
          const float *s = scale + (h * N + n) * groups;
          const float *z = zero + (h * N + n) * groups;
          for (int64_t g = 0; g < groups; ++g) {
            const float sg = s[g], zg = z[g];
            for (int64_t d = g * group; d < (g + 1) * group; ++d) {
              const float product = (float)((src[d] >> shift) & mask) * sg;
              dst[d] = product + zg;
            }
          }
        } else {
          const float *s = scale + (h * groups + n / group) * D;
          const float *z = zero + (h * groups + n / group) * D;
          for (int64_t d = 0; d < D; ++d)
            dst[d] = __builtin_fmaf((float)((src[d] >> shift) & mask), s[d], z[d]);
        }
      }
    }
  }
}

#define MAX_DIM 1024 /* D and Dv */
#define MAX_ACC 16384 /* a unit's value accumulators: query heads of a group x Dv */

/* a . b over D floats, in 16 partial sums (vectorised without reassociating a reduction). */
static inline __attribute__((always_inline)) float dot(const float *restrict a, const float *restrict b, int64_t D) {
  float acc[16] = {0.0f};
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16)
    for (int i = 0; i < 16; ++i)
      acc[i] += a[d0 + i] * b[d0 + i];
  for (int64_t d = d0; d < D; ++d)
    acc[d - d0] += a[d] * b[d];
  for (int width = 8; width; width /= 2) /* a tree: 4 dependent adds, not 16 */
    for (int i = 0; i < width; ++i)
      acc[i] += acc[i + width];
  return acc[0];
}

/* Unit u of B * G * chunks: batch row b, KV head g, and the chunk's quantized rows [lo, hi)
   of N (the last chunk also takes the n rows after them). */
static inline void unit_range(int64_t u, int64_t chunks, int64_t G, int64_t N, int64_t *b,
                              int64_t *g, int64_t *c, int64_t *lo, int64_t *hi) {
  const int64_t bg = u / chunks;
  *c = u % chunks;
  *b = bg / G;
  *g = bg % G;
  *lo = N * *c / chunks;
  *hi = N * (*c + 1) / chunks;
}

/* One unit's logits (quantized_logits_f32): the quantized rows [lo, hi) of KV head g of
   batch row b, each dequantized once for the group's query heads; always inlined, so that a
   constant D unrolls. */
static inline __attribute__((always_inline)) void key_rows(
    const float *restrict query, const uint8_t *restrict codes, const float *restrict scale,
    const float *restrict zero, const bool *restrict vis, float *restrict logits, int64_t bg,
    int64_t first, int64_t heads, int64_t lo, int64_t hi, int64_t M, int64_t S, int64_t D,
    int bits, int group_shift, int64_t groups, float scaling) {
  const int mask = (1 << bits) - 1;
  float k[MAX_DIM];
  for (int64_t j = lo / M; j * M < hi; ++j) { /* the packed blocks the range meets */
    const int shift = (int)j * bits;
    const int64_t t1 = hi < (j + 1) * M ? hi : (j + 1) * M;
    for (int64_t t = lo > j * M ? lo : j * M; t < t1; ++t) {
      if (!vis[t]) {
        for (int64_t h = 0; h < heads; ++h)
          logits[(first + h) * S + t] = -INFINITY;
        continue;
      }
      const uint8_t *src = codes + (bg * M + t - j * M) * D;
      const int64_t at = (bg * groups + (t >> group_shift)) * D;
      for (int64_t d = 0; d < D; ++d)
        k[d] = __builtin_fmaf((float)((src[d] >> shift) & mask), scale[at + d], zero[at + d]);
      for (int64_t h = 0; h < heads; ++h)
        logits[(first + h) * S + t] = dot(query + (first + h) * D, k, D) * scaling;
    }
  }
}

/* logits float32 [B * H, N + n]: scaling * q . k for every slot query head h of batch row b
   sees (-inf elsewhere); its KV head is g = h / (H / G). Each packed key row is dequantized
   once (fma(code, scale, zero)) for the H / G query heads of its KV head.
   query float32 [B * H, D]; codes uint8 [B * G, M, D], scale / zero float32 [B * G,
   ceil(N / group), D] (keys as above; group a power of two); keys float32: batch row b, KV
   head g, row t at keys + b * key_batch + g * key_head + t * D (t < n: the slots after the
   quantized rows); visible bool [B * G, N + n]. Work: B * G * chunks units. D <= MAX_DIM. */
void quantized_logits_f32(const float *restrict query, const uint8_t *restrict codes,
                          const float *restrict scale, const float *restrict zero,
                          const float *restrict keys, int64_t key_batch, int64_t key_head,
                          const bool *restrict visible, float *restrict logits, int64_t B,
                          int64_t G, int64_t H, int64_t M, int64_t n, int64_t D, int bits,
                          int64_t group, float scaling, int64_t chunks, int threads) {
  const int group_shift = __builtin_ctzll((unsigned long long)group);
  const int64_t N = M * (8 / bits), S = N + n, groups = (N + group - 1) / group, heads = H / G;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t u = 0; u < B * G * chunks; ++u) {
    int64_t b, g, c, lo, hi;
    unit_range(u, chunks, G, N, &b, &g, &c, &lo, &hi);
    const int64_t bg = b * G + g, first = b * H + g * heads; /* the group's first query head */
    const bool *vis = visible + bg * S;
    if (D == 64)
      key_rows(query, codes, scale, zero, vis, logits, bg, first, heads, lo, hi, M, S, 64, bits,
               group_shift, groups, scaling);
    else if (D == 128)
      key_rows(query, codes, scale, zero, vis, logits, bg, first, heads, lo, hi, M, S, 128, bits,
               group_shift, groups, scaling);
    else
      key_rows(query, codes, scale, zero, vis, logits, bg, first, heads, lo, hi, M, S, D, bits,
               group_shift, groups, scaling);
    if (c != chunks - 1)
      continue;
    for (int64_t t = 0; t < n; ++t) {
      const float *row = keys + b * key_batch + g * key_head + t * D;
      for (int64_t h = 0; h < heads; ++h)
        logits[(first + h) * S + N + t] =
            vis[N + t] ? dot(query + (first + h) * D, row, D) * scaling : -INFINITY;
    }
  }
}

/* partial float32 [chunks, B * H, Dv]: per chunk of slots, the sum over its slots of probs
   [B * H, N + n] times the value rows (a slot no head of the group gives probability is not
   read); the caller sums the chunks. Each packed value row is dequantized once
   (fma(code, scale, zero)) for the query heads of its KV head. codes uint8 [B * G, M, Dv],
   scale / zero float32 [B * G, N, Dv / group] (values as above); values float32: batch row
   b, KV head g, row t at values + b * value_batch + g * value_head + t * Dv. Dv <= MAX_DIM,
   (H / G) * Dv <= MAX_ACC. */
void quantized_values_f32(const float *restrict probs, const uint8_t *restrict codes,
                          const float *restrict scale, const float *restrict zero,
                          const float *restrict values, int64_t value_batch,
                          int64_t value_head, float *restrict partial, int64_t B, int64_t G,
                          int64_t H, int64_t M, int64_t n, int64_t Dv, int bits,
                          int64_t group, int64_t chunks, int threads) {
  const int per = 8 / bits;
  const int mask = (1 << bits) - 1;
  const int64_t N = M * per, S = N + n, groups = Dv / group, heads = H / G;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t u = 0; u < B * G * chunks; ++u) {
    int64_t b, g, c, lo, hi;
    unit_range(u, chunks, G, N, &b, &g, &c, &lo, &hi);
    const int64_t bg = b * G + g, first = b * H + g * heads;
    float acc[MAX_ACC], v[MAX_DIM];
    for (int64_t i = 0; i < heads * Dv; ++i)
      acc[i] = 0.0f;
    for (int64_t j = lo / M; j * M < hi; ++j) { /* the packed blocks the range meets */
      const int shift = (int)j * bits;
      const int64_t t1 = hi < (j + 1) * M ? hi : (j + 1) * M;
      for (int64_t t = lo > j * M ? lo : j * M; t < t1; ++t) {
        int any = 0;
        for (int64_t h = 0; h < heads; ++h)
          any |= probs[(first + h) * S + t] != 0.0f;
        if (!any)
          continue;
        const uint8_t *src = codes + (bg * M + t - j * M) * Dv;
        const float *s = scale + (bg * N + t) * groups;
        const float *z = zero + (bg * N + t) * groups;
        for (int64_t k = 0; k < groups; ++k) {
          const float sk = s[k], zk = z[k];
          for (int64_t d = k * group; d < (k + 1) * group; ++d)
            v[d] = __builtin_fmaf((float)((src[d] >> shift) & mask), sk, zk);
        }
        for (int64_t h = 0; h < heads; ++h) {
          const float w = probs[(first + h) * S + t];
          float *a = acc + h * Dv;
          for (int64_t d = 0; d < Dv; ++d)
            a[d] = __builtin_fmaf(w, v[d], a[d]);
        }
      }
    }
    if (c == chunks - 1)
      for (int64_t t = 0; t < n; ++t) {
        const float *row = values + b * value_batch + g * value_head + t * Dv;
        for (int64_t h = 0; h < heads; ++h) {
          const float w = probs[(first + h) * S + N + t];
          float *a = acc + h * Dv;
          if (w != 0.0f)
            for (int64_t d = 0; d < Dv; ++d)
              a[d] = __builtin_fmaf(w, row[d], a[d]);
        }
      }
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < Dv; ++d)
        partial[(c * B * H + first + h) * Dv + d] = acc[h * Dv + d];
  }
}
