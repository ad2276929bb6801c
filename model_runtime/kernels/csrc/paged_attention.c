// Decode attention that reads the paged KV cache in place (bfloat16, AVX512-BF16).
//
// One new token per sequence attends its sequence's cached keys and values, walked block by block
// through the block table: each cached row is read once, straight from the cache, for all the
// query heads that share it, with an online softmax (running max and sum per head) so nothing of
// length L is ever materialized. Scores use AVX512-BF16 dot products (float32 accumulation);
// softmax and the weighted sum of values run in float32; the output is rounded to bfloat16 once.
// See model_runtime/kernels/paged_attention.py (the caller) and docs/decisions.md.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 8  // query heads scored together per pass over a cached key row
#define CHUNK 64  // cached tokens scored before their values are summed

int moe_paged_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

static inline uint16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __m512 load_bf16x16(
    const uint16_t *p, __mmask16 m) {  // 16 bfloat16 -> float32 (bits shifted into the high half)
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// q [S, K*G, E] bf16 contiguous; key row of (slot, kv head k) at kc + slot*ks + k*kh, value row at
// vc + slot*vs + k*vh (E and Ev elements, contiguous); block_tables [S, bt_stride] int64;
// context_lens [S] int64 (the new token included, its position context_len - 1); window > 0 keeps
// the last `window` positions only; out [S, K*G, Ev] bf16.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void moe_paged_decode_bf16(
    const uint16_t *q, const uint16_t *kc, long ks, long kh, const uint16_t *vc, long vs, long vh,
    const int64_t *block_tables, long bt_stride, const int64_t *context_lens, uint16_t *out, long S,
    long K, long G, long E, long Ev, long block_size, long window, float scale) {
    float *acc = aligned_alloc(64, (size_t)G * (((Ev + 15) / 16) * 16) * sizeof(float) + 64);
    float *p = malloc((size_t)G * CHUNK * sizeof(float));
    float *m = malloc((size_t)G * sizeof(float)), *l = malloc((size_t)G * sizeof(float));
    long evp = ((Ev + 15) / 16) * 16;  // acc row stride
    const uint16_t **vrows = malloc(CHUNK * sizeof(*vrows));
    for (long s = 0; s < S; s++) {
        long n = context_lens[s];
        long start = (window > 0 && n > window) ? n - window : 0;
        const int64_t *table = block_tables + s * bt_stride;
        for (long k = 0; k < K; k++) {
            const uint16_t *qh = q + (s * K * G + k * G) * E;
            memset(acc, 0, (size_t)G * evp * sizeof(float));
            for (long g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.0f;
            for (long t0 = start; t0 < n; t0 += CHUNK) {
                long cn = n - t0 < CHUNK ? n - t0 : CHUNK;
                // scores of this chunk's tokens, p[g * CHUNK + j]
                for (long j = 0; j < cn; j++) {
                    long t = t0 + j;
                    long slot = table[t / block_size] * block_size + t % block_size;
                    const uint16_t *kr = kc + slot * ks + k * kh;
                    vrows[j] = vc + slot * vs + k * vh;
                    for (long g0 = 0; g0 < G; g0 += GROUP) {
                        long gn = G - g0 < GROUP ? G - g0 : GROUP;
                        __m512 a[GROUP];
                        for (int gg = 0; gg < GROUP; gg++) a[gg] = _mm512_setzero_ps();
                        for (long i = 0; i < E; i += 32) {
                            __mmask32 mk = E - i >= 32 ? 0xffffffffu : ((1u << (E - i)) - 1u);
                            __m512i kv = _mm512_maskz_loadu_epi16(mk, kr + i);
                            for (long gg = 0; gg < gn; gg++) {
                                __m512i qv = _mm512_maskz_loadu_epi16(mk, qh + (g0 + gg) * E + i);
                                a[gg] = _mm512_dpbf16_ps(a[gg], (__m512bh)qv, (__m512bh)kv);
                            }
                        }
                        for (long gg = 0; gg < gn; gg++)
                            p[(g0 + gg) * CHUNK + j] = _mm512_reduce_add_ps(a[gg]) * scale;
                    }
                }
                // online softmax: rescale what was summed so far to the new running max
                for (long g = 0; g < G; g++) {
                    float *pg = p + g * CHUNK;
                    float mx = m[g];
                    for (long j = 0; j < cn; j++) mx = pg[j] > mx ? pg[j] : mx;
                    float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mx);
                    float sum = 0.0f;
                    for (long j = 0; j < cn; j++) sum += (pg[j] = expf(pg[j] - mx));
                    m[g] = mx;
                    l[g] = l[g] * alpha + sum;
                    if (alpha != 1.0f) {
                        __m512 av = _mm512_set1_ps(alpha);
                        float *ag = acc + g * evp;
                        for (long c = 0; c < evp; c += 16)
                            _mm512_store_ps(ag + c, _mm512_mul_ps(_mm512_load_ps(ag + c), av));
                    }
                }
                // acc[g] += p[g, j] * v[j]: each value row converted once for all G heads
                for (long j = 0; j < cn; j++) {
                    const uint16_t *vr = vrows[j];
                    for (long c = 0; c < Ev; c += 16) {
                        __mmask16 mv = Ev - c >= 16 ? 0xffff : (__mmask16)((1u << (Ev - c)) - 1u);
                        __m512 v = load_bf16x16(vr + c, mv);
                        for (long g = 0; g < G; g++) {
                            float *ag = acc + g * evp + c;
                            _mm512_store_ps(ag, _mm512_fmadd_ps(_mm512_set1_ps(p[g * CHUNK + j]), v,
                                                                _mm512_load_ps(ag)));
                        }
                    }
                }
            }
            for (long g = 0; g < G; g++) {
                uint16_t *o = out + (s * K * G + k * G + g) * Ev;
                float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
                for (long c = 0; c < Ev; c++) o[c] = to_bf16(acc[g * evp + c] * inv);
            }
        }
    }
    free(vrows);
    free(l);
    free(m);
    free(p);
    free(acc);
}
