/* Batch-1 decode on the CPU (AVX2 + FMA, float32, one thread): model_runtime/cpu_decode.py.
 *
 * moe_gemv_f32:          y[o] = sum_i W[o, i] * x[i]   for o < out, i < in
 * moe_swiglu_f32:        y (+)= scale * down @ (silu(gate @ x) * (up @ x)), one expert or MLP
 * moe_rmsnorm_f32:       y = w * x / sqrt(mean(x^2) + eps)
 * moe_mla_attention_f32: a whole MLA attention layer for one new token (model.MLAttention)
 * moe_moe_decode_f32:    a whole MoE layer for one token (model.MoE)
 *
 * Every W is row-major with contiguous rows ([out, in], row stride `in`). A decode step reads
 * every weight once, so its speed is the speed at which one core streams weights from memory.
 * The rows are taken one at a time, front to back, so the whole matrix is a single sequential
 * stream that the hardware prefetcher follows; eight independent accumulators keep enough loads
 * in flight. Taking several rows at once (what BLAS gemv does) makes several streams and reads at
 * about half the speed on the machines this was measured on. See model_runtime/cpu_decode.py.
 */
#include <immintrin.h>
#include <math.h>

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

static float dot(const float *w, const float *x, long in) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    long i = 0;
    for (; i + 64 <= in; i += 64) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 32), _mm256_loadu_ps(x + i + 32), a4);
        a5 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 40), _mm256_loadu_ps(x + i + 40), a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 48), _mm256_loadu_ps(x + i + 48), a6);
        a7 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 56), _mm256_loadu_ps(x + i + 56), a7);
    }
    for (; i + 8 <= in; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                       _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    float s = hsum256(a0);
    for (; i < in; i++)
        s += w[i] * x[i];
    return s;
}

void moe_gemv_f32(const float *W, const float *x, float *y, long out, long in) {
    for (long o = 0; o < out; o++)
        y[o] = dot(W + o * in, x, in);
}

void moe_swiglu_f32(const float *gate, const float *up, const float *down, const float *x, float *y,
                    float *h, float scale, int accumulate, long D, long I) {
    /* gate, up [I, D] and down [D, I] row-major; h [I] scratch. Each matrix is read front to back. */
    for (long i = 0; i < I; i++)
        h[i] = dot(gate + i * D, x, D);
    for (long i = 0; i < I; i++) {
        float g = h[i];
        h[i] = g / (1.0f + expf(-g)) * dot(up + i * D, x, D);
    }
    for (long o = 0; o < D; o++) {
        float v = scale * dot(down + o * I, h, I);
        y[o] = accumulate ? y[o] + v : v;
    }
}

void moe_rmsnorm_f32(const float *x, const float *w, float *y, float eps, long D) {
    double ss = 0.0;
    for (long i = 0; i < D; i++)
        ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / D) + eps);
    for (long i = 0; i < D; i++)
        y[i] = w[i] * (x[i] * r);
}

static void axpy(float *y, float a, const float *x, long n) {
    /* y += a * x */
    __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += a * x[i];
}

static void rope(float *out, const float *x, const float *cos, const float *sin, long R, int interleaved) {
    /* model.apply_rope for one head: pairs (x0, x1), (x2, x3)... when interleaved, else
     * (x_j, x_{j+R/2}); the result is laid out half-split either way. */
    for (long j = 0; j < R / 2; j++) {
        float a = interleaved ? x[2 * j] : x[j], b = interleaved ? x[2 * j + 1] : x[j + R / 2];
        out[j] = a * cos[j] - b * sin[j];
        out[j + R / 2] = b * cos[j] + a * sin[j];
    }
}

static void mla_decode(const float *q, const float *c, const float *k_rope, const float *cos,
                        const float *sin, const float *w_kv, float *cache, const long *slots, float *out,
                        float *scratch, int interleaved, long slot, float scale, long L, long H, long P,
                        long R, long C, long Dv) {
    /* Multi-head latent attention of one new token, as model.MLAttention computes it with kv_b_proj
     * absorbed (that code serves any batch; this is its batch-1 decode step in one call):
     *   q [H, P + R] (no-rope, then rope part), c [C] (normed latent), k_rope [R], cos/sin [R/2]:
     *   the new token's; w_kv [H, P + Dv, C]: per head, P rows mapping the latent to keys, then Dv
     *   rows to values; cache [slots, C + R] rows (latent, roped key); slot: the row this token
     *   writes; slots [L]: its context's rows in order, itself last; out [H, Dv];
     *   scratch [2C + L + R].
     * The new row is written first: cache[slot] = (c, rope(k_rope)). Per head: q_latent =
     * q_nope @ W_uk [C]; s_l = scale (q_latent . c_l + rope(q_rope) . k_l); p = softmax(s);
     * o_latent = sum_l p_l c_l [C]; out = W_uv @ o_latent [Dv]. No mask: one new token sees its
     * whole context (MLA models use no sliding window). */
    float *row = cache + slot * (C + R);
    for (long i = 0; i < C; i++)
        row[i] = c[i];
    rope(row + C, k_rope, cos, sin, R, interleaved);
    float *ql = scratch, *ol = scratch + C, *qr = scratch + 2 * C, *s = scratch + 2 * C + R;
    for (long h = 0; h < H; h++) {
        const float *qh = q + h * (P + R), *wk = w_kv + h * (P + Dv) * C, *wv = wk + P * C;
        rope(qr, qh + P, cos, sin, R, interleaved);
        for (long i = 0; i < C; i++)
            ql[i] = 0.0f;
        for (long p = 0; p < P; p++)
            axpy(ql, qh[p], wk + p * C, C);
        float m = -INFINITY;
        for (long l = 0; l < L; l++) {
            const float *cl = cache + slots[l] * (C + R);
            s[l] = scale * (dot(cl, ql, C) + dot(cl + C, qr, R));
            if (s[l] > m)
                m = s[l];
        }
        float total = 0.0f;
        for (long l = 0; l < L; l++) {
            s[l] = expf(s[l] - m);
            total += s[l];
        }
        for (long i = 0; i < C; i++)
            ol[i] = 0.0f;
        for (long l = 0; l < L; l++)
            axpy(ol, s[l] / total, cache + slots[l] * (C + R), C);
        for (long d = 0; d < Dv; d++)
            out[h * Dv + d] = dot(wv + d * C, ol, C);
    }
}

void moe_mla_attention_f32(const float *x, const float *q_a, const float *q_a_norm, const float *q_b,
                           const float *kv_a, const float *kv_a_norm, const float *w_kv, const float *o_proj,
                           const float *cos, const float *sin, float *cache, const long *slots, float *y,
                           float *scratch, int interleaved, long slot, float scale, long L, long D, long Q,
                           long H, long P, long R, long C, long Dv) {
    /* model.MLAttention.forward for one new token with the paged cache (no biases): x [D] (normed
     * hidden state) -> y [D]. q_a [Q, D] and q_a_norm [Q] with q_b [H (P + R), Q], or q_a NULL and
     * q_b the full q_proj [H (P + R), D]; kv_a [C + R, D], kv_a_norm [C]; w_kv [H, P + Dv, C];
     * o_proj [D, H Dv]; the rest as in mla_decode. scratch [Q + H (P + R) + 3C + 2R + H Dv + L].
     * Norm epsilon 1e-6 (model.MLAttention's). */
    float *qa = scratch, *q = qa + Q, *kv = q + H * (P + R), *att = kv + C + R, *rest = att + H * Dv;
    const float *q_in = x;
    if (q_a) {
        moe_gemv_f32(q_a, x, qa, Q, D);
        moe_rmsnorm_f32(qa, q_a_norm, qa, 1e-6f, Q);
        q_in = qa;
    }
    moe_gemv_f32(q_b, q_in, q, H * (P + R), q_a ? Q : D);
    moe_gemv_f32(kv_a, x, kv, C + R, D);
    moe_rmsnorm_f32(kv, kv_a_norm, kv, 1e-6f, C);
    mla_decode(q, kv, kv + C, cos, sin, w_kv, cache, slots, att, rest, interleaved, slot, scale, L, H, P, R,
               C, Dv);
    moe_gemv_f32(o_proj, att, y, D, H * Dv);
}

void moe_experts_swiglu_f32(const float *gate_up, const float *down, const float *x, const long *ids,
                            const float *weights, float *y, float *h, long A, long D, long I) {
    /* y = sum_a weights[a] * expert ids[a](x): gate_up [E, 2I, D] (gate rows, then up rows) and
     * down [E, D, I]; one token's A chosen experts, each read once, front to back. */
    for (long a = 0; a < A; a++) {
        const float *gu = gate_up + ids[a] * 2 * I * D;
        moe_swiglu_f32(gu, gu + I * D, down + ids[a] * D * I, x, y, h, weights[a], a > 0, D, I);
    }
}

enum { ROUTE_GREEDY = 0, ROUTE_GROUP_LIMITED_GREEDY = 1, ROUTE_NOAUX_TC = 2 };

static long argmax_unpicked(const float *v, const char *picked, long n) {
    /* the largest v[i] not yet picked, the lowest index on ties (-1 if none) */
    long best = -1;
    for (long i = 0; i < n; i++)
        if (!picked[i] && (best < 0 || v[i] > v[best]))
            best = i;
    return best;
}

void moe_moe_decode_f32(const float *x, const float *router, const float *bias, const float *gate_up,
                        const float *down, const float *shared_gate, const float *shared_up,
                        const float *shared_down, const float *shared_scale, long *tokens_per_expert,
                        float *y, float *scratch, int sigmoid_scores, int method, int norm_topk,
                        float scaling, long D, long E, long A, long G, long topk_group, long I, long Is) {
    /* model.MoE for one token (router, A routed experts, shared experts), the batch-1 decode step
     * in one call; the torch code in model.py is the reference and serves any batch.
     *   router [E, D]; bias [E] or NULL (noaux_tc's e_score_correction_bias); experts gate_up
     *   [E, 2I, D], down [E, D, I]; shared expert gate/up [Is, D], down [D, Is] or NULL; shared_scale
     *   [D] or NULL (Qwen2-MoE's sigmoid gate row); tokens_per_expert [E] counts the choice;
     *   y [D]; scratch [max(I, Is) + 2E + G + E bytes].
     * Routing: scores = softmax(logits) or sigmoid(logits); choice = scores (+ bias); with groups,
     * only the topk_group best groups (group max, or noaux_tc's sum of its top two) stay
     * eligible; the A best choices win; weights = their scores, renormalised if norm_topk, times
     * scaling. Ties go to the lower index (torch.topk leaves them unspecified). */
    long Ih = I > Is ? I : Is;
    float *h = scratch, *scores = scratch + Ih, *choice = scores + E, *group = choice + E;
    char *picked = (char *)(group + G);
    float m = -INFINITY;
    for (long e = 0; e < E; e++) {
        scores[e] = dot(router + e * D, x, D);
        if (scores[e] > m)
            m = scores[e];
    }
    if (sigmoid_scores) {
        for (long e = 0; e < E; e++)
            scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    } else {
        float total = 0.0f;
        for (long e = 0; e < E; e++)
            total += (scores[e] = expf(scores[e] - m));
        for (long e = 0; e < E; e++)
            scores[e] /= total;
    }
    for (long e = 0; e < E; e++)
        choice[e] = bias ? scores[e] + bias[e] : scores[e];
    if (method != ROUTE_GREEDY && G > 1) {
        long per = E / G;
        for (long g = 0; g < G; g++) {
            float first = -INFINITY, second = -INFINITY;
            for (long e = g * per; e < (g + 1) * per; e++) {
                if (choice[e] > first) {
                    second = first;
                    first = choice[e];
                } else if (choice[e] > second) {
                    second = choice[e];
                }
            }
            group[g] = method == ROUTE_NOAUX_TC ? first + second : first;
        }
        for (long g = 0; g < G; g++)
            picked[g] = 0;
        for (long k = 0; k < topk_group; k++)
            picked[argmax_unpicked(group, picked, G)] = 1;
        float fill = method == ROUTE_NOAUX_TC ? -INFINITY : 0.0f;
        for (long e = 0; e < E; e++)
            if (!picked[e / per])
                choice[e] = fill;
    }
    long ids[64];
    float weights[64], total = 0.0f;
    for (long e = 0; e < E; e++)
        picked[e] = 0;
    for (long a = 0; a < A; a++) {
        ids[a] = argmax_unpicked(choice, picked, E);
        picked[ids[a]] = 1;
        weights[a] = scores[ids[a]];
        total += weights[a];
        tokens_per_expert[ids[a]] += 1;
    }
    for (long a = 0; a < A; a++)
        weights[a] = (norm_topk ? weights[a] / (total + (sigmoid_scores ? 1e-20f : 0.0f)) : weights[a]) * scaling;
    moe_experts_swiglu_f32(gate_up, down, x, ids, weights, y, h, A, D, I);
    if (shared_gate) {
        float s = 1.0f;
        if (shared_scale)
            s = 1.0f / (1.0f + expf(-dot(shared_scale, x, D)));
        moe_swiglu_f32(shared_gate, shared_up, shared_down, x, y, h, s, 1, D, Is);
    }
}

/* moe_fp8_dequant: an FP8 (e4m3fn) block-quantized weight to float32 (out_bf16 = 0) or bfloat16
 * (round to nearest even), out[r, c] = e4m3(w[r, c]) * scale[r / b0, c / b1] (kernels/fp8.py).
 * torch converts float8 element by element on the CPU at ~150 M/s; a table of the 256 values
 * and one multiply per element is several times faster, and gives the same bits. */
static float fp8_table[256];
static int fp8_table_ready;

static void fp8_table_init(void) {
    for (int i = 0; i < 256; i++) {
        int sign = i >> 7, exp = (i >> 3) & 15, man = i & 7;
        float v;
        if (exp == 15 && man == 7)
            v = NAN;
        else if (exp == 0)
            v = ldexpf((float)man / 8.0f, -6);
        else
            v = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
        fp8_table[i] = sign ? -v : v;
    }
    fp8_table_ready = 1;  /* a race between two first callers writes the same values */
}

void moe_fp8_dequant(const unsigned char *w, const float *scale, void *out, long rows, long cols, long b0,
                     long b1, long scale_cols, int out_bf16) {
    if (!fp8_table_ready)
        fp8_table_init();
    for (long r = 0; r < rows; r++) {
        const unsigned char *wr = w + r * cols;
        const float *s = scale + (r / b0) * scale_cols;
        for (long c0 = 0; c0 < cols; c0 += b1) {
            long c1 = c0 + b1 < cols ? c0 + b1 : cols;
            float sc = s[c0 / b1];
            if (out_bf16) {
                unsigned short *o = (unsigned short *)out + r * cols;
                for (long c = c0; c < c1; c++) {
                    float f = fp8_table[wr[c]] * sc;
                    unsigned int bits;
                    __builtin_memcpy(&bits, &f, 4);
                    if ((bits & 0x7fffffffu) > 0x7f800000u)
                        o[c] = (unsigned short)((bits >> 16) | 0x40);  /* NaN stays NaN */
                    else
                        o[c] = (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
                }
            } else {
                float *o = (float *)out + r * cols;
                for (long c = c0; c < c1; c++)
                    o[c] = fp8_table[wr[c]] * sc;
            }
        }
    }
}
