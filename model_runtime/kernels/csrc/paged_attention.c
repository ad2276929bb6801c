// Decode attention that reads the paged KV cache in place: bfloat16 on AVX512-BF16 (moe_paged_decode_bf16),
// float32 or bfloat16 on AVX2 + FMA (moe_paged_decode_avx2, further down); and a prefill's attention of
// several new tokens a sequence, bfloat16 on AVX512-BF16 (moe_paged_prefill_bf16, decision 39).
//
// One new token per sequence attends its sequence's cached keys and values, walked block by block
// through the block table: each cached row is read once, straight from the cache, for all the
// query heads that share it, with an online softmax (running max and sum per head) so nothing of
// length L is ever materialized. Scores are float32 FMAs over key rows widened from bfloat16 (the
// queries widened once per sequence); softmax and the weighted sum of values run in float32; the
// output is rounded to bfloat16 once.
// See model_runtime/kernels/paged_attention.py (the caller) and docs/decisions.md.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "simd_exp.h"

#define GROUP 8  // query heads scored together per pass over a cached key row
#define CHUNK 64  // cached tokens scored before their values are summed

// Scores on AMX tiles (decision 32) where the CPU has them and E is a multiple of 32: a chunk's key
// rows (copied together) are the A operand, the query heads packed once per sequence the B operand,
// a tile multiply scoring 16 tokens for 16 heads (the FMA path reduces each head's sum across a
// vector for every token: MLA's 16 heads x 576 values cost ~2x the values' sum). Off by default in
// the library; moe_paged_amx_select turns it on.
static int amx_scores;

int moe_paged_amx_select(int on) {  // whether the scores run on AMX tiles from now on
    amx_scores = on && amx_request();
    return amx_scores;
}

AMX __attribute__((noinline)) static void amx_start(void) { amx_configure(); }
AMX __attribute__((noinline)) static void amx_stop(void) { _tile_release(); }

// qpack [ceil(G/16)][E/2][16][2] = the G query heads (rows of E at qk, heads qh apart; or their first
// e1 columns there and the rest at qk2, heads q2h apart), 16 heads a B operand
AMX __attribute__((noinline)) static void pack_queries(const uint16_t *qk, long qh, const uint16_t *qk2, long q2h,
                                                        long e1, long G, long E, uint16_t *qpack) {
    const uint16_t *rows[16];
    for (long g0 = 0; g0 < G; g0 += 16) {
        long gn = G - g0 < 16 ? G - g0 : 16;
        uint16_t *B = qpack + (g0 / 16) * 16 * E;
        for (long g = 0; g < gn; g++) rows[g] = qk + (g0 + g) * qh;
        amx_pack_rows(rows, gn, e1, B);
        if (e1 < E) {
            for (long g = 0; g < gn; g++) rows[g] = qk2 + (g0 + g) * q2h;
            amx_pack_rows(rows, gn, E - e1, B + e1 * 16);
        }
    }
}

// p[g * CHUNK + j] = scale * q[g] . key j for g < G, j < cn: keys [CHUNK][E] (contiguous rows),
// the queries packed by pack_queries; the tiles configured (amx_start)
AMX __attribute__((noinline)) static void amx_chunk_scores(const uint16_t *keys, long E, const uint16_t *qpack,
                                                            long G, long cn, float scale, float *p) {
    float c[16 * 16] __attribute__((aligned(64)));
    for (long j0 = 0; j0 < cn; j0 += 16) {
        long rows = cn - j0 < 16 ? cn - j0 : 16;
        for (long g0 = 0; g0 < G; g0 += 16) {
            const uint16_t *B = qpack + (g0 / 16) * 16 * E;
            _tile_zero(0);
            for (long k = 0; k < E; k += 32) {
                _tile_loadd(4, keys + j0 * E + k, E * 2);
                _tile_loadd(6, B + k * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, c, 64);
            long gn = G - g0 < 16 ? G - g0 : 16;
            for (long r = 0; r < rows; r++)
                for (long g = 0; g < gn; g++) p[(g0 + g) * CHUNK + j0 + r] = c[r * 16 + g] * scale;
        }
    }
}

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

static inline __mmask16 lanes(long left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1u); }

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))
// f(gn, ...) with gn a constant 1..GROUP, so that its per-head sums stay in registers
#define BY_GN(gn, f, ...)                  \
    switch (gn) {                          \
        case 1: f(1, __VA_ARGS__); break;  \
        case 2: f(2, __VA_ARGS__); break;  \
        case 3: f(3, __VA_ARGS__); break;  \
        case 4: f(4, __VA_ARGS__); break;  \
        case 5: f(5, __VA_ARGS__); break;  \
        case 6: f(6, __VA_ARGS__); break;  \
        case 7: f(7, __VA_ARGS__); break;  \
        default: f(8, __VA_ARGS__); break; \
    }

// p[gg * CHUNK] = scale * q[gg] . key for gn query heads (float32 rows of ep at qf, zero-padded past E)
// and one cached key row: the key widened 16 values at a time, once for all the heads, and float32 FMAs.
// (AVX512-BF16's dot product, 32 products an instruction, was the first version: on the machines this
// was measured on it issues one every two cycles against two FMAs a cycle, so FMAs over widened
// values score ~2x faster.)
TARGET INLINE void score_row(const long gn, const float *qf, long ep, const uint16_t *kr, long E, float scale,
                             float *p) {
    __m512 a[GROUP];
    for (long gg = 0; gg < gn; gg++) a[gg] = _mm512_setzero_ps();
    for (long i = 0; i < E; i += 16) {
        __m512 kv = load_bf16x16(kr + i, lanes(E - i));
        for (long gg = 0; gg < gn; gg++) a[gg] = _mm512_fmadd_ps(_mm512_load_ps(qf + gg * ep + i), kv, a[gg]);
    }
    for (long gg = 0; gg < gn; gg++) p[gg * CHUNK] = _mm512_reduce_add_ps(a[gg]) * scale;
}

// columns c .. c + 31 of acc[gg] (rows evp apart at accg) += the chunk's cn tokens' probabilities
// (float32, rows CHUNK apart at pg) times their value rows (widened to float32), for gn heads
TARGET INLINE void sum_values(const long gn, float *accg, long evp, const float *pg, const uint16_t **vrows, long c,
                              __mmask32 mv, long cn) {
    __m512 lo[GROUP], hi[GROUP];
    for (long gg = 0; gg < gn; gg++) {
        lo[gg] = _mm512_load_ps(accg + gg * evp);
        hi[gg] = _mm512_load_ps(accg + gg * evp + 16);
    }
    for (long j = 0; j < cn; j++) {
        __m512 v0 = load_bf16x16(vrows[j] + c, (__mmask16)mv);
        __m512 v1 = load_bf16x16(vrows[j] + c + 16, (__mmask16)(mv >> 16));
        for (long gg = 0; gg < gn; gg++) {
            __m512 pv = _mm512_set1_ps(pg[gg * CHUNK + j]);
            lo[gg] = _mm512_fmadd_ps(pv, v0, lo[gg]);
            hi[gg] = _mm512_fmadd_ps(pv, v1, hi[gg]);
        }
    }
    for (long gg = 0; gg < gn; gg++) {
        _mm512_store_ps(accg + gg * evp, lo[gg]);
        _mm512_store_ps(accg + gg * evp + 16, hi[gg]);
    }
}

// A cached token's rows for every kv head (keys, then values) into the cache, PREFETCH_TOKENS ahead of
// the first kv head's pass: a kv head's rows are K heads apart in a slot (1 KB at 8 heads of 64), a
// stride the hardware prefetcher follows poorly across pages, and the other heads' passes then find
// them in L2. With the slot list (once per sequence, not a division per token and head): 32
// sequences of 100 tokens, 8 kv heads of 64, the cache out of L3, 1.19-1.28 -> 1.01-1.06 ms.
#define PREFETCH_TOKENS 4
static inline void prefetch_rows(const uint16_t *keys, long nk, const uint16_t *values, long nv) {
    for (long i = 0; i < nk; i += 32) _mm_prefetch((const char *)(keys + i), _MM_HINT_T0);
    for (long i = 0; i < nv; i += 32) _mm_prefetch((const char *)(values + i), _MM_HINT_T0);
}

// a slot list as long as the longest context (what sequence_slots fills for each sequence in turn)
static long *slot_buffer(const int64_t *context_lens, long S) {
    long most = 0;
    for (long s = 0; s < S; s++) most = context_lens[s] > most ? context_lens[s] : most;
    return malloc((size_t)(most > 0 ? most : 1) * sizeof(long));
}

// slots[t] = the cache slot of a sequence's position t (block table `table`), computed once for every
// kv head, for t from the first position it attends (window > 0: the last `window` of its n) to n - 1;
// returns that first position
static long sequence_slots(long *slots, const int64_t *table, long n, long window, long block_size) {
    long start = (window > 0 && n > window) ? n - window : 0;
    for (long t = start, b = start / block_size, o = start % block_size; t < n; t++) {
        slots[t] = table[b] * block_size + o;
        if (++o == block_size) o = 0, b++;
    }
    return start;
}

// The kernels library's helper threads (cpu_decode.c, decisions 36-38), when it runs them: its
// moe_parallel_rows(fn, ctx, rows, bytes, chunk) runs fn(ctx, b, e) over [0, rows), the chunks shared
// (moe_paged_use_pool sets it; NULL: none). Each sequence is computed by one thread as without them.
typedef void (*rows_fn)(const void *ctx, long begin, long end);
static void (*pool)(rows_fn fn, const void *ctx, long rows, long bytes, long chunk);

void moe_paged_use_pool(void *parallel_rows) {
    pool = (void (*)(rows_fn, const void *, long, long, long))parallel_rows;
}

struct decode_job {  // a paged decode's arguments (moe_paged_decode_bf16, moe_paged_decode_avx2)
    const char *q, *q2, *kc, *vc;
    long qs, qh, q2s, q2h, e1, ks, kh, vs, vh;
    const int64_t *block_tables, *context_lens;
    long bt_stride;
    char *out;
    long os, oh, K, G, E, Ev, block_size, window;
    float scale;
    int bf;
};

// q [S, K*G, E] bf16, rows of E contiguous, sequences qs and heads qh apart, or in two parts: its
// first e1 columns at q and the other E - e1 at q2 (sequences q2s and heads q2h apart; e1 a multiple of
// 16; q2 NULL: e1 = E); key row of (slot, kv head k) at kc + slot*ks + k*kh, value row at
// vc + slot*vs + k*vh (E and Ev elements, contiguous); block_tables [S, bt_stride] int64;
// context_lens [S] int64 (the new token included, its position context_len - 1); window > 0 keeps
// the last `window` positions only; out [S, K*G, Ev] bf16, rows of Ev contiguous, sequences os and heads
// oh apart (MLA's caller takes it head-major, [K*G, S, Ev], for its next batched matmul).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void paged_decode_bf16(
    const uint16_t *q, long qs, long qh, const uint16_t *q2, long q2s, long q2h, long e1, const uint16_t *kc, long ks, long kh, const uint16_t *vc, long vs, long vh,
    const int64_t *block_tables, long bt_stride, const int64_t *context_lens, uint16_t *out, long os, long oh, long S,
    long K, long G, long E, long Ev, long block_size, long window, float scale) {
    float *acc = aligned_alloc(64, (size_t)G * (((Ev + 31) / 32) * 32) * sizeof(float) + 64);
    float *p = malloc((size_t)G * CHUNK * sizeof(float));
    float *m = malloc((size_t)G * sizeof(float)), *l = malloc((size_t)G * sizeof(float));
    long evp = ((Ev + 31) / 32) * 32;  // acc row stride
    const uint16_t **vrows = malloc(CHUNK * sizeof(*vrows));
    long ep = ((E + 15) / 16) * 16;  // a widened query row, zero-padded to whole vectors
    float *qf = aligned_alloc(64, (size_t)G * ep * sizeof(float) + 64);
    const int tiles = amx_scores && E % 32 == 0 && e1 % 32 == 0 && G >= 8;  // (fewer heads a kv head: no faster)
    uint16_t *keys = tiles ? calloc((size_t)CHUNK * E, sizeof(uint16_t)) : NULL;  // a chunk's key rows
    uint16_t *qpack = tiles ? aligned_alloc(64, (size_t)((G + 15) / 16) * 16 * E * sizeof(uint16_t)) : NULL;
    if (tiles) amx_start();
    long *slots = slot_buffer(context_lens, S);
    for (long s = 0; s < S; s++) {
        long n = context_lens[s];
        long start = sequence_slots(slots, block_tables + s * bt_stride, n, window, block_size);
        for (long k = 0; k < K; k++) {
            const uint16_t *qk = q + s * qs + k * G * qh, *qk2 = q2 ? q2 + s * q2s + k * G * q2h : NULL;
            memset(acc, 0, (size_t)G * evp * sizeof(float));
            if (tiles)  // this kv head's query heads, packed once
                pack_queries(qk, qh, qk2, q2h, e1, G, E, qpack);
            else  // widened once
                for (long g = 0; g < G; g++)
                    for (long i = 0; i < ep; i += 16)
                        _mm512_store_ps(qf + g * ep + i, i < e1 ? load_bf16x16(qk + g * qh + i, lanes(e1 - i))
                                                                : load_bf16x16(qk2 + g * q2h + i - e1, lanes(E - i)));
            for (long g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.0f;
            for (long t0 = start; t0 < n; t0 += CHUNK) {
                long cn = n - t0 < CHUNK ? n - t0 : CHUNK;
                // scores of this chunk's tokens, p[g * CHUNK + j]
                for (long j = 0; j < cn; j++) {
                    long t = t0 + j;
                    long slot = slots[t];
                    if (k == 0 && t + PREFETCH_TOKENS < n)  // the first kv head's pass brings every head's rows
                        prefetch_rows(kc + slots[t + PREFETCH_TOKENS] * ks, (K - 1) * kh + E,
                                      vc + slots[t + PREFETCH_TOKENS] * vs, (K - 1) * vh + Ev);
                    const uint16_t *kr = kc + slot * ks + k * kh;
                    vrows[j] = vc + slot * vs + k * vh;
                    if (tiles) {
                        memcpy(keys + j * E, kr, (size_t)E * sizeof(uint16_t));
                        continue;
                    }
                    for (long g0 = 0; g0 < G; g0 += GROUP) {
                        long gn = G - g0 < GROUP ? G - g0 : GROUP;
                        BY_GN(gn, score_row, qf + g0 * ep, ep, kr, E, scale, p + g0 * CHUNK + j);
                    }
                }
                if (tiles) amx_chunk_scores(keys, E, qpack, G, cn, scale, p);
                // online softmax, 16 scores at a time: rescale what was summed so far to the new
                // running max; the probabilities stay float32 in p for the weighted sum of values
                for (long g = 0; g < G; g++) {
                    float *pg = p + g * CHUNK;
                    __m512 vmx = _mm512_set1_ps(m[g]);
                    for (long j = 0; j < cn; j += 16)
                        vmx = _mm512_mask_max_ps(vmx, lanes(cn - j), vmx, _mm512_loadu_ps(pg + j));
                    float mx = _mm512_reduce_max_ps(vmx);
                    float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mx);
                    __m512 vsum = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx);
                    for (long j = 0; j < cn; j += 16) {
                        __mmask16 mj = lanes(cn - j);
                        __m512 e = _mm512_maskz_mov_ps(mj, exp16(_mm512_sub_ps(_mm512_loadu_ps(pg + j), vm)));
                        vsum = _mm512_add_ps(vsum, e);
                        _mm512_mask_storeu_ps(pg + j, mj, e);
                    }
                    m[g] = mx;
                    l[g] = l[g] * alpha + _mm512_reduce_add_ps(vsum);
                    if (alpha != 1.0f) {
                        __m512 av = _mm512_set1_ps(alpha);
                        float *ag = acc + g * evp;
                        for (long c = 0; c < evp; c += 16)
                            _mm512_store_ps(ag + c, _mm512_mul_ps(_mm512_load_ps(ag + c), av));
                    }
                }
                // acc[g] += p[g, j] * v[j]: per 32 columns, GROUP heads' sums stay in registers over
                // the chunk's tokens, each value row widened once for the group
                for (long c = 0; c < Ev; c += 32) {
                    __mmask32 mv = Ev - c >= 32 ? 0xffffffffu : ((1u << (Ev - c)) - 1u);
                    for (long g0 = 0; g0 < G; g0 += GROUP) {
                        long gn = G - g0 < GROUP ? G - g0 : GROUP;
                        BY_GN(gn, sum_values, acc + g0 * evp + c, evp, p + g0 * CHUNK, vrows, c, mv, cn);
                    }
                }
            }
            for (long g = 0; g < G; g++) {
                uint16_t *o = out + s * os + (k * G + g) * oh;
                float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
                for (long c = 0; c < Ev; c++) o[c] = to_bf16(acc[g * evp + c] * inv);
            }
        }
    }
    if (tiles) amx_stop();
    free(slots);
    free(qpack);
    free(keys);
    free(qf);
    free(vrows);
    free(l);
    free(m);
    free(p);
    free(acc);
}

// the sequences b .. e - 1 of a bfloat16 decode (AVX512-BF16)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void decode_sequences_bf16(const void *c, long b,
                                                                                                long e) {
    const struct decode_job *j = c;
    const uint16_t *q2 = j->q2 ? (const uint16_t *)j->q2 + b * j->q2s : NULL;
    paged_decode_bf16((const uint16_t *)j->q + b * j->qs, j->qs, j->qh, q2, j->q2s, j->q2h, j->e1,
                      (const uint16_t *)j->kc, j->ks, j->kh, (const uint16_t *)j->vc, j->vs, j->vh,
                      j->block_tables + b * j->bt_stride, j->bt_stride, j->context_lens + b,
                      (uint16_t *)j->out + b * j->os, j->os, j->oh, e - b, j->K, j->G, j->E, j->Ev, j->block_size,
                      j->window, j->scale);
}

// what a decode reads of the cache (MLA's keys and values are one row: counted twice)
static long cache_bytes(const int64_t *context_lens, long S, long K, long E, long Ev, long size) {
    long bytes = 0;
    for (long s = 0; s < S; s++) bytes += context_lens[s] * K * (E + Ev) * size;
    return bytes;
}

// q [S, K*G, E] bf16 ... (paged_decode_bf16's arguments): the sequences shared with the helper threads
// where they run (a sequence per chunk, each computed as without them)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void moe_paged_decode_bf16(
    const uint16_t *q, long qs, long qh, const uint16_t *q2, long q2s, long q2h, long e1, const uint16_t *kc, long ks,
    long kh, const uint16_t *vc, long vs, long vh, const int64_t *block_tables, long bt_stride,
    const int64_t *context_lens, uint16_t *out, long os, long oh, long S, long K, long G, long E, long Ev,
    long block_size, long window, float scale) {
    const struct decode_job j = {(const char *)q, (const char *)q2, (const char *)kc, (const char *)vc, qs, qh, q2s,
                                 q2h, e1, ks, kh, vs, vh, block_tables, context_lens, bt_stride, (char *)out, os, oh,
                                 K, G, E, Ev, block_size, window, scale, 1};
    if (!pool) {
        decode_sequences_bf16(&j, 0, S);
        return;
    }
    pool(decode_sequences_bf16, &j, S, cache_bytes(context_lens, S, K, E, Ev, 2), 1);
}

// ---- prefill: several new tokens a sequence, the context read in place ------------------------------
// A step's new tokens (a prompt's chunk, or several) attend their sequence's context: the cached
// positions before them and each other, causally (and within the window). The torch path copies every
// sequence's context out of the cache padded to the longest, builds a [S, Q, L] mask and runs
// scaled_dot_product_attention over it, ~4-10 us of fixed cost per (sequence, head) at 32-token
// prompts. Here a job is one (sequence, kv head): its context's key rows are read once from the cache,
// widened and transposed into float32 columns (16 positions a vector), its value rows widened, and
// then each of its (new token, query head) pairs, four at a time, scores 16 positions with an FMA per
// key element (no horizontal sums), takes the softmax of its own causal range in float32 and sums the
// value rows weighted by it; the output is rounded to bfloat16 once. The jobs are shared with the
// helper threads where they run; each pair's result is computed the same way whoever takes it.
#define PAIRS 4  // (new token, query head) pairs scored together

struct prefill_job {
    const uint16_t *q, *kc, *kc2, *vc;
    long qs, qh, ks, kh, ks2, kh2, e1, vs, vh;
    const int64_t *block_tables, *context_lens, *query_start;
    long bt_stride, dense_len;
    uint16_t *out;
    long os, oh, K, G, E, Ev, block_size, window;
    float scale;
    int failed;
};

static __thread struct {
    float *at;
    size_t size;
} prefill_scratch;

static float *prefill_floats(size_t n) {  // this thread's float32 scratch, grown as needed
    if (n > prefill_scratch.size) {
        float *grown = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        if (!grown) return NULL;
        free(prefill_scratch.at);
        prefill_scratch.at = grown, prefill_scratch.size = n;
    }
    return prefill_scratch.at;
}

TARGET static void prefill_heads(const void *ctx, long b, long e) {
    struct prefill_job *j = (struct prefill_job *)ctx;
    const long K = j->K, G = j->G, E = j->E, Ev = j->Ev, bs = j->block_size, window = j->window;
    const long evp = (Ev + 63) / 64 * 64;  // a value row, zero-padded to whole 4-vector blocks
    for (long job = b; job < e; job++) {
        const long s = job / K, k = job % K;
        const long t0 = j->query_start[s], qn = j->query_start[s + 1] - t0, n = j->context_lens[s];
        if (qn <= 0) continue;
        const long p0 = n - qn;  // the first new token's position
        const long lo = window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;  // the first position attended
        const long L = n - lo, Lp = (L + 15) / 16 * 16;
        float *kt = prefill_floats((size_t)E * Lp + (size_t)Lp * evp + PAIRS * Lp + PAIRS * E);
        if (!kt) {
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
            return;
        }
        float *vf = kt + E * Lp, *sc = vf + Lp * evp, *qf = sc + PAIRS * Lp;
        // the context: keys transposed, kt[i * Lp + t] (positions past L zero), values vf[t * evp + c]
        const int64_t *table = j->block_tables ? j->block_tables + s * j->bt_stride : NULL;
        for (long u0 = 0; u0 < Lp; u0 += 16) {  // 16 positions at a time, their keys transposed in registers
            const uint16_t *kr[16], *kr2[16];
            for (long t = u0; t < u0 + 16; t++) {
                if (t >= L) {
                    kr[t - u0] = kr2[t - u0] = NULL;
                    memset(vf + t * evp, 0, evp * sizeof(float));
                    continue;
                }
                const long pos = lo + t, slot = table ? table[pos / bs] * bs + pos % bs : s * j->dense_len + pos;
                const uint16_t *vr = j->vc + slot * j->vs + k * j->vh;
                kr[t - u0] = j->kc + slot * j->ks + k * j->kh;
                kr2[t - u0] = j->kc2 ? j->kc2 + slot * j->ks2 + k * j->kh2 : NULL;
                for (long c = 0; c < evp; c += 16)
                    _mm512_store_ps(vf + t * evp + c, load_bf16x16(vr + c, lanes(Ev - c)));
            }
            for (long i = 0; i < E; i += 16) {
                __m512i r[16];
                for (long t = 0; t < 16; t++)
                    r[t] = !kr[t]     ? _mm512_setzero_si512()
                           : i < j->e1 ? _mm512_castps_si512(load_bf16x16(kr[t] + i, lanes(j->e1 - i)))
                                       : _mm512_castps_si512(load_bf16x16(kr2[t] + i - j->e1, lanes(E - i)));
                transpose16x16(r);
                for (long x = 0; x < 16 && i + x < E; x++) _mm512_store_si512(kt + (i + x) * Lp + u0, r[x]);
            }
        }
        // (new token, query head) pairs r = token * G + g, PAIRS at a time (the last repeated to fill)
        const long R = qn * G;
        for (long r0 = 0; r0 < R; r0 += PAIRS) {
            long first[PAIRS], stop[PAIRS], jlo = Lp, jhi = 0;
            for (long x = 0; x < PAIRS; x++) {
                const long r = r0 + x < R ? r0 + x : R - 1, i = r / G, g = r % G, p = p0 + i;
                const uint16_t *qr = j->q + (t0 + i) * j->qs + (k * G + g) * j->qh;
                for (long y = 0; y < E; y += 16)
                    _mm512_mask_storeu_ps(qf + x * E + y, lanes(E - y),
                                          _mm512_mul_ps(load_bf16x16(qr + y, lanes(E - y)), _mm512_set1_ps(j->scale)));
                first[x] = window > 0 && p - window + 1 > lo ? p - window + 1 - lo : 0;
                stop[x] = p - lo + 1;
                jlo = first[x] < jlo ? first[x] : jlo;
                jhi = stop[x] > jhi ? stop[x] : jhi;
            }
            const long b0 = jlo / 16 * 16;
            for (long jb = b0; jb < jhi; jb += 32) {  // scores of 32 positions (two vectors) for the PAIRS pairs
                __m512 a[PAIRS][2];
                for (long x = 0; x < PAIRS; x++) a[x][0] = a[x][1] = _mm512_setzero_ps();
                const float *col = kt + jb;
                const int two = jb + 16 < jhi;
                for (long i = 0; i < E; i++) {
                    const __m512 k0 = _mm512_load_ps(col + i * Lp), k1 = two ? _mm512_load_ps(col + i * Lp + 16) : k0;
                    for (long x = 0; x < PAIRS; x++) {
                        const __m512 qv = _mm512_set1_ps(qf[x * E + i]);
                        a[x][0] = _mm512_fmadd_ps(qv, k0, a[x][0]);
                        a[x][1] = _mm512_fmadd_ps(qv, k1, a[x][1]);
                    }
                }
                for (long x = 0; x < PAIRS; x++) {
                    _mm512_store_ps(sc + x * Lp + jb, a[x][0]);
                    if (two) _mm512_store_ps(sc + x * Lp + jb + 16, a[x][1]);
                }
            }
            float inv[PAIRS];
            for (long x = 0; x < PAIRS; x++) {  // softmax over the pair's own positions; 0 elsewhere in b0 .. jhi
                float *px = sc + x * Lp;
                __m512 vmx = _mm512_set1_ps(-INFINITY);
                for (long t = first[x]; t < stop[x]; t += 16)
                    vmx = _mm512_mask_max_ps(vmx, lanes(stop[x] - t), vmx, _mm512_loadu_ps(px + t));
                const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
                __m512 vsum = _mm512_setzero_ps();
                const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
                for (long t = b0; t < jhi; t += 16) {
                    const __m512i at = _mm512_add_epi32(_mm512_set1_epi32((int)t), iota);
                    const __mmask16 in = _mm512_cmpge_epi32_mask(at, _mm512_set1_epi32((int)first[x])) &
                                         _mm512_cmplt_epi32_mask(at, _mm512_set1_epi32((int)stop[x]));
                    const __m512 ex = _mm512_maskz_mov_ps(in, exp16(_mm512_sub_ps(_mm512_loadu_ps(px + t), vm)));
                    vsum = _mm512_add_ps(vsum, ex);
                    _mm512_storeu_ps(px + t, ex);
                }
                inv[x] = 1.0f / _mm512_reduce_add_ps(vsum);
            }
            for (long c0 = 0; c0 < evp; c0 += 64) {  // the weighted sums of values, 64 columns at a time
                __m512 o[PAIRS][4];
                for (long x = 0; x < PAIRS; x++)
                    for (long y = 0; y < 4; y++) o[x][y] = _mm512_setzero_ps();
                for (long t = b0; t < jhi; t++) {
                    const float *vr = vf + t * evp + c0;
                    const __m512 v0 = _mm512_load_ps(vr), v1 = _mm512_load_ps(vr + 16), v2 = _mm512_load_ps(vr + 32),
                                 v3 = _mm512_load_ps(vr + 48);
                    for (long x = 0; x < PAIRS; x++) {
                        const __m512 pr = _mm512_set1_ps(sc[x * Lp + t]);
                        o[x][0] = _mm512_fmadd_ps(pr, v0, o[x][0]);
                        o[x][1] = _mm512_fmadd_ps(pr, v1, o[x][1]);
                        o[x][2] = _mm512_fmadd_ps(pr, v2, o[x][2]);
                        o[x][3] = _mm512_fmadd_ps(pr, v3, o[x][3]);
                    }
                }
                for (long x = 0; x < PAIRS && r0 + x < R; x++) {
                    const long r = r0 + x, i = r / G, g = r % G;
                    uint16_t *orow = j->out + (t0 + i) * j->os + (k * G + g) * j->oh;
                    for (long y = 0; y < 4 && c0 + 16 * y < Ev; y++) {
                        const long cc = c0 + 16 * y;
                        const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[x][y], _mm512_set1_ps(inv[x])));
                        _mm256_mask_storeu_epi16(orow + cc, lanes(Ev - cc), h);
                    }
                }
            }
        }
    }
}

// q [N, K*G, E] bf16 (rows contiguous; tokens qs and heads qh apart), sequence s's new tokens rows
// query_start[s] .. query_start[s + 1] - 1 at positions context_lens[s] - (their count) .. context_lens[s]
// - 1, their keys and values already in the cache (kc, vc, block_tables as moe_paged_decode_bf16's);
// causal, window > 0 keeping a token's last `window` positions; out [N, K*G, Ev] bf16 (rows contiguous).
// A key row's first e1 columns lie at kc (e1 a multiple of 16), its other E - e1 at kc2 + slot ks2 + k
// kh2 (MLA: each head's no-rope key beside the one rope key all heads share, kh2 = 0; kc2 NULL: e1 =
// E). block_tables NULL: the context is dense, position t of sequence s at slot s dense_len + t (MLA's
// keys and values expanded from the gathered latents). 0, or -1 when a thread's scratch could not be
// allocated.
TARGET int moe_paged_prefill_bf16(const uint16_t *q, long qs, long qh, const uint16_t *kc, long ks, long kh,
                                  const uint16_t *kc2, long ks2, long kh2, long e1, const uint16_t *vc, long vs,
                                  long vh, const int64_t *block_tables, long bt_stride, long dense_len,
                                  const int64_t *context_lens, const int64_t *query_start, uint16_t *out, long os,
                                  long oh, long S, long K, long G, long E, long Ev, long block_size, long window,
                                  float scale) {
    struct prefill_job j = {.q = q, .kc = kc, .kc2 = kc2, .vc = vc, .qs = qs, .qh = qh, .ks = ks, .kh = kh,
                            .ks2 = ks2, .kh2 = kh2, .e1 = kc2 ? e1 : E, .vs = vs, .vh = vh,
                            .block_tables = block_tables, .context_lens = context_lens, .query_start = query_start,
                            .bt_stride = bt_stride, .dense_len = dense_len, .out = out, .os = os, .oh = oh, .K = K,
                            .G = G, .E = E, .Ev = Ev, .block_size = block_size, .window = window, .scale = scale};
    long work = 0;  // what the jobs read and compute, in the pool's bytes: (new tokens x context) pairs
    for (long s = 0; s < S; s++) work += (query_start[s + 1] - query_start[s]) * context_lens[s] * G * (E + Ev) * 2;
    if (pool)
        pool(prefill_heads, &j, S * K, work, 1);
    else
        prefill_heads(&j, 0, S * K);
    return j.failed ? -1 : 0;
}

// ---- the same decode on AVX2 + FMA, float32 or bfloat16 elements ----------------------------------
// For CPUs without AVX512-BF16 (AMD Zen 2/3, Intel before Cooper Lake), where the runtime runs float32,
// and for float32 models on any x86-64 CPU: one 8-wide pass of the same steps as
// moe_paged_decode_bf16 (scores, online softmax, weighted sum of values, all float32), with `bf`
// saying whether q, the cache and out are bfloat16 (widened as read, the output rounded once) or
// float32. Columns past the last whole 8 (a head_dim not a multiple of 8) are summed one at a time.
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 INLINE __m256 load8(const void *p, long i, const int bf) {  // elements i .. i + 7, as float32
    if (bf)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

static inline float elem(const void *p, long i, const int bf) {
    if (bf) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

AVX2 INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// p[gg * CHUNK] = scale * q[gg] . key for gn query heads (float32 rows ep apart at qf) and one key row
AVX2 INLINE void score_row8(const long gn, const float *qf, long ep, const void *kr, long E, float scale, float *p,
                            const int bf) {
    __m256 a[GROUP];
    for (long gg = 0; gg < gn; gg++) a[gg] = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= E; i += 8) {
        __m256 kv = load8(kr, i, bf);
        for (long gg = 0; gg < gn; gg++) a[gg] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + gg * ep + i), kv, a[gg]);
    }
    for (long gg = 0; gg < gn; gg++) {
        float s = hsum8(a[gg]);
        for (long t = i; t < E; t++) s += qf[gg * ep + t] * elem(kr, t, bf);
        p[gg * CHUNK] = s * scale;
    }
}

// columns c .. c + 7 of acc[gg] (rows evp apart at accg) += the chunk's probabilities times its value rows
AVX2 INLINE void sum_values8(const long gn, float *accg, long evp, const float *pg, const void **vrows, long c,
                             long cn, const int bf) {
    __m256 a[GROUP];
    for (long gg = 0; gg < gn; gg++) a[gg] = _mm256_loadu_ps(accg + gg * evp);
    for (long j = 0; j < cn; j++) {
        __m256 v = load8(vrows[j], c, bf);
        for (long gg = 0; gg < gn; gg++) a[gg] = _mm256_fmadd_ps(_mm256_broadcast_ss(pg + gg * CHUNK + j), v, a[gg]);
    }
    for (long gg = 0; gg < gn; gg++) _mm256_storeu_ps(accg + gg * evp, a[gg]);
}

static inline void prefetch_bytes(const char *p, long bytes) {
    for (long i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

// the arguments of moe_paged_decode_bf16, in elements of 2 (bf) or 4 bytes
AVX2 INLINE void paged_decode_avx2(const void *q, long qs, long qh, const void *q2, long q2s, long q2h, long e1,
                                   const void *kc, long ks, long kh, const void *vc, long vs, long vh,
                                   const int64_t *block_tables, long bt_stride, const int64_t *context_lens, void *out,
                                   long os, long oh, long S, long K, long G, long E, long Ev, long block_size,
                                   long window, float scale, const int bf) {
    const long size = bf ? 2 : 4;
    const char *kb = kc, *vb = vc, *qb = q, *q2b = q2;
    long evp = ((Ev + 7) / 8) * 8, ep = ((E + 7) / 8) * 8;
    float *acc = malloc((size_t)G * evp * sizeof(float));
    float *p = malloc((size_t)G * CHUNK * sizeof(float));
    float *m = malloc((size_t)G * sizeof(float)), *l = malloc((size_t)G * sizeof(float));
    float *qf = malloc((size_t)G * ep * sizeof(float));
    const void **vrows = malloc(CHUNK * sizeof(*vrows));
    long *slots = slot_buffer(context_lens, S);
    for (long s = 0; s < S; s++) {
        long n = context_lens[s];
        long start = sequence_slots(slots, block_tables + s * bt_stride, n, window, block_size);
        for (long k = 0; k < K; k++) {
            memset(acc, 0, (size_t)G * evp * sizeof(float));
            for (long g = 0; g < G; g++) {  // the queries widened once, zero past E
                const char *row = qb + (s * qs + (k * G + g) * qh) * size;
                const char *row2 = q2b ? q2b + (s * q2s + (k * G + g) * q2h) * size : NULL;
                for (long i = 0; i < ep; i++)
                    qf[g * ep + i] = i < e1 ? elem(row, i, bf) : i < E ? elem(row2, i - e1, bf) : 0.0f;
                m[g] = -INFINITY, l[g] = 0.0f;
            }
            for (long t0 = start; t0 < n; t0 += CHUNK) {
                long cn = n - t0 < CHUNK ? n - t0 : CHUNK;
                for (long j = 0; j < cn; j++) {
                    long t = t0 + j;
                    if (k == 0 && t + PREFETCH_TOKENS < n) {  // every kv head's rows, on the first head's pass
                        long ahead = slots[t + PREFETCH_TOKENS];
                        prefetch_bytes(kb + ahead * ks * size, ((K - 1) * kh + E) * size);
                        prefetch_bytes(vb + ahead * vs * size, ((K - 1) * vh + Ev) * size);
                    }
                    const char *kr = kb + (slots[t] * ks + k * kh) * size;
                    vrows[j] = vb + (slots[t] * vs + k * vh) * size;
                    for (long g0 = 0; g0 < G; g0 += GROUP) {
                        long gn = G - g0 < GROUP ? G - g0 : GROUP;
                        BY_GN(gn, score_row8, qf + g0 * ep, ep, kr, E, scale, p + g0 * CHUNK + j, bf);
                    }
                }
                for (long g = 0; g < G; g++) {  // online softmax (as the AVX-512 kernel's)
                    float *pg = p + g * CHUNK;
                    float mx = m[g];
                    for (long j = 0; j < cn; j++) mx = pg[j] > mx ? pg[j] : mx;
                    float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mx);
                    __m256 vsum = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
                    long j = 0;
                    for (; j + 8 <= cn; j += 8) {
                        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pg + j), vm));
                        vsum = _mm256_add_ps(vsum, e);
                        _mm256_storeu_ps(pg + j, e);
                    }
                    float sum = hsum8(vsum);
                    for (; j < cn; j++) sum += pg[j] = expf(pg[j] - mx);
                    m[g] = mx;
                    l[g] = l[g] * alpha + sum;
                    if (alpha != 1.0f) {
                        __m256 av = _mm256_set1_ps(alpha);
                        for (long c = 0; c < evp; c += 8)
                            _mm256_storeu_ps(acc + g * evp + c, _mm256_mul_ps(_mm256_loadu_ps(acc + g * evp + c), av));
                    }
                }
                long c = 0;
                for (; c + 8 <= Ev; c += 8)
                    for (long g0 = 0; g0 < G; g0 += GROUP) {
                        long gn = G - g0 < GROUP ? G - g0 : GROUP;
                        BY_GN(gn, sum_values8, acc + g0 * evp + c, evp, p + g0 * CHUNK, vrows, c, cn, bf);
                    }
                for (; c < Ev; c++)
                    for (long g = 0; g < G; g++)
                        for (long j = 0; j < cn; j++) acc[g * evp + c] += p[g * CHUNK + j] * elem(vrows[j], c, bf);
            }
            for (long g = 0; g < G; g++) {
                char *o = (char *)out + (s * os + (k * G + g) * oh) * size;
                float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
                for (long c = 0; c < Ev; c++) {
                    float v = acc[g * evp + c] * inv;
                    if (bf)
                        ((uint16_t *)o)[c] = to_bf16(v);
                    else
                        ((float *)o)[c] = v;
                }
            }
        }
    }
    free(slots);
    free(vrows);
    free(qf);
    free(l);
    free(m);
    free(p);
    free(acc);
}


AVX2 static void decode_sequences(const void *c, long b, long e) {  // sequences b .. e - 1
    const struct decode_job *j = c;
    const long size = j->bf ? 2 : 4;
    const void *q = j->q + b * j->qs * size, *q2 = j->q2 ? j->q2 + b * j->q2s * size : NULL;
    void *out = j->out + b * j->os * size;
    if (j->bf)
        paged_decode_avx2(q, j->qs, j->qh, q2, j->q2s, j->q2h, j->e1, j->kc, j->ks, j->kh, j->vc, j->vs, j->vh,
                          j->block_tables + b * j->bt_stride, j->bt_stride, j->context_lens + b, out, j->os, j->oh,
                          e - b, j->K, j->G, j->E, j->Ev, j->block_size, j->window, j->scale, 1);
    else
        paged_decode_avx2(q, j->qs, j->qh, q2, j->q2s, j->q2h, j->e1, j->kc, j->ks, j->kh, j->vc, j->vs, j->vh,
                          j->block_tables + b * j->bt_stride, j->bt_stride, j->context_lens + b, out, j->os, j->oh,
                          e - b, j->K, j->G, j->E, j->Ev, j->block_size, j->window, j->scale, 0);
}

// moe_paged_decode_bf16's arguments, then `bf`: 1 bfloat16 (as that kernel), 0 float32 (q, cache, out);
// the sequences shared with the helper threads where they run (a sequence per chunk)
AVX2 void moe_paged_decode_avx2(const void *q, long qs, long qh, const void *q2, long q2s, long q2h, long e1,
                                const void *kc, long ks, long kh, const void *vc, long vs, long vh,
                                const int64_t *block_tables, long bt_stride, const int64_t *context_lens, void *out,
                                long os, long oh, long S, long K, long G, long E, long Ev, long block_size,
                                long window, float scale, int bf) {
    const struct decode_job j = {q, q2, kc, vc, qs, qh, q2s, q2h, e1, ks, kh, vs, vh, block_tables, context_lens,
                                 bt_stride, out, os, oh, K, G, E, Ev, block_size, window, scale, bf};
    if (!pool) {
        decode_sequences(&j, 0, S);
        return;
    }
    pool(decode_sequences, &j, S, cache_bytes(context_lens, S, K, E, Ev, bf ? 2 : 4), 1);
}

int moe_paged_avx2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// MLA's decode step before attention (model.MLAttention.decode_in_place), N new tokens, bfloat16: the
// latent c = kv[n, :C] normed (w * round(c / rms(c)), as model.RMSNorm) and the rope key kv[n, C:]
// rotated (model.apply_rope) are written to cache row slots[n] ([C + R], rows cache_stride apart), and
// the rope part q[n, h, P:] of each head's query ([H, P + R] rows, contiguous) rotated in place; cos and
// sin [N, R/2]. Rounded as torch's bfloat16 ops round (each product, then the sum), so the cache
// and queries hold the bits the torch path writes (the gathered path and the dense forward, which the
// tests compare with, round so; a router's near-tie downstream turns any other rounding into a
// different expert). Torch's ops for this were ~15 small calls a layer (~0.12 ms at 32 tokens on one
// thread).
static inline float bf_to_f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf_round(float f) { return bf_to_f(to_bf16(f)); }

static void rotate(uint16_t *out, const float *x, const float *cs, const float *sn, long R, int interleaved) {
    for (long j = 0; j < R / 2; j++) {
        float a = interleaved ? x[2 * j] : x[j], b = interleaved ? x[2 * j + 1] : x[j + R / 2];
        out[j] = to_bf16(bf_round(a * cs[j]) - bf_round(b * sn[j]));
        out[j + R / 2] = to_bf16(bf_round(b * cs[j]) + bf_round(a * sn[j]));
    }
}

TARGET INLINE __m512 round_bf16x16(__m512 v) {  // v rounded to bfloat16 (nearest even), as float32
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

TARGET INLINE void store_bf16x16(uint16_t *p, __m512 v) {  // v already a bfloat16 value: its top halves
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

// rotate() for R a multiple of 32 up to 256, 16 pairs a step (x and out may be the same row: x is
// copied first, since an interleaved row's later pairs lie where the first results go)
TARGET INLINE void rotate16(uint16_t *out, const uint16_t *xin, const uint16_t *cos, const uint16_t *sin, long R,
                           int interleaved) {
    uint16_t x[256];
    memcpy(x, xin, (size_t)R * sizeof(uint16_t));
    for (long j = 0; j < R / 2; j += 16) {
        __m512 a, b;
        if (interleaved) {  // 16 pairs (x[2j], x[2j+1]) in one load: the even values low, the odd high
            __m512i v = _mm512_loadu_si512((const void *)(x + 2 * j));
            a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
        } else {
            a = load_bf16x16(x + j, 0xffff);
            b = load_bf16x16(x + R / 2 + j, 0xffff);
        }
        __m512 c = load_bf16x16(cos + j, 0xffff), s = load_bf16x16(sin + j, 0xffff);
        __m512 lo = round_bf16x16(_mm512_sub_ps(round_bf16x16(_mm512_mul_ps(a, c)), round_bf16x16(_mm512_mul_ps(b, s))));
        __m512 hi = round_bf16x16(_mm512_add_ps(round_bf16x16(_mm512_mul_ps(b, c)), round_bf16x16(_mm512_mul_ps(a, s))));
        store_bf16x16(out + j, lo);
        store_bf16x16(out + R / 2 + j, hi);
    }
}

TARGET static void mla_prepare_avx512(uint16_t *q, long H, long P, const uint16_t *kv, const uint16_t *cos,
                                      const uint16_t *sin, const uint16_t *norm_w, float eps, uint16_t *cache,
                                      long cache_stride, const int64_t *slots, long N, long C, long R,
                                      int interleaved) {
    for (long n = 0; n < N; n++) {
        const uint16_t *kr = kv + n * (C + R), *cn = cos + n * (R / 2), *sn = sin + n * (R / 2);
        uint16_t *row = cache + slots[n] * cache_stride;
        __m512 ss = _mm512_setzero_ps();
        for (long i = 0; i < C; i += 16) {
            __m512 v = load_bf16x16(kr + i, 0xffff);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 rv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)C + eps));
        for (long i = 0; i < C; i += 16) {
            __m512 v = round_bf16x16(_mm512_mul_ps(load_bf16x16(kr + i, 0xffff), rv));
            store_bf16x16(row + i, round_bf16x16(_mm512_mul_ps(load_bf16x16(norm_w + i, 0xffff), v)));
        }
        rotate16(row + C, kr + C, cn, sn, R, interleaved);
        for (long h = 0; h < H; h++) {
            uint16_t *qr = q + (n * H + h) * (P + R) + P;
            rotate16(qr, qr, cn, sn, R, interleaved);
        }
    }
}

void moe_mla_prepare_bf16(uint16_t *q, long H, long P, const uint16_t *kv, const uint16_t *cos, const uint16_t *sin,
                          const uint16_t *norm_w, float eps, uint16_t *cache, long cache_stride,
                          const int64_t *slots, long N, long C, long R, int interleaved) {
    if (C % 16 == 0 && R % 32 == 0 && R <= 256) {  // the usual shapes (DeepSeek: C 512, R 64): 16 values a step
        mla_prepare_avx512(q, H, P, kv, cos, sin, norm_w, eps, cache, cache_stride, slots, N, C, R, interleaved);
        return;
    }
    float *x = malloc((size_t)(C + 2 * R) * sizeof(float)), *cs = x + C, *sn = cs + R / 2, *src = sn + R / 2;
    for (long n = 0; n < N; n++) {
        const uint16_t *kr = kv + n * (C + R);
        uint16_t *row = cache + slots[n] * cache_stride;
        for (long j = 0; j < R / 2; j++) cs[j] = bf_to_f(cos[n * (R / 2) + j]), sn[j] = bf_to_f(sin[n * (R / 2) + j]);
        double ss = 0.0;
        for (long i = 0; i < C; i++) {
            x[i] = bf_to_f(kr[i]);
            ss += (double)x[i] * x[i];
        }
        float r = 1.0f / sqrtf((float)(ss / C) + eps);
        for (long i = 0; i < C; i++) row[i] = to_bf16(bf_to_f(norm_w[i]) * bf_to_f(to_bf16(x[i] * r)));
        for (long i = 0; i < R; i++) src[i] = bf_to_f(kr[C + i]);
        rotate(row + C, src, cs, sn, R, interleaved);
        for (long h = 0; h < H; h++) {
            uint16_t *qr = q + (n * H + h) * (P + R) + P;
            for (long i = 0; i < R; i++) src[i] = bf_to_f(qr[i]);
            rotate(qr, src, cs, sn, R, interleaved);
        }
    }
    free(x);
}

// moe_mla_prepare_bf16 for float32 (q, kv, cos, sin, the norm's weight and the cache): the latent's
// sum of squares in double (torch's float32 rms_norm is within an ulp of it), the weight applied
// after the normalization as model.RMSNorm does, and each rotated value as torch's float32 ops
// compute it (both products rounded, then their difference or sum: no FMA target here, so nothing
// is contracted), so the rope parts hold the torch path's bits. Any x86-64 CPU.
static void rotate_f32(float *out, const float *x, const float *cs, const float *sn, long R, int interleaved) {
    for (long j = 0; j < R / 2; j++) {
        float a = interleaved ? x[2 * j] : x[j], b = interleaved ? x[2 * j + 1] : x[j + R / 2];
        float ac = a * cs[j], bs = b * sn[j], bc = b * cs[j], as = a * sn[j];
        out[j] = ac - bs;
        out[j + R / 2] = bc + as;
    }
}

void moe_mla_prepare_f32(float *q, long H, long P, const float *kv, const float *cos, const float *sin,
                         const float *norm_w, float eps, float *cache, long cache_stride, const int64_t *slots,
                         long N, long C, long R, int interleaved) {
    float *src = malloc((size_t)R * sizeof(float));
    for (long n = 0; n < N; n++) {
        const float *kr = kv + n * (C + R), *cs = cos + n * (R / 2), *sn = sin + n * (R / 2);
        float *row = cache + slots[n] * cache_stride;
        double ss = 0.0;
        for (long i = 0; i < C; i++)
            ss += (double)kr[i] * kr[i];
        float r = 1.0f / sqrtf((float)(ss / C) + eps);
        for (long i = 0; i < C; i++)
            row[i] = norm_w[i] * (kr[i] * r);
        rotate_f32(row + C, kr + C, cs, sn, R, interleaved);
        for (long h = 0; h < H; h++) {
            float *qr = q + (n * H + h) * (P + R) + P;
            memcpy(src, qr, (size_t)R * sizeof(float));
            rotate_f32(qr, src, cs, sn, R, interleaved);
        }
    }
    free(src);
}

// Grouped-query attention's step before attention (model.Attention, bfloat16), N new tokens: each
// head's query q[n, h] ([H, D] rows, contiguous) rotated in place, and each kv head's key k[n, j]
// rotated into its key cache row and its value v[n, j] copied into its value cache row, at slot
// slots[n] (cache rows of [K, D], slots cache_stride apart). cos and sin [N, D / 2]. The rotation
// rounds as torch's bfloat16 ops round (model.apply_rope), so queries and cache hold the bits the
// torch path writes. Torch's ops for this are two rope calls (~10 small ops each) and two indexed
// writes a layer.
TARGET static void gqa_rotate_rows(uint16_t *out, const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                                   long D, int interleaved) {
    rotate16(out, x, cos, sin, D, interleaved);
}

void moe_gqa_prepare_bf16(uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos, const uint16_t *sin,
                          uint16_t *kc, uint16_t *vc, long cache_stride, const int64_t *slots, long N, long H, long K,
                          long D, int interleaved, long ldq, long ldk, long ldv) {
    /* ldq, ldk, ldv: elements from one token's row of q, k, v to the next (H D, K D, K D when each is
     * its own tensor; the fused projection's width when they are column ranges of one output) */
    int fast = D % 32 == 0 && D <= 256;  // 16 pairs a step (Mixtral, Qwen: D 128)
    float *src = fast ? NULL : malloc((size_t)(2 * D) * sizeof(float)), *cs = src ? src + D : NULL;
    float *sn = cs ? cs + D / 2 : NULL;
    for (long n = 0; n < N; n++) {
        const uint16_t *cn = cos + n * (D / 2), *sg = sin + n * (D / 2);
        uint16_t *krow = kc + slots[n] * cache_stride, *vrow = vc + slots[n] * cache_stride;
        if (!fast)
            for (long j = 0; j < D / 2; j++) cs[j] = bf_to_f(cn[j]), sn[j] = bf_to_f(sg[j]);
        for (long r = 0; r < H + K; r++) {  // the queries in place, then the keys into the cache
            const uint16_t *x = r < H ? q + n * ldq + r * D : k + n * ldk + (r - H) * D;
            uint16_t *out = r < H ? q + n * ldq + r * D : krow + (r - H) * D;
            if (fast) {
                gqa_rotate_rows(out, x, cn, sg, D, interleaved);
            } else {
                for (long i = 0; i < D; i++) src[i] = bf_to_f(x[i]);
                rotate(out, src, cs, sn, D, interleaved);
            }
        }
        memcpy(vrow, v + n * ldv, (size_t)(K * D) * sizeof(uint16_t));
    }
    free(src);
}

// moe_gqa_prepare_bf16 for float32 (q, k, v, cos, sin and the cache): the same rows, rotations and
// writes, each rotated as moe_mla_prepare_f32's rope part is (rotate_f32: torch's float32 bits).
// Any x86-64 CPU.
void moe_gqa_prepare_f32(float *q, const float *k, const float *v, const float *cos, const float *sin, float *kc,
                         float *vc, long cache_stride, const int64_t *slots, long N, long H, long K, long D,
                         int interleaved, long ldq, long ldk, long ldv) {
    float *x = malloc((size_t)D * sizeof(float));
    for (long n = 0; n < N; n++) {
        const float *c = cos + n * (D / 2), *s = sin + n * (D / 2);
        float *krow = kc + slots[n] * cache_stride, *vrow = vc + slots[n] * cache_stride;
        for (long r = 0; r < H + K; r++) {  // the queries in place, then the keys into the cache
            const float *in = r < H ? q + n * ldq + r * D : k + n * ldk + (r - H) * D;
            float *out = r < H ? q + n * ldq + r * D : krow + (r - H) * D;
            memcpy(x, in, (size_t)D * sizeof(float));
            rotate_f32(out, x, c, s, D, interleaved);
        }
        memcpy(vrow, v + n * ldv, (size_t)(K * D) * sizeof(float));
    }
    free(x);
}
