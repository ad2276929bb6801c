/* Batch-1 decode on the CPU (the caller's thread, with helper threads on large matrices: decision 36; fp32
 * accumulation): model_runtime/kernels/cpu_decode.py.
 *
 * moe_gemv:          y[o] = sum_i W[o, i] * x[i]   for o < out, i < in
 * moe_swiglu:        y = down @ (silu(gate @ x) * (up @ x)), a dense MLP or a shared expert
 * moe_rmsnorm:       y = w * x / sqrt(mean(x^2) + eps)
 * moe_mla_attention: a whole MLA attention layer for one new token (model.MLAttention)
 * moe_moe_decode:    a whole MoE layer for one token (model.MoE)
 * moe_experts_bf16:  the routed experts of a MoE layer for a few tokens (a decode step of several
 *                    sequences), bfloat16, AVX-512F only
 * moe_experts_f32:   the same in float32, AVX2 + FMA
 * moe_linear_f32:    a linear of a few float32 rows, AVX2 + FMA (moe_linear_f32_bf16w: its weight
 *                    bfloat16)
 * moe_amx_linear:    a linear of a few bfloat16 rows on AMX tiles (decision 32)
 * moe_amx_experts:   the routed experts of a MoE layer for any number of tokens on AMX tiles
 * moe_dpbf16_experts: the same by AVX512-BF16 dot products, on CPUs without AMX (decision 40)
 * moe_dpbf16_linear: moe_amx_linear by AVX512-BF16 dot products
 *
 * Each takes `bf`: 0 when the weights, the cache and the layer's input and output are float32, 1 when
 * they are bfloat16. Either way the arithmetic is float32: bfloat16 values are widened as they are
 * read (a bfloat16 is the top half of a float32: a 16-bit shift) and results rounded to nearest even
 * when stored. Vectors the caller makes for the kernel (the router's bias, slots) are float32 / int64.
 *
 * Every W is row-major with contiguous rows ([out, in], row stride `in`), except the routed experts
 * of moe_moe_decode with `experts_t` (each expert's matrix stored transposed, as the engine keeps
 * bfloat16 experts for torch's grouped GEMM). A decode step reads every weight once, so its speed is
 * the speed at which one core streams weights from memory. The rows are taken one at a time, front
 * to back, so the whole matrix is a single sequential stream that the hardware prefetcher follows;
 * eight independent accumulators keep enough loads in flight. Taking several rows at once (what
 * BLAS gemv does) makes several streams and reads at about half the speed on the machines this was
 * measured on. A transposed matrix is read the same way, a row at a time, each row scaled into an
 * accumulator of its `out` outputs (axpy). See model_runtime/kernels/cpu_decode.py.
 *
 * The file is compiled for AVX2 + FMA; the bfloat16 loops also have an AVX-512F version, chosen at
 * load time when the CPU has it (__builtin_cpu_supports), so one build runs on both.
 */
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "simd_exp.h"

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {
    /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (bf16)((bits >> 16) | 0x40);
    return (bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* element i of a float32 (bf = 0) or bfloat16 (bf = 1) array, and the address of row r of n */
static inline float get(const void *p, long i, int bf) {
    return bf ? bf2f(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline const void *row(const void *p, long r, long n, int bf) {
    return (const char *)p + r * n * (bf ? 2 : 4);
}

static void load(float *dst, const void *src, long n, int bf) {
    for (long i = 0; i < n; i++)
        dst[i] = get(src, i, bf);
}

static void store(void *dst, const float *src, long n, int bf) {
    if (bf) {
        for (long i = 0; i < n; i++)
            ((bf16 *)dst)[i] = f2bf(src[i]);
    } else {
        for (long i = 0; i < n; i++)
            ((float *)dst)[i] = src[i];
    }
}

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

static float dot_f32(const float *w, const float *x, long in) {
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

static void axpy_f32(float *y, float a, const float *x, long n) {
    /* y += a * x */
    __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += a * x[i];
}

/* bfloat16 weights, AVX2: 8 values widened per load. The loops ask for the lines 4 KiB ahead
 * (PREFETCH values): the widening leaves fewer loads in flight than the float32 loop, and the
 * prefetch takes a bfloat16 gemv on this project's machine from 26 to 29 GB/s (best of 60, 8192 x
 * 4096). Past a row's end is the next row; past the matrix's end a prefetch is harmless. */
#define PREFETCH 2048
#define PREFETCH_LINE(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
static inline __m256 widen8(const bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static float dot_bf16_avx2(const bf16 *w, const float *x, long in) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    long i = 0;
    for (; i + 64 <= in; i += 64) {
        PREFETCH_LINE(w + i + PREFETCH);
        PREFETCH_LINE(w + i + PREFETCH + 32);
        a0 = _mm256_fmadd_ps(widen8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(widen8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(widen8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(widen8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
        a4 = _mm256_fmadd_ps(widen8(w + i + 32), _mm256_loadu_ps(x + i + 32), a4);
        a5 = _mm256_fmadd_ps(widen8(w + i + 40), _mm256_loadu_ps(x + i + 40), a5);
        a6 = _mm256_fmadd_ps(widen8(w + i + 48), _mm256_loadu_ps(x + i + 48), a6);
        a7 = _mm256_fmadd_ps(widen8(w + i + 56), _mm256_loadu_ps(x + i + 56), a7);
    }
    for (; i + 8 <= in; i += 8)
        a0 = _mm256_fmadd_ps(widen8(w + i), _mm256_loadu_ps(x + i), a0);
    a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                       _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    float s = hsum256(a0);
    for (; i < in; i++)
        s += bf2f(w[i]) * x[i];
    return s;
}

static void axpy_bf16_avx2(float *y, float a, const bf16 *x, long n) {
    __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        if (!(i & 31))
            PREFETCH_LINE(x + i + PREFETCH);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, widen8(x + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++)
        y[i] += a * bf2f(x[i]);
}

/* bfloat16 weights, AVX-512F: 16 values widened per load */
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline __m512 widen16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

AVX512 static float dot_bf16_avx512(const bf16 *w, const float *x, long in) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    long i = 0;
    for (; i + 128 <= in; i += 128) {
        PREFETCH_LINE(w + i + PREFETCH);
        PREFETCH_LINE(w + i + PREFETCH + 32);
        PREFETCH_LINE(w + i + PREFETCH + 64);
        PREFETCH_LINE(w + i + PREFETCH + 96);
        a0 = _mm512_fmadd_ps(widen16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(widen16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(widen16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(widen16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
        a4 = _mm512_fmadd_ps(widen16(w + i + 64), _mm512_loadu_ps(x + i + 64), a4);
        a5 = _mm512_fmadd_ps(widen16(w + i + 80), _mm512_loadu_ps(x + i + 80), a5);
        a6 = _mm512_fmadd_ps(widen16(w + i + 96), _mm512_loadu_ps(x + i + 96), a6);
        a7 = _mm512_fmadd_ps(widen16(w + i + 112), _mm512_loadu_ps(x + i + 112), a7);
    }
    for (; i + 16 <= in; i += 16)
        a0 = _mm512_fmadd_ps(widen16(w + i), _mm512_loadu_ps(x + i), a0);
    a0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                       _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    float s = _mm512_reduce_add_ps(a0);
    for (; i < in; i++)
        s += bf2f(w[i]) * x[i];
    return s;
}

AVX512 static void axpy_bf16_avx512(float *y, float a, const bf16 *x, long n) {
    __m512 av = _mm512_set1_ps(a);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        if (!(i & 31))
            PREFETCH_LINE(x + i + PREFETCH);
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, widen16(x + i), _mm512_loadu_ps(y + i)));
    }
    for (; i < n; i++)
        y[i] += a * bf2f(x[i]);
}

/* One row's dot products as bfloat16 pairs (vdpbf16ps), on CPUs with AVX512-BF16 and no AMX
 * (moe_pairs_select; decision 41): where the row's x is bfloat16 too (a bfloat16 model's), each
 * instruction multiplies 32 weights as they are stored, where widen16 + FMA takes 16 and three
 * instructions. The one-row kernels were bound by those instructions, not by memory: a 256 MB
 * gemv read 12 GB/s on one Zen 4 core and 23 on two, 22 and 43 as pairs. x's float32 rows are
 * rounded to bfloat16 first (pairs_x): exact for a layer's input, and for an intermediate (a
 * SwiGLU's hidden row, MLA's normed latent) the rounding torch's bfloat16 layers make too. */
#define PAIRS __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static int pairs_on; /* moe_pairs_select */

PAIRS static float dot_pairs(const bf16 *w, const bf16 *x, long in) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long i = 0;
    for (; i + 128 <= in; i += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + i + 64), (__m512bh)_mm512_loadu_si512(x + i + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + i + 96), (__m512bh)_mm512_loadu_si512(x + i + 96));
    }
    for (; i + 32 <= in; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < in; i++)
        s += bf2f(w[i]) * bf2f(x[i]);
    return s;
}

static __thread bf16 *pairs_buf[2];
static __thread long pairs_cap[2];

static const bf16 *pairs_x(const float *x, long n, int bf, int wbf, int slot) {
    /* x [n] rounded to bfloat16 in this thread's buffer `slot` for dot_pairs, where the pairs run
     * (pairs_on), the activations are bfloat16 (bf) and so are the weights (wbf); else NULL (the
     * float32 row and dot(), as a float32 model's, or when there is no memory) */
    if (!pairs_on || !bf || !wbf)
        return NULL;
    if (pairs_cap[slot] < n) {
        bf16 *grown = realloc(pairs_buf[slot], n * sizeof(bf16));
        if (!grown)
            return NULL;
        pairs_buf[slot] = grown;
        pairs_cap[slot] = n;
    }
    for (long i = 0; i < n; i++)
        pairs_buf[slot][i] = f2bf(x[i]);
    return pairs_buf[slot];
}

int moe_pairs_select(int on) {
    /* the one-row kernels' dot products as bfloat16 pairs where asked for (on = 1) and the CPU has
     * AVX512-BF16; returns whether they are */
    __builtin_cpu_init();
    pairs_on = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
    return pairs_on;
}

static float (*dot_bf16)(const bf16 *, const float *, long) = dot_bf16_avx2;
static void (*axpy_bf16)(float *, float, const bf16 *, long) = axpy_bf16_avx2;
static int avx512_rows; /* moe_rmsnorm_rows' bfloat16 rows as AVX-512 (moe_simd_select) */

int moe_simd_select(int avx512) {
    /* the bfloat16 loops as AVX-512 when asked for (avx512 = 1) and the CPU has it, else AVX2;
     * returns which (1: AVX-512). Loading picks AVX-512 where it can; the tests call it to check
     * both. */
    __builtin_cpu_init();
    int use = avx512 && __builtin_cpu_supports("avx512f");
    dot_bf16 = use ? dot_bf16_avx512 : dot_bf16_avx2;
    axpy_bf16 = use ? axpy_bf16_avx512 : axpy_bf16_avx2;
    avx512_rows = use;
    return use;
}

__attribute__((constructor)) static void choose_simd(void) {
    moe_simd_select(1);
}

static inline float dot(const void *w, const float *x, long in, int bf) {
    return bf ? dot_bf16((const bf16 *)w, x, in) : dot_f32((const float *)w, x, in);
}

static inline void axpy(float *y, float a, const void *x, long n, int bf) {
    if (bf)
        axpy_bf16(y, a, (const bf16 *)x, n);
    else
        axpy_f32(y, a, (const float *)x, n);
}

/* ---- helper threads for the kernels (decisions 36, 37) -----------------------------------------
 * A one-token step reads every weight once and one core reads ~20 GB/s here, two ~31; a step of
 * 32 sequences computes on every weight it reads. With moe_helpers_start(n), n threads (the cores
 * the engine leaves to the event loop, idle much of the time) share the rows of each large matrix
 * the kernels read: the one-row kernels below, moe_linear_f32's weight rows and moe_experts_f32's
 * experts. A job is a range
 * of rows cut into chunks that the caller and the helpers claim from one counter, so a helper that
 * is not running (its core busy with something else) costs nothing beyond the chunk it holds: the
 * caller takes the rest. Every output element is computed by one thread exactly as without
 * helpers (same order of sums), so the results are the same bits. Jobs under JOB_MIN_BYTES (a
 * small model's) are the caller's alone. The helpers spin HELPER_SPIN_NS after a job that came
 * soon after the one before (the next one follows within microseconds during a large model's
 * step), then sleep on a futex. */
typedef void (*job_fn)(const void *ctx, long begin, long end);
#define HELPER_SPIN_NS 200000L
#define HELPERS_MAX 8
#define JOB_MIN_BYTES (1L << 20) /* matrices below this are read by the caller alone */

static struct {
    /* what the helpers spin on, on a cache line of its own */
    unsigned gen __attribute__((aligned(64))); /* futex word: bumped for each job (and to stop) */
    int sleeping;                              /* helpers asleep on gen */
    int stop;
    job_fn fn __attribute__((aligned(64))); /* the job: fn(ctx, rows) over [0, rows), chunks of `chunk` */
    const void *ctx;
    long rows, chunk;
    unsigned long claim __attribute__((aligned(64))); /* (job id << 32) | next row to claim */
    unsigned long done __attribute__((aligned(64)));  /* (job id << 32) | rows finished */
    int n __attribute__((aligned(64)));               /* helpers running */
    pthread_t threads[HELPERS_MAX];
} pool;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static unsigned long helper_rows; /* rows the helpers computed (moe_helpers_rows) */

static int run_chunks(unsigned id, int helper) {
    /* claims and runs chunks of job `id` until none is left; returns whether it ran any */
    int ran = 0;
    for (;;) {
        unsigned long c = __atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE);
        if ((unsigned)(c >> 32) != id)
            return ran;
        job_fn fn = __atomic_load_n(&pool.fn, __ATOMIC_ACQUIRE);
        const void *ctx = __atomic_load_n(&pool.ctx, __ATOMIC_ACQUIRE);
        long rows = __atomic_load_n(&pool.rows, __ATOMIC_ACQUIRE), chunk = __atomic_load_n(&pool.chunk, __ATOMIC_ACQUIRE);
        long b = (long)(c & 0xffffffffUL);
        if (b >= rows)
            return ran;
        long e = b + chunk < rows ? b + chunk : rows;
        /* the claim fails when another thread took this chunk or a new job began (then fn, ctx and
         * rows read above may be the new job's, and are not used) */
        if (!__atomic_compare_exchange_n(&pool.claim, &c, ((unsigned long)id << 32) | (unsigned long)e, 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        fn(ctx, b, e);
        if (helper)
            __atomic_fetch_add(&helper_rows, (unsigned long)(e - b), __ATOMIC_RELAXED);
        __atomic_fetch_add(&pool.done, (unsigned long)(e - b), __ATOMIC_RELEASE);
        ran = 1;
    }
}

static void *helper_main(void *arg) {
    unsigned seen = (unsigned)(uintptr_t)arg; /* gen when it was created: a stop may come before it runs */
    long last = 0, gap = HELPER_SPIN_NS; /* when the last job ended, and the idle gap before it */
    for (;;) {
        /* spin only while jobs come close together (a large model's step); a job that came long
         * after the one before (a small model's output head, once a step) is followed by sleep, so
         * the core goes back to whatever else needs it (the server's event loop) at once */
        long until = now_ns() + (gap < HELPER_SPIN_NS ? HELPER_SPIN_NS : 0);
        unsigned g;
        for (int k = 0;; k++) {
            g = __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE);
            if (g != seen || (!(k & 63) && now_ns() > until))
                break;
            _mm_pause();
        }
        if (g == seen) { /* idle: sleep until the next job */
            __atomic_fetch_add(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
            syscall(SYS_futex, &pool.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            __atomic_fetch_sub(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        seen = g;
        if (__atomic_load_n(&pool.stop, __ATOMIC_ACQUIRE))
            return NULL;
        gap = now_ns() - last;
        run_chunks((unsigned)(__atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE) >> 32), 1);
        last = now_ns();
    }
}

static void bump_gen(void) {
    __atomic_fetch_add(&pool.gen, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleeping, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &pool.gen, FUTEX_WAKE_PRIVATE, HELPERS_MAX, NULL, NULL, 0);
}

void moe_helpers_stop(void) {
    if (!pool.n)
        return;
    __atomic_store_n(&pool.stop, 1, __ATOMIC_RELEASE);
    bump_gen();
    for (int i = 0; i < pool.n; i++)
        pthread_join(pool.threads[i], NULL);
    pool.n = 0;
    __atomic_store_n(&pool.stop, 0, __ATOMIC_RELEASE);
}

long moe_helpers_rows(void) {
    /* how many rows (or experts) of the jobs so far the helpers computed */
    return (long)__atomic_load_n(&helper_rows, __ATOMIC_RELAXED);
}

int moe_helpers_start(int n) {
    /* n helper threads from now on (0: none); returns how many run. Not to be called while a
     * kernel runs. */
    moe_helpers_stop();
    n = n < 0 ? 0 : n > HELPERS_MAX ? HELPERS_MAX : n;
    for (int i = 0; i < n; i++) {
        void *gen = (void *)(uintptr_t)__atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE);
        if (pthread_create(&pool.threads[i], NULL, helper_main, gen) != 0)
            break;
        pool.n = i + 1;
    }
    return pool.n;
}

static long row_chunk(long rows, long row_bytes) {
    /* a job's chunk of rows: ~64 KB, at least 4 per thread, a multiple of 16 */
    long chunk = 65536 / (row_bytes > 0 ? row_bytes : 1), most = rows / (4 * (pool.n + 1));
    chunk = chunk > most ? most : chunk;
    return chunk < 16 ? 16 : (chunk + 15) / 16 * 16;
}

static void parallel_rows(job_fn fn, const void *ctx, long rows, long bytes, long chunk) {
    /* fn(ctx, b, e) over [0, rows) in chunks of `chunk`, shared with the helpers when the job
     * reads `bytes` >= JOB_MIN_BYTES */
    static int busy; /* one caller at a time (the engine's thread); another runs its job alone */
    if (!pool.n || rows < 2 || bytes < JOB_MIN_BYTES || __atomic_exchange_n(&busy, 1, __ATOMIC_ACQUIRE)) {
        fn(ctx, 0, rows);
        return;
    }
    static unsigned id;
    id = id + 1 ? id + 1 : 1;
    __atomic_store_n(&pool.fn, fn, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.ctx, ctx, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.rows, rows, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.chunk, chunk, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.done, (unsigned long)id << 32, __ATOMIC_RELEASE);
    __atomic_store_n(&pool.claim, (unsigned long)id << 32, __ATOMIC_RELEASE);
    bump_gen();
    run_chunks(id, 0);
    while ((long)(__atomic_load_n(&pool.done, __ATOMIC_ACQUIRE) & 0xffffffffUL) < rows)
        _mm_pause(); /* a helper finishing the chunk it holds */
    __atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}

void moe_parallel_rows(job_fn fn, const void *ctx, long rows, long bytes, long chunk) {
    /* parallel_rows for the other kernels' library (paged_attention.c: moe_paged_use_pool) */
    parallel_rows(fn, ctx, rows, bytes, chunk);
}

/* the jobs: a gemv's rows; the gate / up rows of a SwiGLU and its down rows; a transposed matrix's
 * columns */
struct rows_job {
    const void *W;
    const float *x;
    float *y;
    long in;
    int bf;
    const void *up;  /* swiglu's gate/up job: the up rows */
    float scale;     /* swiglu's down job: y += scale * ... */
    const bf16 *xb;  /* x as bfloat16 for dot_pairs (pairs_x), or NULL: x and dot() */
};

static inline float row_dot(const struct rows_job *j, const void *W, long o) {
    return j->xb ? dot_pairs(row(W, o, j->in, 1), j->xb, j->in) : dot(row(W, o, j->in, j->bf), j->x, j->in, j->bf);
}

static void job_gemv(const void *c, long b, long e) {
    const struct rows_job *j = c;
    for (long o = b; o < e; o++)
        j->y[o] = row_dot(j, j->W, o);
}

static void job_gate_up(const void *c, long b, long e) {
    const struct rows_job *j = c;
    for (long i = b; i < e; i++)
        j->y[i] = row_dot(j, j->W, i);
    for (long i = b; i < e; i++) {
        float g = j->y[i];
        j->y[i] = g / (1.0f + expf(-g)) * row_dot(j, j->up, i);
    }
}

static void job_down(const void *c, long b, long e) {
    const struct rows_job *j = c;
    for (long o = b; o < e; o++)
        j->y[o] += j->scale * row_dot(j, j->W, o);
}

struct experts_job {
    const void *gate_up, *down; /* [E, D, 2I], [E, I, D]: each expert's matrices transposed */
    const float *x;             /* [D] */
    const long *ids;            /* [A] the chosen experts */
    const float *weights;       /* [A] their weights */
    float *out;                 /* [A, 2I + D]: each chosen expert's h, then its output */
    long D, I;
    int bf;
};

static void job_experts_t(const void *c, long b, long e) {
    /* chosen experts b .. e-1, each into its own output: the transposed matrices are read a row
     * at a time, each row scaled into an accumulator of its outputs (axpy): one stream per matrix */
    const struct experts_job *j = c;
    long D = j->D, I = j->I;
    for (long a = b; a < e; a++) {
        const void *gu = row(j->gate_up, j->ids[a], 2 * I * D, j->bf), *dn = row(j->down, j->ids[a], D * I, j->bf);
        float *h = j->out + a * (2 * I + D), *y = h + 2 * I;
        memset(h, 0, (2 * I + D) * sizeof(float));
        for (long d = 0; d < D; d++)
            axpy(h, j->x[d], row(gu, d, 2 * I, j->bf), 2 * I, j->bf);
        for (long i = 0; i < I; i++)
            h[i] = j->weights[a] * h[i] / (1.0f + expf(-h[i])) * h[I + i];
        for (long i = 0; i < I; i++)
            axpy(y, h[i], row(dn, i, D, j->bf), D, j->bf);
    }
}

static void gemv(const void *W, const float *x, float *y, long out, long in, int bf, int xbf) {
    /* y = W @ x, W [out, in] (bf: bfloat16); xbf: the activations are bfloat16 (pairs_x) */
    struct rows_job j = {W, x, y, in, bf, NULL, 0.0f, pairs_x(x, in, xbf, bf, 0)};
    parallel_rows(job_gemv, &j, out, out * in * (bf ? 2 : 4), row_chunk(out, in * (bf ? 2 : 4)));
}

static void swiglu(const void *gate, const void *up, const void *down, const float *x, float *y, float *h,
                   float scale, long D, long I, int bf, int xbf) {
    /* y += scale * down @ (silu(gate @ x) * (up @ x)): gate, up [I, D] and down [D, I] row-major;
     * h [I] scratch; xbf: the activations are bfloat16 (pairs_x: h rounded as torch's layer rounds
     * it). Each matrix is read front to back (a chunk of gate rows, then up's). */
    struct rows_job gu = {gate, x, h, D, bf, up, 0.0f, pairs_x(x, D, xbf, bf, 0)};
    parallel_rows(job_gate_up, &gu, I, 2 * I * D * (bf ? 2 : 4), row_chunk(I, 2 * D * (bf ? 2 : 4)));
    struct rows_job dn = {down, h, y, I, bf, NULL, scale, pairs_x(h, I, xbf, bf, 1)};
    parallel_rows(job_down, &dn, D, D * I * (bf ? 2 : 4), row_chunk(D, I * (bf ? 2 : 4)));
}

static void rmsnorm(const float *x, const void *w, float *y, float eps, long D, int bf) {
    /* y = w * x / sqrt(mean(x^2) + eps); for bfloat16 the normalised x is rounded before the
     * weight, as model.RMSNorm does */
    double ss = 0.0;
    for (long i = 0; i < D; i++)
        ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / D) + eps);
    for (long i = 0; i < D; i++)
        y[i] = get(w, i, bf) * (bf ? bf2f(f2bf(x[i] * r)) : x[i] * r);
}

/* ---- the entry points: the layer's input and output in its dtype, float32 scratch --------------- */

void moe_gemv(const void *W, const void *x, void *y, float *scratch, long out, long in, int bf, int wbf) {
    /* scratch [in + out]; bf: x and y bfloat16; wbf: W bfloat16 (bf, or a float32 model's weight
     * kept as the bfloat16 values it is: kernels/cpu_decode.py, narrow_linears) */
    float *x32 = scratch, *y32 = scratch + in;
    load(x32, x, in, bf);
    gemv(W, x32, y32, out, in, wbf, bf);
    store(y, y32, out, bf);
}

void moe_swiglu(const void *gate, const void *up, const void *down, const void *x, void *y, float *scratch,
                long D, long I, int bf, int wbf) {
    /* scratch [2D + I]; bf: x and y bfloat16; wbf: the weights (bf, or a float32 model's kept as the
     * bfloat16 values they are: kernels/cpu_decode.py, narrow_linears) */
    float *x32 = scratch, *y32 = scratch + D, *h = y32 + D;
    load(x32, x, D, bf);
    for (long o = 0; o < D; o++)
        y32[o] = 0.0f;
    swiglu(gate, up, down, x32, y32, h, 1.0f, D, I, wbf, bf);
    store(y, y32, D, bf);
}

void moe_rmsnorm(const void *x, const void *w, void *y, float *scratch, float eps, long D, int bf) {
    /* scratch [D] */
    load(scratch, x, D, bf);
    rmsnorm(scratch, w, scratch, eps, D, bf);
    store(y, scratch, D, bf);
}

AVX512 static inline __m512 round_bf16x16(__m512 v) {
    /* v rounded to bfloat16 (nearest even), as float32; NaN aside (a norm's inputs are finite) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

AVX512 static void rmsnorm_rows_bf16(const bf16 *x, long ldx, const bf16 *w, bf16 *y, float eps, long rows, long D) {
    /* moe_rmsnorm_rows for bfloat16 rows, D a multiple of 16: the sum of squares in float32 (16
     * lanes), then w * round(x * r) rounded, 16 values a step */
    for (long r = 0; r < rows; r++) {
        const bf16 *xr = x + r * ldx;
        bf16 *yr = y + r * D;
        __m512 ss = _mm512_setzero_ps();
        for (long i = 0; i < D; i += 16) {
            __m512 v = widen16(xr + i);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 rv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
        for (long i = 0; i < D; i += 16) {
            __m512 v = _mm512_mul_ps(widen16(w + i), round_bf16x16(_mm512_mul_ps(widen16(xr + i), rv)));
            __m512i u = _mm512_castps_si512(round_bf16x16(v));
            _mm256_storeu_si256((__m256i *)(yr + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        }
    }
}

void moe_rmsnorm_rows(const void *x, long ldx, const void *w, void *y, float *scratch, float eps, long rows, long D,
                      int bf) {
    /* moe_rmsnorm for each of `rows` rows of x, ldx elements apart; y [rows, D] contiguous;
     * scratch [D] (torch's RMSNorm of a few rows is four ops of ~10-20 us each on one thread) */
    if (bf && avx512_rows && D % 16 == 0) {
        rmsnorm_rows_bf16(x, ldx, w, y, eps, rows, D);
        return;
    }
    for (long r = 0; r < rows; r++)
        moe_rmsnorm(row(x, r, ldx, bf), w, (void *)row(y, r, D, bf), scratch, eps, D, bf);
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

struct mla_job {
    const float *q, *cos, *sin;
    const void *w_kv;
    const void *cache;
    const long *slots;
    float *out;
    int interleaved, bf, wbf;
    float scale;
    long L, P, R, C, Dv;
    int failed; /* a thread had no memory for its rows (the call then fails) */
};

static __thread float *mla_buf; /* a thread's per-head rows: ql [C], ol [C], qr [R], s [L] */
static __thread long mla_cap;

static void job_mla_heads(const void *c, long b, long e) {
    /* heads b .. e-1 of mla_decode, each whole on the thread that runs it (its bits the same
     * whoever runs it) */
    struct mla_job *j = (struct mla_job *)c;
    const long C = j->C, R = j->R, P = j->P, Dv = j->Dv, L = j->L;
    const int bf = j->bf, wbf = j->wbf;
    if (mla_cap < 2 * C + R + L) {
        float *grown = realloc(mla_buf, (2 * C + R + L) * sizeof(float));
        if (!grown) {
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
            return;
        }
        mla_buf = grown;
        mla_cap = 2 * C + R + L;
    }
    float *ql = mla_buf, *ol = ql + C, *qr = ol + C, *s = qr + R;
    for (long h = b; h < e; h++) {
        const float *qh = j->q + h * (P + R);
        const void *wk = row(j->w_kv, h, (P + Dv) * C, wbf), *wv = row(wk, P, C, wbf);
        rope(qr, qh + P, j->cos, j->sin, R, j->interleaved);
        for (long i = 0; i < C; i++)
            ql[i] = 0.0f;
        for (long p = 0; p < P; p++)
            axpy(ql, qh[p], row(wk, p, C, wbf), C, wbf);
        /* q_latent and o_latent rounded as torch's bfloat16 layer rounds them (NULL: float32, dot()) */
        const bf16 *qlb = pairs_x(ql, C, bf, bf, 0);
        float m = -INFINITY;
        for (long l = 0; l < L; l++) {
            const void *cl = row(j->cache, j->slots[l], C + R, bf);
            s[l] = j->scale * ((qlb ? dot_pairs(cl, qlb, C) : dot(cl, ql, C, bf)) + dot(row(cl, C, 1, bf), qr, R, bf));
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
            axpy(ol, s[l] / total, row(j->cache, j->slots[l], C + R, bf), C, bf);
        const bf16 *olb = pairs_x(ol, C, bf, wbf, 1);
        for (long d = 0; d < Dv; d++)
            j->out[h * Dv + d] = olb ? dot_pairs(row(wv, d, C, 1), olb, C) : dot(row(wv, d, C, wbf), ol, C, wbf);
    }
}

static int mla_decode(const float *q, const float *c, const float *k_rope, const float *cos,
                      const float *sin, const void *w_kv, void *cache, const long *slots, float *out,
                      float *scratch, int interleaved, long slot, float scale, long L, long H, long P,
                      long R, long C, long Dv, int bf, int wbf) {
    /* Multi-head latent attention of one new token, as model.MLAttention computes it with kv_b_proj
     * absorbed (that code serves any batch; this is its batch-1 decode step in one call):
     *   q [H, P + R] (no-rope, then rope part), c [C] (normed latent), k_rope [R], cos/sin [R/2]:
     *   the new token's; w_kv [H, P + Dv, C]: per head, P rows mapping the latent to keys, then Dv
     *   rows to values; cache [slots, C + R] rows (latent, roped key) in the layer's dtype; slot: the
     *   row this token writes; slots [L]: its context's rows in order, itself last; out [H, Dv];
     *   scratch [R]; bf: the cache bfloat16; wbf: w_kv bfloat16.
     * The new row is written first: cache[slot] = (c, rope(k_rope)). Per head: q_latent =
     * q_nope @ W_uk [C]; s_l = scale (q_latent . c_l + rope(q_rope) . k_l); p = softmax(s);
     * o_latent = sum_l p_l c_l [C]; out = W_uv @ o_latent [Dv]. No mask: one new token sees its
     * whole context (MLA models use no sliding window). The heads are shared with the helper
     * threads (each reads its W_uk, W_uv and the whole context); with the pairs (pairs_x) a head's
     * q_latent and o_latent are rounded to bfloat16 before their dot products, as torch's
     * bfloat16 layer rounds them. 0, or -1 when a thread had no memory for a head's rows. */
    float *kr = scratch;
    void *new_row = (void *)row(cache, slot, C + R, bf);
    store(new_row, c, C, bf);
    rope(kr, k_rope, cos, sin, R, interleaved);
    store((char *)new_row + C * (bf ? 2 : 4), kr, R, bf);
    struct mla_job j = {q, cos, sin, w_kv, cache, slots, out, interleaved, bf, wbf, scale, L, P, R, C, Dv, 0};
    long bytes = H * ((P + Dv) * C * (wbf ? 2 : 4) + L * (C + R) * (bf ? 2 : 4));
    parallel_rows(job_mla_heads, &j, H, bytes, 1);
    return j.failed ? -1 : 0;
}

int moe_mla_attention(const void *x, const void *q_a, const void *q_a_norm, const void *q_b, const void *kv_a,
                        const void *kv_a_norm, const void *w_kv, const void *o_proj, const void *cos,
                        const void *sin, void *cache, const long *slots, void *y, float *scratch, int interleaved,
                        long slot, float scale, long L, long D, long Q, long H, long P, long R, long C, long Dv,
                        int bf, int wbf) {
    /* model.MLAttention.forward for one new token with the paged cache (no biases): x [D] (normed
     * hidden state) -> y [D]. q_a [Q, D] and q_a_norm [Q] with q_b [H (P + R), Q], or q_a NULL and
     * q_b the full q_proj [H (P + R), D]; kv_a [C + R, D], kv_a_norm [C]; w_kv [H, P + Dv, C];
     * o_proj [D, H Dv]; cos/sin [R/2]; the rest as in mla_decode. Norm epsilon 1e-6
     * (model.MLAttention's). scratch [2D + R + Q + H (P + R) + C + 2R + H Dv]. bf: x, y, cos,
     * sin, the norms and the cache bfloat16; wbf: the five projections (bf, or a float32 model's
     * kept as the bfloat16 values they are: kernels/cpu_decode.py, narrow_linears). 0, or -1 when
     * there was no memory for the heads' rows (mla_decode). */
    float *x32 = scratch, *y32 = x32 + D, *cs = y32 + D, *qa = cs + R, *q = qa + Q, *kv = q + H * (P + R),
          *att = kv + C + R, *rest = att + H * Dv;
    load(x32, x, D, bf);
    load(cs, cos, R / 2, bf);
    load(cs + R / 2, sin, R / 2, bf);
    const float *q_in = x32;
    if (q_a) {
        gemv(q_a, x32, qa, Q, D, wbf, bf);
        rmsnorm(qa, q_a_norm, qa, 1e-6f, Q, bf);
        q_in = qa;
    }
    gemv(q_b, q_in, q, H * (P + R), q_a ? Q : D, wbf, bf);
    gemv(kv_a, x32, kv, C + R, D, wbf, bf);
    rmsnorm(kv, kv_a_norm, kv, 1e-6f, C, bf);
    if (mla_decode(q, kv, kv + C, cs, cs + R / 2, w_kv, cache, slots, att, rest, interleaved, slot, scale, L, H, P,
                   R, C, Dv, bf, wbf))
        return -1;
    gemv(o_proj, att, y32, D, H * Dv, wbf, bf);
    store(y, y32, D, bf);
    return 0;
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

static void route(const float *x32, const void *router, const float *bias, float *scores, float *choice,
                  float *group, char *picked, long *ids, float *weights, int sigmoid_scores, int method,
                  int norm_topk, float scaling, long D, long E, long A, long G, long topk_group, int bf) {
    /* model.Router for one token x32 [D]: its A experts (ids) and their weights; scratch scores,
     * choice [E], group [G], picked [max(E, G)] bytes.
     * Routing: scores = softmax(logits) or sigmoid(logits); choice = scores (+ bias); with groups,
     * only the topk_group best groups (group max, or noaux_tc's sum of its top two) stay
     * eligible; the A best choices win; weights = their scores, renormalised if norm_topk, times
     * scaling. Ties go to the lower index (torch.topk leaves them unspecified). */
    float m = -INFINITY;
    for (long e = 0; e < E; e++) {
        scores[e] = dot(row(router, e, D, bf), x32, D, bf);
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
    float total = 0.0f;
    for (long e = 0; e < E; e++)
        picked[e] = 0;
    for (long a = 0; a < A; a++) {
        ids[a] = argmax_unpicked(choice, picked, E);
        picked[ids[a]] = 1;
        weights[a] = scores[ids[a]];
        total += weights[a];
    }
    for (long a = 0; a < A; a++)
        weights[a] = (norm_topk ? weights[a] / (total + (sigmoid_scores ? 1e-20f : 0.0f)) : weights[a]) * scaling;
}

void moe_moe_decode(const void *x, const void *router, const float *bias, const void *gate_up, const void *down,
                    const void *shared_gate, const void *shared_up, const void *shared_down,
                    const void *shared_scale, long *tokens_per_expert, void *y, float *scratch,
                    int sigmoid_scores, int method, int norm_topk, float scaling, long D, long E, long A, long G,
                    long topk_group, long I, long Is, int bf, int experts_t, int experts_bf, int shared_bf) {
    /* model.MoE for one token (router, A routed experts, shared experts), the batch-1 decode step
     * in one call; the torch code in model.py is the reference and serves any batch.
     *   router [E, D]; bias [E] (float32) or NULL (noaux_tc's e_score_correction_bias); experts
     *   gate_up [E, 2I, D], down [E, D, I], or with experts_t each expert's matrix transposed
     *   (gate_up [E, D, 2I], down [E, I, D] in memory); shared expert gate/up [Is, D], down [D, Is]
     *   or NULL; shared_scale [D] or NULL (Qwen2-MoE's sigmoid gate row); tokens_per_expert [E]
     *   counts the choice; y [D]; scratch [2D + max(2I, Is) + 2E + G + E/4 + 1 + A (2I + D)] (the
     *   last part: the transposed experts' outputs). bf: x, y and
     *   the other weights bfloat16; experts_bf: the routed experts' (a float32 model keeps them as
     *   the bfloat16 values they are: kernels/cpu_decode.py, narrow_experts); shared_bf: the
     *   shared expert's gate, up and down (likewise: narrow_linears; shared_scale is of bf's dtype).
     * Routing as route() above. */
    long Ih = 2 * I > Is ? 2 * I : Is;
    float *x32 = scratch, *y32 = x32 + D, *h = y32 + D, *scores = h + Ih, *choice = scores + E,
          *group = choice + E;
    char *picked = (char *)(group + G);
    load(x32, x, D, bf);
    long ids[64];
    float weights[64];
    route(x32, router, bias, scores, choice, group, picked, ids, weights, sigmoid_scores, method, norm_topk,
          scaling, D, E, A, G, topk_group, bf);
    for (long a = 0; a < A; a++)
        tokens_per_expert[ids[a]] += 1;
    for (long o = 0; o < D; o++)
        y32[o] = 0.0f;
    if (experts_t) {
        /* each chosen expert read once, front to back, into its own output (an expert per thread
         * with helpers), the outputs then summed in order */
        float *out = group + G + E / 4 + 1;
        struct experts_job j = {gate_up, down, x32, ids, weights, out, D, I, experts_bf};
        parallel_rows(job_experts_t, &j, A, A * 3 * I * D * (experts_bf ? 2 : 4), 1);
        for (long a = 0; a < A; a++)
            for (long o = 0; o < D; o++)
                y32[o] += out[a * (2 * I + D) + 2 * I + o];
    } else {
        for (long a = 0; a < A; a++) {
            const void *gu = row(gate_up, ids[a], 2 * I * D, experts_bf), *dn = row(down, ids[a], D * I, experts_bf);
            swiglu(gu, row(gu, I, D, experts_bf), dn, x32, y32, h, weights[a], D, I, experts_bf, bf);
        }
    }
    if (shared_gate) {
        float s = 1.0f;
        if (shared_scale)
            s = 1.0f / (1.0f + expf(-dot(shared_scale, x32, D, bf)));
        swiglu(shared_gate, shared_up, shared_down, x32, y32, h, s, D, Is, shared_bf, bf);
    }
    store(y, y32, D, bf);
}

void moe_route_rows(const void *x, const void *router, const float *bias, long *ids, float *weights,
                    float *scratch, long rows, int sigmoid_scores, int method, int norm_topk, float scaling,
                    long D, long E, long A, long G, long topk_group, int bf) {
    /* route() for each of `rows` tokens x [rows, D]: ids [rows, A] int64, weights [rows, A] float32;
     * scratch [D + 2E + G + max(E, G) bytes]. torch's router for a few tokens is ~15 small ops. */
    float *x32 = scratch, *scores = x32 + D, *choice = scores + E, *group = choice + E;
    char *picked = (char *)(group + G);
    for (long r = 0; r < rows; r++) {
        load(x32, row(x, r, D, bf), D, bf);
        route(x32, router, bias, scores, choice, group, picked, ids + r * A, weights + r * A, sigmoid_scores,
              method, norm_topk, scaling, D, E, A, G, topk_group, bf);
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

/* moe_experts_bf16: the routed experts of model.Experts for a few tokens (a decode step of several
 * sequences), bfloat16, each expert's matrices column-major as the engine stores them for torch's
 * grouped GEMM: gate_up [E, D, 2I] (gate columns, then up columns) and down [E, I, D] in memory.
 *   x [N, D] bfloat16; ids [N, A] int64 (expert of each choice), weights [N, A] float32;
 *   y [N, D] bfloat16 = sum over a of weights[n, a] * expert ids[n, a] on x[n];
 *   counts [E] int64: tokens routed to each expert (set, not added);
 *   scratch: N D + N A + E + 1 + N (D + 2I) floats.
 * torch's grouped GEMM runs each expert as its own oneDNN matmul of a few rows, whose fixed cost
 * (~30-60 us) dwarfs the work at decode sizes. Here each expert's tokens are taken BLOCK_ROWS at a
 * time on each tile of its weights (gemm_rows: every block takes a tile before the next, so the
 * weights are read from memory once), the sums held in registers (rows x 64 columns per tile);
 * the hidden activations stay float32 and each token's output is summed over its experts in
 * float32, rounded once. AVX-512F only; D and I multiples of 16 (the caller checks). */
#define BLOCK_ROWS 6
#define PREFETCH_ROWS 24

AVX512 __attribute__((always_inline)) static inline void tile_rows(
    const float *X, long ldx, long K, const bf16 *W, long ldw, float *const *out, long col,
    const float *alpha, int accumulate, const int rows, const int vecs) {
    /* for m < rows, S = sum_k X[m, k] * W[k, 0 : 16 vecs]: out[m][col : col + 16 vecs] = S
     * (accumulate 0), += alpha[m] * S (1) or += S (2) */
    __m512 acc[BLOCK_ROWS][4];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < vecs; j++)
            acc[m][j] = _mm512_setzero_ps();
    for (long k = 0; k < K; k++) {
        const bf16 *w = W + k * ldw;
        /* the rows of a tile are ldw apart, which the hardware prefetcher does not follow: fetch
         * this tile's rows PREFETCH_ROWS ahead, and the next tile's (the next 64 columns) row k */
        PREFETCH_LINE(w + PREFETCH_ROWS * ldw);
        if (vecs > 2)
            PREFETCH_LINE(w + PREFETCH_ROWS * ldw + 32);
        PREFETCH_LINE(w + 64);
        PREFETCH_LINE(w + 96);
        __m512 wv[4];
        for (int j = 0; j < vecs; j++)
            wv[j] = widen16(w + 16 * j);
        for (int m = 0; m < rows; m++) {
            __m512 xv = _mm512_set1_ps(X[m * ldx + k]);
            for (int j = 0; j < vecs; j++)
                acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < vecs; j++) {
            float *o = out[m] + col + 16 * j;
            __m512 v = acc[m][j];
            if (accumulate == 1)
                v = _mm512_fmadd_ps(_mm512_set1_ps(alpha[m]), v, _mm512_loadu_ps(o));
            else if (accumulate == 2)
                v = _mm512_add_ps(v, _mm512_loadu_ps(o));
            _mm512_storeu_ps(o, v);
        }
}

#define TILE_CASE(R)                                                                                  \
    case R:                                                                                           \
        if (vecs == 4)                                                                                \
            tile_rows(Xb, ldx, kn, Wk + j, J, ob, j, ab, mode, R, 4);                                 \
        else                                                                                          \
            tile_rows(Xb, ldx, kn, Wk + j, J, ob, j, ab, mode, R, 1);                                 \
        break;

/* Rows of W per pass of gemm_rows: a 64-column tile of that many rows (K_CHUNK x 128 bytes, lines
 * 2I or D elements apart) stays in L2 while every block of rows takes it. */
#define K_CHUNK 128

AVX512 static void gemm_rows(const float *X, long ldx, long K, const bf16 *W, long J, float *const *out,
                             const float *alpha, int accumulate, long rows) {
    /* out[m][0 : J] (+)= alpha[m] * X[m, :K] @ W[K, J] (W row-major, J a multiple of 16) for m < rows.
     * By tiles of 64 columns and K_CHUNK rows of W, each tile taken by every block of BLOCK_ROWS
     * rows before the next, so that W is read from memory once however many rows (a pass over
     * the whole matrix per block read a large expert's weights again for every 6 tokens: the
     * tile's lines are a whole weight row apart, and a tile of all K rows did not stay in L2).
     * In a block the row count is a constant in each case, so the sums stay in registers; the
     * chunks' sums are added in out. */
    for (long j = 0; j < J;) {
        const int vecs = j + 64 <= J ? 4 : 1;
        for (long k0 = 0; k0 < K; k0 += K_CHUNK) {
            const long kn = K - k0 < K_CHUNK ? K - k0 : K_CHUNK;
            const bf16 *Wk = W + k0 * J;
            const int mode = accumulate ? 1 : (k0 ? 2 : 0);
            for (long b = 0; b < rows; b += BLOCK_ROWS) {
                const float *Xb = X + b * ldx + k0, *ab = alpha + b;
                float *const *ob = out + b;
                switch (rows - b < BLOCK_ROWS ? rows - b : BLOCK_ROWS) {
                    TILE_CASE(1)
                    TILE_CASE(2)
                    TILE_CASE(3)
                    TILE_CASE(4)
                    TILE_CASE(5)
                    TILE_CASE(6)
                }
            }
        }
        j += 16 * vecs;
    }
}

int moe_experts_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

static void group_by_expert(const long *ids, long n, long E, long *counts, int *order, int *start) {
    /* the n choices' indices grouped by expert (order), in choice order within each; expert e's
     * run is order[start[e] : start[e + 1]] (start: E + 1), its length in counts[e] */
    for (long e = 0; e <= E; e++)
        start[e] = 0;
    for (long i = 0; i < n; i++)
        start[ids[i] + 1]++;
    for (long e = 0; e < E; e++) {
        counts[e] = start[e + 1];
        start[e + 1] += start[e];
    }
    for (long i = 0; i < n; i++)
        order[start[ids[i]]++] = (int)i;
    for (long e = E; e > 0; e--)
        start[e] = start[e - 1];
    start[0] = 0;
}

AVX512 void moe_experts_bf16(const bf16 *x, const long *ids, const float *weights, const bf16 *gate_up,
                             const bf16 *down, bf16 *y, long *counts, float *scratch, long N, long A, long D,
                             long E, long I) {
    float *y32 = scratch, *h = y32 + N * D, *x32 = h + N * 2 * I;
    int *order = (int *)(x32 + N * D), *start = order + N * A; /* start: E + 1 */
    group_by_expert(ids, N * A, E, counts, order, start);
    for (long i = 0; i < N * D; i++)
        y32[i] = 0.0f;
    float *hrow[N], *yrow[N], alpha[N];
    for (long e = 0; e < E; e++) {
        const bf16 *gu = gate_up + e * D * 2 * I, *dn = down + e * I * D;
        /* at most N of the expert's choices a pass (what the scratch holds): top-k routing gives an
         * expert at most one choice per token, so one pass; ids naming an expert twice for a token
         * take more */
        for (long r0 = start[e]; r0 < start[e + 1]; r0 += N) {
            long rows = start[e + 1] - r0 < N ? start[e + 1] - r0 : N;
            for (long m = 0; m < rows; m++) {
                long choice = order[r0 + m], n = choice / A;
                const bf16 *xr = x + n * D;
                for (long d = 0; d < D; d += 16)
                    _mm512_storeu_ps(x32 + m * D + d, widen16(xr + d));
                hrow[m] = h + m * 2 * I;
                yrow[m] = y32 + n * D;
                alpha[m] = weights[choice];
            }
            gemm_rows(x32, D, D, gu, 2 * I, hrow, alpha, 0, rows); /* [rows, 2I] gate | up */
            for (long m = 0; m < rows; m++) {
                float *hm = hrow[m];
                for (long i = 0; i < I; i += 16) { /* silu(gate) * up */
                    __m512 g = _mm512_loadu_ps(hm + i);
                    __m512 s = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
                    _mm512_storeu_ps(hm + i, _mm512_mul_ps(_mm512_div_ps(g, s), _mm512_loadu_ps(hm + I + i)));
                }
            }
            gemm_rows(h, 2 * I, I, dn, D, yrow, alpha, 1, rows); /* y[n] += weight * [rows, D] */
        }
    }
    for (long i = 0; i < N * D; i++)
        y[i] = f2bf(y32[i]);
}

/* moe_experts_f32: moe_experts_bf16 in float32 (x, the experts, y) on AVX2 + FMA, for where the
 * runtime runs float32 (CPUs without native bfloat16 matmul, as AMD Zen 2/3): the same grouping,
 * each expert's matrices column-major (the engine's float32 layout: experts_layout). A tile is 16
 * columns x BLOCK_ROWS rows of sums, 12 of the 16 vector registers (the shape of BLAS's AVX2
 * micro-kernels), one weight line a row of K. The per-expert sgemm this replaces runs each
 * expert's 8 or so rows at a quarter of what the core does. Each choice (token, expert) gets its
 * own hidden row (its weight applied there: weight * silu(gate) * up) and its own output row;
 * a token's outputs are summed in choice order at the end. So an expert is a job on its own,
 * which the helper threads share (decision 37), and the bits depend neither on the other tokens
 * of the step nor on which thread took which expert.
 *   y [N, D] float32 = sum over a of weights[n, a] * expert ids[n, a] on x[n]; counts as above;
 *   scratch: N A (D + 2I) + 2 N A + 2 E + 1 floats. D and I multiples of 8 (the caller checks).
 *   wbf: the experts are bfloat16, widened as read (a float32 model's experts kept as the
 *   bfloat16 values they are: kernels/cpu_decode.py, narrow_experts): the same sums from half the
 *   bytes. */

/* Rows of W a pass of gemm_rows8 takes (K_CHUNK8 x J floats, contiguous), and how far ahead in a
 * row of W a tile fetches (2 tiles). Measured here on 4 and 8 rows an expert (DeepSeek- and
 * Mixtral-style steps of 32 tokens, experts of 1024 x 1024 and 1024 x 2048): 32 and 32 read
 * 13 and 10 GB/s; 64 and 64 read 8-9 and 10 (the core streams 18.5 at most). */
#define K_CHUNK8 32
#define PREFETCH_COLS8 32

__attribute__((always_inline)) static inline void tile_rows8(const float *const *X, long k0, long K,
                                                             const void *W, long ldw, float *const *out, long col,
                                                             int accumulate, const int rows, const int vecs,
                                                             const int fetch, const int wbf) {
    __m256 acc[BLOCK_ROWS][2];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < vecs; j++)
            acc[m][j] = _mm256_setzero_ps();
    for (long k = 0; k < K; k++) {
        const float *w = (const float *)W + k * ldw;
        const bf16 *w16 = (const bf16 *)W + k * ldw;
        if (fetch) /* the first block of rows only: the others find the lines in L1 (the same
                    * number of bytes ahead for either dtype) */
            PREFETCH_LINE(wbf ? (const void *)(w16 + 2 * PREFETCH_COLS8) : (const void *)(w + PREFETCH_COLS8));
        __m256 wv[2];
        for (int j = 0; j < vecs; j++)
            wv[j] = wbf ? widen8(w16 + 8 * j) : _mm256_loadu_ps(w + 8 * j);
        for (int m = 0; m < rows; m++) {
            __m256 xv = _mm256_broadcast_ss(X[m] + k0 + k);
            for (int j = 0; j < vecs; j++)
                acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < vecs; j++) {
            float *o = out[m] + col + 8 * j;
            __m256 v = acc[m][j];
            if (accumulate)
                v = _mm256_add_ps(v, _mm256_loadu_ps(o));
            _mm256_storeu_ps(o, v);
        }
}

#define TILE_CASE8(R)                                                                                 \
    case R:                                                                                           \
        if (wbf)                                                                                      \
            TILE_VECS8(R, 1)                                                                          \
        else                                                                                          \
            TILE_VECS8(R, 0)                                                                          \
        break;
#define TILE_VECS8(R, BF)                                                                             \
    {                                                                                                 \
        if (vecs == 2)                                                                                \
            tile_rows8(X + b, k0, kn, Wk, J, out + b, j, k0 > 0, R, 2, b == 0, BF);                   \
        else                                                                                          \
            tile_rows8(X + b, k0, kn, Wk, J, out + b, j, k0 > 0, R, 1, b == 0, BF);                   \
    }

static void gemm_rows8(const float *const *X, long K, const void *W, long J, float *const *out, long rows,
                       int wbf) {
    /* out[m][0 : J] = X[m][0 : K] @ W[K, J] (W row-major, J a multiple of 8) for m < rows, by
     * tiles of 16 columns, in this order: a chunk of K_CHUNK8 rows of W at a time, its tiles left
     * to right, each taken by every block of BLOCK_ROWS rows. A chunk is one contiguous stretch of
     * memory, and each row's lines are read in order (tiles a whole weight row apart, as
     * gemm_rows runs them, read a large expert's weights at a third of this: lines a row apart
     * stride pages and defeat the hardware prefetcher). Each output is the sum over K in one
     * order (chunk by chunk) whatever the rows. wbf: W is bfloat16, each value widened to the
     * float32 it is (the same sums; half the bytes read). */
    for (long k0 = 0; k0 < K; k0 += K_CHUNK8) {
        const long kn = K - k0 < K_CHUNK8 ? K - k0 : K_CHUNK8;
        for (long j = 0; j < J;) {
            const int vecs = j + 16 <= J ? 2 : 1;
            const void *Wk = wbf ? (const void *)((const bf16 *)W + k0 * J + j) : (const void *)((const float *)W + k0 * J + j);
            for (long b = 0; b < rows; b += BLOCK_ROWS) {
                switch (rows - b < BLOCK_ROWS ? rows - b : BLOCK_ROWS) {
                    TILE_CASE8(1)
                    TILE_CASE8(2)
                    TILE_CASE8(3)
                    TILE_CASE8(4)
                    TILE_CASE8(5)
                    TILE_CASE8(6)
                }
            }
            j += 8 * vecs;
        }
    }
}

/* Rows of an expert a pass of moe_experts_f32 takes (the pointer arrays on the stack). */
#define EXPERT_PASS 64

struct experts_rows_job {
    const float *x;
    const float *weights;
    const void *gate_up, *down;
    const int *order, *start, *active; /* grouped choices, each expert's run, the experts chosen */
    float *h, *out;                    /* per choice (grouped position): [2I] and [D] */
    long A, D, I;
    int wbf;
};

static void job_experts_rows(const void *c, long b, long e) {
    /* chosen experts active[b .. e-1], each choice of each into its own h and out row */
    const struct experts_rows_job *j = c;
    const long D = j->D, I = j->I;
    for (long t = b; t < e; t++) {
        const long ex = j->active[t];
        const void *gu = row(j->gate_up, ex, D * 2 * I, j->wbf), *dn = row(j->down, ex, I * D, j->wbf);
        for (long r0 = j->start[ex]; r0 < j->start[ex + 1]; r0 += EXPERT_PASS) {
            const long rows = j->start[ex + 1] - r0 < EXPERT_PASS ? j->start[ex + 1] - r0 : EXPERT_PASS;
            const float *xrow[EXPERT_PASS];
            float *hrow[EXPERT_PASS], *orow[EXPERT_PASS];
            for (long m = 0; m < rows; m++) {
                xrow[m] = j->x + j->order[r0 + m] / j->A * D;
                hrow[m] = j->h + (r0 + m) * 2 * I;
                orow[m] = j->out + (r0 + m) * D;
            }
            gemm_rows8(xrow, D, gu, 2 * I, hrow, rows, j->wbf); /* [rows, 2I] gate | up */
            for (long m = 0; m < rows; m++) { /* weight * silu(gate) * up */
                float *hm = hrow[m];
                const __m256 w = _mm256_set1_ps(j->weights[j->order[r0 + m]]);
                for (long i = 0; i < I; i += 8) {
                    __m256 g = _mm256_loadu_ps(hm + i);
                    __m256 s = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
                    _mm256_storeu_ps(hm + i, _mm256_mul_ps(_mm256_mul_ps(w, _mm256_div_ps(g, s)), _mm256_loadu_ps(hm + I + i)));
                }
            }
            gemm_rows8((const float *const *)hrow, I, dn, D, orow, rows, j->wbf); /* [rows, D] */
        }
    }
}

struct experts_sum_job {
    const float *out;
    const int *pos; /* each choice's grouped position */
    float *y;
    long A, D;
};

static void job_experts_sum(const void *c, long b, long e) {
    /* tokens b .. e-1: y[n] = the outputs of its choices, summed in choice order */
    const struct experts_sum_job *j = c;
    for (long n = b; n < e; n++) {
        float *y = j->y + n * j->D;
        memcpy(y, j->out + j->pos[n * j->A] * j->D, (size_t)j->D * sizeof(float));
        for (long a = 1; a < j->A; a++) {
            const float *o = j->out + j->pos[n * j->A + a] * j->D;
            for (long d = 0; d < j->D; d += 8)
                _mm256_storeu_ps(y + d, _mm256_add_ps(_mm256_loadu_ps(y + d), _mm256_loadu_ps(o + d)));
        }
    }
}

void moe_experts_f32(const float *x, const long *ids, const float *weights, const void *gate_up, const void *down,
                     float *y, long *counts, float *scratch, long N, long A, long D, long E, long I, int wbf) {
    /* scratch: N A (D + 2I) + 2 N A + 2 E + 1 floats. The chosen experts are the jobs the helpers
     * share (an expert per thread); each choice's output is its own row, summed per token in
     * choice order afterwards, so the bits do not depend on which thread took which expert. */
    float *h = scratch, *out = h + N * A * 2 * I;
    int *order = (int *)(out + N * A * D), *pos = order + N * A, *start = pos + N * A, *active = start + E + 1;
    group_by_expert(ids, N * A, E, counts, order, start);
    long n_active = 0, bytes = 0;
    for (long e = 0; e < E; e++)
        if (counts[e]) {
            active[n_active++] = (int)e;
            bytes += 3 * D * I * (wbf ? 2 : 4);
        }
    for (long r = 0; r < N * A; r++)
        pos[order[r]] = (int)r;
    struct experts_rows_job rj = {x, weights, gate_up, down, order, start, active, h, out, A, D, I, wbf};
    parallel_rows(job_experts_rows, &rj, n_active, bytes, 1);
    struct experts_sum_job sj = {out, pos, y, A, D};
    parallel_rows(job_experts_sum, &sj, N, N * A * D * 4, row_chunk(N, A * D * 4));
}

/* moe_linear_f32: y [M, N] float32 = x [M, K] @ W [N, K]^T (+ bias), for a few rows (a decode
 * step's sequences), on AVX2 + FMA, on the weights as they are (row-major, the layout of nn.Linear
 * that moe_gemv reads). Dot products: a tile is LIN_W rows of W x LIN_X rows of x, 12 sums of 8
 * lanes, each W row a sequential stream (as moe_gemv reads them) taken by every block of x's rows
 * while it is in L1. MKL's sgemm on these shapes (32 rows, K 1024) runs 40-70 GFLOP/s on one
 * core here, the lm head's [32000, 1024] at 40; this 64-84. Each output is one row's dot product
 * in the same order whatever M and wherever the row sits, so a sequence's logits do not depend
 * on the others in its step. K a multiple of 8 (the caller checks); returns 0 (moe_amx_linear's
 * signature). */
#define LIN_W 4
#define LIN_X 3

__attribute__((always_inline)) static inline void dot_tile(const float *x, long ldx, const float *W, long ldw,
                                                           long K, const float *bias, float *y, long ldy,
                                                           const int xr, const int wr) {
    __m256 acc[LIN_W][LIN_X];
    for (int r = 0; r < wr; r++)
        for (int m = 0; m < xr; m++)
            acc[r][m] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8) {
        __m256 xv[LIN_X];
        for (int m = 0; m < xr; m++)
            xv[m] = _mm256_loadu_ps(x + m * ldx + k);
        for (int r = 0; r < wr; r++) {
            __m256 w = _mm256_loadu_ps(W + r * ldw + k);
            for (int m = 0; m < xr; m++)
                acc[r][m] = _mm256_fmadd_ps(xv[m], w, acc[r][m]);
        }
    }
    /* each row of x's LIN_W sums of 8 lanes summed into LIN_W values at once (the missing W rows of
     * a tile at the matrix's end as zeros: every output is summed in one order) */
    for (int r = wr; r < LIN_W; r++)
        for (int m = 0; m < xr; m++)
            acc[r][m] = _mm256_setzero_ps();
    __m128 b = _mm_setzero_ps();
    if (bias) {
        float bb[LIN_W] = {0.0f};
        for (int r = 0; r < wr; r++)
            bb[r] = bias[r];
        b = _mm_loadu_ps(bb);
    }
    for (int m = 0; m < xr; m++) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][m], acc[1][m]), _mm256_hadd_ps(acc[2][m], acc[3][m]));
        __m128 v = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), b);
        if (wr == LIN_W) {
            _mm_storeu_ps(y + m * ldy, v);
        } else {
            float out[LIN_W];
            _mm_storeu_ps(out, v);
            for (int r = 0; r < wr; r++)
                y[m * ldy + r] = out[r];
        }
    }
}

#define DOT_CASE(XR, WR)                                                                              \
    case (XR) * 8 + (WR):                                                                             \
        dot_tile(x + m * ldx, ldx, Wn, ldw, K, bn, y + m * ldy + n, ldy, XR, WR);                     \
        break;

static void lin_block(const float *x, long ldx, long M, const float *Wn, long ldw, long n, int wr, long K,
                      const float *bn, float *y, long ldy) {
    /* outputs n .. n + wr of every row of x: W's rows Wn (wr of them, ldw apart), biases bn */
    for (long m = 0; m < M; m += LIN_X) {
        const int xr = M - m < LIN_X ? (int)(M - m) : LIN_X;
        switch (xr * 8 + wr) {
            DOT_CASE(1, 1)
            DOT_CASE(1, 2)
            DOT_CASE(1, 3)
            DOT_CASE(1, 4)
            DOT_CASE(2, 1)
            DOT_CASE(2, 2)
            DOT_CASE(2, 3)
            DOT_CASE(2, 4)
            DOT_CASE(3, 1)
            DOT_CASE(3, 2)
            DOT_CASE(3, 3)
            DOT_CASE(3, 4)
        }
    }
}

struct linear_job {
    const float *x;
    long ldx, M;
    const void *W; /* float32, or bfloat16 (wbf) */
    long ldw, K;
    const float *bias;
    float *y;
    long ldy;
    int wbf;
    int failed; /* a bfloat16 block found no memory */
};

static void job_linear(const void *c, long b, long e) {
    /* outputs b .. e-1 (b a multiple of LIN_W) of every row of x */
    struct linear_job *j = (struct linear_job *)c;
    const long K = j->K;
    float *block = NULL;
    if (j->wbf && !(block = malloc((size_t)LIN_W * K * sizeof(float)))) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (long n = b; n < e; n += LIN_W) {
        const int wr = e - n < LIN_W ? (int)(e - n) : LIN_W;
        const float *Wn = (const float *)j->W + n * j->ldw;
        long ldw = j->ldw;
        if (j->wbf) { /* the block's rows widened once, taken by every row of x */
            for (int r = 0; r < wr; r++) {
                const bf16 *src = (const bf16 *)j->W + (n + r) * j->ldw;
                float *dst = block + r * K;
                if (n + LIN_W < e) /* the next block's rows, while this one is computed */
                    for (long k = 0; k < K; k += 32)
                        PREFETCH_LINE(src + LIN_W * j->ldw + k);
                for (long k = 0; k < K; k += 8)
                    _mm256_storeu_ps(dst + k, widen8(src + k));
            }
            Wn = block;
            ldw = K;
        }
        lin_block(j->x, j->ldx, j->M, Wn, ldw, n, wr, K, j->bias ? j->bias + n : NULL, j->y, j->ldy);
    }
    free(block);
}

/* Rows of x a pass over W takes (a prefill's thousands of rows, LIN_ROWS at a time: 64 rows of
 * K 1024 stay in L2 while W streams by) */
#define LIN_ROWS 64

static int linear_rows(const float *x, long ldx, long M, const void *W, long ldw, long N, long K, const float *bias,
                       float *y, long ldy, int wbf) {
    /* W's rows shared with the helper threads in chunks of whole tiles (each output is one row's
     * dot product, whoever computes it, whatever the other rows) */
    const long row_bytes = K * (wbf ? 2 : 4);
    int failed = 0;
    for (long m = 0; m < M; m += LIN_ROWS) {
        struct linear_job j = {x + m * ldx, ldx, M - m < LIN_ROWS ? M - m : LIN_ROWS, W, ldw, K, bias, y + m * ldy,
                               ldy, wbf, 0};
        parallel_rows(job_linear, &j, N, N * row_bytes, row_chunk(N, row_bytes));
        failed |= j.failed;
    }
    return failed;
}

int moe_linear_f32(const float *x, long ldx, long M, const float *W, long ldw, long N, long K, const float *bias,
                   float *y, long ldy) {
    return linear_rows(x, ldx, M, W, ldw, N, K, bias, y, ldy, 0);
}

/* moe_linear_f32_bf16w: moe_linear_f32 with W bfloat16 (a float32 model's weight kept as the
 * bfloat16 values it is: kernels/cpu_decode.py, narrow_linears): each block of LIN_W rows widened once
 * into float32 and taken by every row of x as moe_linear_f32 takes it, so the same sums, from half
 * the bytes of memory. Returns 1 if there is no memory for the block. */
int moe_linear_f32_bf16w(const float *x, long ldx, long M, const bf16 *W, long ldw, long N, long K,
                         const float *bias, float *y, long ldy) {
    return linear_rows(x, ldx, M, W, ldw, N, K, bias, y, ldy, 1);
}

/* moe_argmax_rows: out[r] = the index of the largest x[r, :cols] (rows ld apart), the first on ties,
 * the first NaN if the row has one (torch.argmax's answer). Greedy sampling takes it: torch's argmax
 * over the last dimension runs ~2 ns an element on one thread here (0.6 ms for 32 x 8192 logits,
 * 4-6% of a decode step; 1.2 ms for 32 x 32000), a vectorized scan ~20x less. Each lane of the
 * scan keeps its first maximum and where it was (argmax_lanes); argmax_finish picks among the
 * lanes and scans the columns past the last whole vector. AVX-512F or AVX2, chosen at the call. */
static long argmax_finish(const float *xr, long cols, long c, const float *bv, const int *bi, int lanes, int nan) {
    long arg = -1;
    float m = -INFINITY;
    for (int l = 0; l < lanes; l++) /* each lane holds its first maximum: the lowest index among equals */
        if (bi[l] >= 0 && (arg < 0 || bv[l] > m || (bv[l] == m && bi[l] < arg)))
            m = bv[l], arg = bi[l];
    if (arg < 0 && c > 0) /* the scanned part all -inf: its first */
        arg = 0;
    for (; c < cols; c++) {
        if (xr[c] != xr[c])
            nan = 1;
        else if (arg < 0 || xr[c] > m)
            m = xr[c], arg = c;
    }
    if (nan) {
        for (c = 0; c < cols && xr[c] == xr[c]; c++)
            ;
        arg = c;
    }
    return arg < 0 ? 0 : arg; /* no columns: 0 */
}

AVX512 static void argmax_rows_avx512(const float *x, long rows, long cols, long ld, long *out) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i at = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                       14, 15);
        __mmask16 nan = 0;
        long c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m512 v = _mm512_loadu_ps(xr + c);
            __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, gt, v);
            at = _mm512_mask_mov_epi32(at, gt, idx);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
        float bv[16];
        int bi[16];
        _mm512_storeu_ps(bv, best);
        _mm512_storeu_si512(bi, at);
        out[r] = argmax_finish(xr, cols, c, bv, bi, 16, nan != 0);
    }
}

static void argmax_rows_avx2(const float *x, long rows, long cols, long ld, long *out) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        __m256 best = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        __m256i at = _mm256_set1_epi32(-1), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        long c = 0;
        for (; c + 8 <= cols; c += 8) {
            __m256 v = _mm256_loadu_ps(xr + c);
            __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            best = _mm256_blendv_ps(best, v, gt);
            at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), gt));
            idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
        }
        float bv[8];
        int bi[8];
        _mm256_storeu_ps(bv, best);
        _mm256_storeu_si256((__m256i *)bi, at);
        out[r] = argmax_finish(xr, cols, c, bv, bi, 8, _mm256_movemask_ps(nan) != 0);
    }
}

void moe_argmax_rows(const float *x, long rows, long cols, long ld, long *out) {
    if (moe_experts_supported())
        argmax_rows_avx512(x, rows, cols, ld, out);
    else
        argmax_rows_avx2(x, rows, cols, ld, out);
}

/* -- AMX --------------------------------------------------------------------------------------------
 * moe_amx_linear: y [M, N] bfloat16 = x [M, K] @ W [N, K]^T (+ bias), for a few rows (a decode step
 * of several sequences), with the AMX tiles (TDPBF16PS), on the weights as they are: row-major,
 * the layout of nn.Linear and of the checkpoint, read as the tiles' A operand (16 rows of W x 32
 * of K a tile). The rows of x are the B operand, which AMX wants with pairs of K interleaved: they
 * are repacked (16 rows x K, a few KB) at each call, not the weights. oneDNN's matmul on plain
 * bfloat16 weights reorders the weights into its blocked layout at every call, and at 8-32 rows
 * reads them at about half the speed this does (vLLM prepacks them: a second copy of every weight,
 * or the one copy in a layout the batch-1 kernels above do not read).
 * Each output is the sum over K in the same order whatever M and wherever the row sits, so a
 * sequence's result does not depend on the others in its step. N a multiple of 16, K of 32 (the
 * caller checks); the tile state is requested once (moe_amx_supported) and released after each call. */
#include <stdlib.h>

#include "amx_tiles.h"

int moe_amx_supported(void) { return amx_request(); }

AMX static void amx_pack(const bf16 *const *x, long M, long K, bf16 *B) {
    /* the M rows x[0 : M] as ceil(M / 16) B operands of 16 rows, each 16 K elements */
    for (long b = 0; 16 * b < M; b++)
        amx_pack_rows(x + 16 * b, M - 16 * b < 16 ? M - 16 * b : 16, K, B + b * 16 * K);
}

AMX static void amx_pack_strided(const bf16 *x, long ld, long M, long K, bf16 *B) {
    /* amx_pack of the M rows x, x + ld, ..., any number of them */
    for (long m0 = 0; m0 < M; m0 += 16) {
        const bf16 *rows[16] = {0};
        for (long m = 0; m < 16 && m0 + m < M; m++)
            rows[m] = x + (m0 + m) * ld;
        amx_pack_rows(rows, M - m0 < 16 ? M - m0 : 16, K, B + m0 * K);
    }
}

/* where amx_gemm's sums go: y [M, N] bfloat16 (+ bias), or float32 rows out[m], scaled or not */
enum { TO_BF16, TO_ROWS, SCALED_TO_ROWS };

typedef struct {
    int kind;
    const bf16 *bias; /* TO_BF16: [N] or NULL */
    bf16 *y;          /* TO_BF16: rows ldy apart */
    long ldy;
    float *const *out;  /* TO_ROWS, SCALED_TO_ROWS: row m's N sums */
    const float *alpha; /* SCALED_TO_ROWS: out[m] = alpha[m] * sums */
} amx_sink;

AMX static void amx_emit(const amx_sink *to, long t0, long rows, const float *sums, long n0, long cols) {
    /* sums [16 outputs][16 rows of x] (a stored C tile) -> outputs n0 .. n0 + cols - 1 (cols <= 16)
     * of rows t0 .. t0 + rows - 1, transposed in registers; TO_BF16 adds the bias in float32 and
     * rounds once (nearest even) */
    __m512i r[16];
    for (int o = 0; o < 16; o++)
        r[o] = _mm512_load_si512(sums + 16 * o);
    transpose16x16(r);
    const __mmask16 m = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1u);
    if (to->kind == TO_BF16) {
        const __m512 b = to->bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, to->bias + n0)), 16))
                                  : _mm512_setzero_ps();
        for (long t = 0; t < rows; t++)
            _mm256_mask_storeu_epi16(to->y + (t0 + t) * to->ldy + n0, m,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_castsi512_ps(r[t]), b)));
    } else if (to->kind == TO_ROWS) {
        for (long t = 0; t < rows; t++)
            _mm512_mask_storeu_ps(to->out[t0 + t] + n0, m, _mm512_castsi512_ps(r[t]));
    } else {
        for (long t = 0; t < rows; t++)
            _mm512_mask_storeu_ps(to->out[t0 + t] + n0, m,
                                  _mm512_mul_ps(_mm512_set1_ps(to->alpha[t0 + t]), _mm512_castsi512_ps(r[t])));
    }
}

/* the last < 16 rows of W [N, K] (rows ldw apart) from row n0, zero-padded to a whole A tile (16 x K,
 * rows K apart) in this thread's buffer; NULL when it could not be allocated */
static __thread bf16 *amx_tail;
static __thread long amx_tail_k;

AMX static const bf16 *amx_tail_tile(const bf16 *W, long ldw, long n0, long N, long K) {
    if (K > amx_tail_k) {
        bf16 *grown = aligned_alloc(64, 16 * K * sizeof(bf16));
        if (!grown)
            return NULL;
        free(amx_tail);
        amx_tail = grown, amx_tail_k = K;
    }
    memset(amx_tail, 0, 16 * K * sizeof(bf16));
    for (long n = n0; n < N; n++)
        memcpy(amx_tail + (n - n0) * K, W + n * ldw, K * sizeof(bf16));
    return amx_tail;
}

AMX static int amx_gemm_range(const bf16 *packed, long M, const bf16 *W, long ldw, long nb, long N, long K,
                              const amx_sink *to) {
    /* sums [M, nb .. N) = x @ W^T, x's M rows packed by amx_pack, W [N, K] rows ldw apart; the tiles
     * configured (amx_configure). 32 outputs (two A tiles) x 32 rows of x (two B tiles) at a time:
     * the 32 weight rows (64 KB at K = 1024) stay in L1 / L2 while every pair of row blocks takes
     * them, so W is read from memory once. Each sum runs over K in the same order whatever M, nb
     * and wherever its row is. */
    const long blocks = (M + 15) / 16;
    float sums[16 * 16] __attribute__((aligned(64)));
    for (long n0 = nb; n0 < N; n0 += 32) {
        /* two A tiles of 16 weight rows each, the second only where more than 16 outputs are
         * left; a last tile of fewer rows is read from a zero-padded copy (N no multiple of 16) */
        const long left = N - n0, c0 = left < 16 ? left : 16, c1 = left - 16 < 16 ? left - 16 : 16;
        const int two_n = left > 16;
        const bf16 *A0 = W + n0 * ldw, *A1 = A0 + 16 * ldw;
        long ld0 = ldw, ld1 = ldw;
        if (c0 < 16)
            A0 = amx_tail_tile(W, ldw, n0, N, K), ld0 = K;
        else if (two_n && c1 < 16)
            A1 = amx_tail_tile(W, ldw, n0 + 16, N, K), ld1 = K;
        if (!A0 || !A1)
            return -1; /* no memory for a 16 x K copy */
        for (long b = 0; b < blocks; b += 2) {
            const int two_m = b + 1 < blocks;
            const bf16 *B0 = packed + b * 16 * K, *B1 = B0 + 16 * K;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long k = 0; k < K; k += 32) {
                _tile_loadd(4, A0 + k, ld0 * 2);
                _tile_loadd(6, B0 + k * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (two_n) {
                    _tile_loadd(5, A1 + k, ld1 * 2);
                    _tile_dpbf16ps(1, 5, 6);
                }
                if (two_m) {
                    _tile_loadd(7, B1 + k * 16, 64);
                    _tile_dpbf16ps(2, 4, 7);
                    if (two_n)
                        _tile_dpbf16ps(3, 5, 7);
                }
            }
            const long t0 = 16 * b, r0 = M - t0 < 16 ? M - t0 : 16, r1 = M - t0 - 16;
            _tile_stored(0, sums, 64);
            amx_emit(to, t0, r0, sums, n0, c0);
            if (two_n) {
                _tile_stored(1, sums, 64);
                amx_emit(to, t0, r0, sums, n0 + 16, c1);
            }
            if (two_m) {
                _tile_stored(2, sums, 64);
                amx_emit(to, t0 + 16, r1, sums, n0, c0);
                if (two_n) {
                    _tile_stored(3, sums, 64);
                    amx_emit(to, t0 + 16, r1, sums, n0 + 16, c1);
                }
            }
        }
    }
    return 0;
}

AMX static int amx_gemm(const bf16 *packed, long M, const bf16 *W, long ldw, long N, long K, const amx_sink *to) {
    return amx_gemm_range(packed, M, W, ldw, 0, N, K, to);
}

/* this thread's scratch for the AMX kernels, grown as needed: a job's own (repacked rows, sums:
 * amx_scratch_of), and what a call shares with the helper threads (amx_shared_of) */
typedef struct {
    void *at;
    size_t size;
} scratch_buf;
static __thread scratch_buf amx_scratch, amx_shared;

static void *grown_to(scratch_buf *s, size_t bytes) {
    if (bytes > s->size) {
        void *grown = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!grown)
            return NULL;
        free(s->at);
        s->at = grown, s->size = bytes;
    }
    return s->at;
}

static void *amx_scratch_of(size_t bytes) { return grown_to(&amx_scratch, bytes); }
static void *amx_shared_of(size_t bytes) { return grown_to(&amx_shared, bytes); }

#define AMX_LINEAR_ROWS 64 /* the most rows moe_amx_heads packs at a time */
/* a pass of moe_amx_linear: x's packed rows that stay in L2 (with 32 weight rows at a time) while
 * the job's weight rows take them */
#define AMX_PASS_BYTES (1L << 20)

struct amx_linear_job {
    const bf16 *packed; /* x's rows, packed by the caller */
    long M, P;          /* rows, rows a pass (a multiple of 16) */
    const bf16 *W;
    long ldw, K;
    amx_sink to;
    int failed; /* a thread found no memory for a last tile's copy */
};

AMX static void job_amx_linear(const void *c, long b, long e) {
    /* outputs b .. e-1 (b a multiple of 32) of every row of x, a pass of P rows at a time, the
     * tiles configured for this thread */
    struct amx_linear_job *j = (struct amx_linear_job *)c;
    amx_configure();
    for (long m0 = 0; m0 < j->M; m0 += j->P) {
        amx_sink to = j->to;
        to.y += m0 * to.ldy;
        if (amx_gemm_range(j->packed + m0 * j->K, j->M - m0 < j->P ? j->M - m0 : j->P, j->W, j->ldw, b, e, j->K, &to))
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    }
    _tile_release();
}

AMX int moe_amx_linear(const bf16 *x, long ldx, long M, const bf16 *W, long ldw, long N, long K, const bf16 *bias,
                       bf16 *y, long ldy) {
    /* y [M, N] = x [M, K] (rows ldx apart) @ W^T (+ bias), any number of rows: a decode step's few,
     * a prefill's many (AMX_PASS_BYTES of them at a time: the weights are read once a pass); N any
     * number (a last tile of fewer than 16 weight rows from a zero-padded copy). 0, or -1 when a
     * scratch could not be allocated (y then partly written). W's rows are shared with the helper
     * threads in chunks of 32 (decision 38): each output is one row's sum over K, whoever computes
     * it and whatever M. */
    bf16 *packed = amx_scratch_of((M + 15) / 16 * 16 * K * sizeof(bf16));
    if (!packed)
        return -1;
    amx_pack_strided(x, ldx, M, K, packed);
    long P = AMX_PASS_BYTES / (K * (long)sizeof(bf16)) / 32 * 32;
    P = P < 32 ? 32 : P;
    struct amx_linear_job j = {packed, M, P, W, ldw, K, {.kind = TO_BF16, .bias = bias, .y = y, .ldy = ldy}, 0};
    /* work as a decode step's 64 rows over this many bytes of weights: shared from 1 MB */
    parallel_rows(job_amx_linear, &j, N, N * K * 2 * ((M + 63) / 64), (row_chunk(N, K * 2) + 31) / 32 * 32);
    return j.failed ? -1 : 0;
}

/* moe_amx_heads: per head h < H, y[:, h] [M, N] bfloat16 = x[:, h] [M, K] @ W[h]^T, W [H, N, K]
 * row-major (each head's A operand as moe_amx_linear's): MLA's absorbed products of a decode step
 * (the queries' no-rope part by W_uk^T, the attention's latent output by W_uv), where torch's
 * bmm runs each head's small product at ~100 GFLOP/s. x's row m of head h at x + m xs + h xh, y's
 * at y + m ys + h yh (rows contiguous). The heads are the jobs the helper threads share; each
 * output is one row's sum over K, as moe_amx_linear's. N a multiple of 16, K of 32 (the caller
 * checks). 0, or -1 when a thread's scratch could not be allocated. */
struct amx_heads_job {
    const bf16 *x;
    long xs, xh;
    const bf16 *W;
    bf16 *y;
    long ys, yh, M, N, K;
    int failed;
};

AMX static void job_amx_heads(const void *c, long b, long e) {
    struct amx_heads_job *j = (struct amx_heads_job *)c;
    const long rows_most = j->M < AMX_LINEAR_ROWS ? j->M : AMX_LINEAR_ROWS;
    bf16 *packed = amx_scratch_of((rows_most + 15) / 16 * 16 * j->K * sizeof(bf16));
    if (!packed) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    amx_configure();
    for (long h = b; h < e; h++)
        for (long m0 = 0; m0 < j->M; m0 += AMX_LINEAR_ROWS) {
            const long M = j->M - m0 < AMX_LINEAR_ROWS ? j->M - m0 : AMX_LINEAR_ROWS;
            amx_pack_strided(j->x + m0 * j->xs + h * j->xh, j->xs, M, j->K, packed);
            const amx_sink to = {.kind = TO_BF16, .y = j->y + m0 * j->ys + h * j->yh, .ldy = j->ys};
            if (amx_gemm(packed, M, j->W + h * j->N * j->K, j->K, j->N, j->K, &to))
                __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        }
    _tile_release();
}

AMX int moe_amx_heads(const bf16 *x, long xs, long xh, const bf16 *W, bf16 *y, long ys, long yh, long H, long M,
                      long N, long K) {
    struct amx_heads_job j = {x, xs, xh, W, y, ys, yh, M, N, K, 0};
    parallel_rows(job_amx_heads, &j, H, H * N * K * 2, 1);
    return j.failed ? -1 : 0;
}

/* dot_gemm: the sums of amx_gemm without the tiles, for CPUs with AVX512-BF16 but no AMX (AMD Zen 4
 * and 5; Intel Cooper Lake): sums [M, N] = x @ W^T into float32 rows (TO_ROWS, SCALED_TO_ROWS) or y,
 * x's M rows (bfloat16, K each) by pointer, W [N, K] rows ldw apart, K a multiple of 32 (an
 * expert's D and I: the caller checks), N any: the last N % DOT_COLS weight rows come from `tail`
 * (dot_tail; NULL where N is a multiple of DOT_COLS), an output head of 32001. vdpbf16ps multiplies 16 pairs of bfloat16 and
 * adds both products of a pair to a float32 lane: twice the FMAs of widening the weights to
 * float32, with no layout of its own (W's rows as the checkpoint stores them, what amx_gemm reads).
 * A block is DOT_ROWS rows of x by DOT_COLS weight rows, a float32 vector of sums each (24 of the 32
 * registers), summed across its lanes at the end (a row's four at once: sum_lanes4); the block's
 * weight rows (DOT_COLS x K) stay in L1 while every block of rows takes them, so W is read from
 * memory once, and the rows DOT_AHEAD blocks on are fetched into L2 meanwhile (Zen 4, 32 tokens
 * top-2 of 8 experts of D = I = 1024: 6.4 ms without, 3.0 ms with; into L1 instead: 3.9 ms). Each
 * sum runs over K in the same order whatever M and wherever its row is. */
#define DOT_ROWS 6
#define DOT_COLS 4
#define DOT_AHEAD 2
#define BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

BF16DOT static inline __m128 sum_lanes4(const __m512 a[4]) {
    /* the sums of each of a[0 .. 3]'s 16 lanes: pairs of vectors interleaved and added, then the
     * four 128-bit quarters (13 operations for the four, where one vector's own sum takes 8) */
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1))); /* a0 a1 a2 a3 per quarter */
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

BF16DOT __attribute__((always_inline)) static inline void dot_block(const bf16 *const *x, const bf16 *W, long ldw,
                                                                   long K, float *sums, const bf16 *next,
                                                                   const int rows) {
    /* sums[m * DOT_COLS + c] = x[m] . W[c] for m < rows, c < DOT_COLS; the DOT_COLS weight rows at
     * `next` (NULL: none) fetched into the caches meanwhile, a line of each per step */
    __m512 acc[DOT_ROWS][DOT_COLS];
    for (int m = 0; m < rows; m++)
        for (int c = 0; c < DOT_COLS; c++)
            acc[m][c] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 32) {
        if (next)
            for (int c = 0; c < DOT_COLS; c++)
                _mm_prefetch((const char *)(next + c * ldw + k), _MM_HINT_T1);
        __m512bh w[DOT_COLS];
        for (int c = 0; c < DOT_COLS; c++)
            w[c] = (__m512bh)_mm512_loadu_si512(W + c * ldw + k);
        for (int m = 0; m < rows; m++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[m] + k);
            for (int c = 0; c < DOT_COLS; c++)
                acc[m][c] = _mm512_dpbf16_ps(acc[m][c], xv, w[c]);
        }
    }
    for (int m = 0; m < rows; m++)
        _mm_storeu_ps(sums + m * DOT_COLS, sum_lanes4(acc[m]));
}

#define DOT_CASE(R)                                                                                   \
    case R:                                                                                           \
        dot_block(x + m0, Wb, ldb, K, sums, next, R);                                                 \
        break;

static bf16 *dot_tail(const bf16 *W, long ldw, long N, long K) {
    /* W's last N % DOT_COLS rows as a block of DOT_COLS rows of K (the last one repeated: each
     * output's sum is its own vector's, summed across lanes the same way in any column), for
     * dot_gemm; NULL where N is a multiple of DOT_COLS or there is no memory (the caller tells) */
    const long full = N / DOT_COLS * DOT_COLS;
    bf16 *tail = full < N ? malloc(DOT_COLS * K * sizeof(bf16)) : NULL;
    for (long c = 0; tail && c < DOT_COLS; c++)
        memcpy(tail + c * K, W + (full + (c < N - full ? c : N - full - 1)) * ldw, K * sizeof(bf16));
    return tail;
}

BF16DOT static void dot_gemm(const bf16 *const *x, long M, const bf16 *W, long ldw, long N, long K,
                             const bf16 *tail, const amx_sink *to) {
    float sums[DOT_ROWS * DOT_COLS];
    if (M <= 0 || N <= 0)
        return;
    const long full = N / DOT_COLS * DOT_COLS;
    /* the rows in blocks as even as DOT_ROWS allows (8 rows: 4 + 4, not 6 + 2, whose 2-row block
     * loads a weight vector for every two products) */
    const long blocks = (M + DOT_ROWS - 1) / DOT_ROWS, even = (M + blocks - 1) / blocks;
    for (long n0 = 0; n0 < N; n0 += DOT_COLS) {
        const int cols = N - n0 < DOT_COLS ? (int)(N - n0) : DOT_COLS;
        const bf16 *Wb = cols < DOT_COLS ? tail : W + n0 * ldw;
        const long ldb = cols < DOT_COLS ? K : ldw;
        for (long m0 = 0; m0 < M; m0 += even) {
            const int rows = M - m0 < even ? (int)(M - m0) : (int)even;
            /* the first block of rows fetches the weight rows DOT_AHEAD blocks on, which the
             * hardware prefetcher would start on only once they are read (a row is a few KB) */
            const long ahead = n0 + DOT_AHEAD * DOT_COLS;
            const bf16 *next = !m0 && ahead + DOT_COLS <= full ? W + ahead * ldw : NULL;
            switch (rows) {
                DOT_CASE(1)
                DOT_CASE(2)
                DOT_CASE(3)
                DOT_CASE(4)
                DOT_CASE(5)
                DOT_CASE(6)
            }
            for (int m = 0; m < rows; m++) {
                const float *sm = sums + m * DOT_COLS;
                if (to->kind == TO_BF16) { /* the bias added in float32, rounded once */
                    bf16 *o = to->y + (m0 + m) * to->ldy + n0;
                    for (int c = 0; c < cols; c++)
                        o[c] = f2bf(to->bias ? sm[c] + bf2f(to->bias[n0 + c]) : sm[c]);
                } else {
                    float *o = to->out[m0 + m] + n0;
                    const float a = to->kind == SCALED_TO_ROWS ? to->alpha[m0 + m] : 1.0f;
                    for (int c = 0; c < cols; c++)
                        o[c] = to->kind == SCALED_TO_ROWS ? a * sm[c] : sm[c];
                }
            }
        }
    }
}

/* moe_dpbf16_linear: moe_amx_linear's y [M, N] = x [M, K] @ W^T (+ bias) by dot_gemm, on CPUs with
 * AVX512-BF16 and no AMX: any number of rows (rows ldx apart), DOT_PASS_BYTES of them a pass (they
 * stay in L2 while each block of weight rows takes them); N any, K a multiple of 32 (the caller
 * checks). W's rows are shared with the helper threads in chunks (a multiple of 16); each
 * output is one row's sum over K, so its bits depend neither on the helpers nor on the other rows.
 * 0, or -1 when the row pointers (or the tail block) could not be allocated. */
#define DOT_PASS_BYTES (256L << 10)
#define DOT_SHARE_ROWS 16

struct dot_linear_job {
    const bf16 *const *rows;
    long M, P; /* rows, rows a pass */
    const bf16 *W;
    long ldw, K;
    const bf16 *tail; /* dot_tail's block of W's last N % DOT_COLS rows (NULL: none) */
    amx_sink to;      /* TO_BF16 */
};

BF16DOT static void job_dot_linear(const void *c, long b, long e) {
    /* outputs b .. e-1 of every row, a pass of P rows at a time */
    const struct dot_linear_job *j = c;
    for (long m0 = 0; m0 < j->M; m0 += j->P) {
        amx_sink to = j->to;
        to.y += m0 * to.ldy + b;
        to.bias = to.bias ? to.bias + b : NULL;
        dot_gemm(j->rows + m0, j->M - m0 < j->P ? j->M - m0 : j->P, j->W + b * j->ldw, j->ldw, e - b, j->K,
                 j->tail, &to);
    }
}

BF16DOT int moe_dpbf16_linear(const bf16 *x, long ldx, long M, const bf16 *W, long ldw, long N, long K,
                              const bf16 *bias, bf16 *y, long ldy) {
    const bf16 **rows = amx_shared_of(M * sizeof(bf16 *));
    if (!rows)
        return -1;
    for (long m = 0; m < M; m++)
        rows[m] = x + m * ldx;
    long P = DOT_PASS_BYTES / (K * (long)sizeof(bf16)) / DOT_ROWS * DOT_ROWS;
    P = P < DOT_ROWS ? DOT_ROWS : P;
    bf16 *tail = dot_tail(W, ldw, N, K);
    if (N % DOT_COLS && !tail)
        return -1;
    struct dot_linear_job j = {rows, M, P, W, ldw, K, tail, {.kind = TO_BF16, .bias = bias, .y = y, .ldy = ldy}};
    parallel_rows(job_dot_linear, &j, N, N * K * 2 * ((M + DOT_SHARE_ROWS - 1) / DOT_SHARE_ROWS), row_chunk(N, K * 2));
    free(tail);
    return 0;
}

int moe_dpbf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* the AMX calls of the experts' job, which itself runs on CPUs without the tiles too */
AMX static void amx_begin(void) { amx_configure(); }
AMX static void amx_end(void) { _tile_release(); }

AMX static int amx_rows_gemm(const bf16 *const *x, long M, bf16 *packed, const bf16 *W, long N, long K,
                             const amx_sink *to) {
    amx_pack(x, M, K, packed);
    return amx_gemm(packed, M, W, K, N, K, to);
}

/* moe_amx_experts: the routed experts of model.Experts (SiLU) for any number of tokens, bfloat16,
 * with the AMX tiles, on the experts as the checkpoint stores them: gate_up [E, 2I, D] (gate rows,
 * then up rows) and down [E, D, I], row-major, each the A operand as in moe_amx_linear.
 *   x [N, D] bfloat16; ids [N, A] int64 (expert of each choice), weights [N, A] float32;
 *   y [N, D] bfloat16 = sum over a of weights[n, a] * expert ids[n, a] on x[n];
 *   counts [E] int64: tokens routed to each expert (set, not added).
 * An expert's tokens go AMX_PASS_ROWS at a time (its weights read once a pass); gate and up are
 * float32 sums, silu(gate) * up rounded to bfloat16 once (the down projection's B operand). Each
 * choice (token, expert) gets its own float32 output row (weight * the expert's sums), and a
 * token's rows are summed in choice order at the end, rounded once: so the experts are jobs the
 * helper threads share (decision 38), and the bits depend neither on which thread took which
 * expert nor on the other tokens of the call. The tokens go AMX_EXPERTS_BYTES of output rows at a
 * time. D and I multiples of 32 (the caller checks). 0, or -1 when the scratch could not be
 * allocated (y and counts then partly written).
 * moe_dpbf16_experts: the same on CPUs with AVX512-BF16 and no AMX, the sums by dot_gemm (decision
 * 40), DOT_PASS_ROWS tokens of an expert at a time (their rows stay in L2 while it takes them). */
#define AMX_PASS_ROWS 512
#define DOT_PASS_ROWS 256
#define AMX_EXPERTS_BYTES (32L << 20)

struct rows_experts_job {
    const bf16 *x;
    const float *weights;
    const bf16 *gate_up, *down;
    const int *order, *start, *active; /* grouped choices, each expert's run, the experts chosen */
    float *out;                        /* [N A, D]: each choice's output, at its grouped position */
    long A, D, I, P;                   /* P: rows a pass */
    int amx;                           /* the sums on the AMX tiles, else by dot_gemm */
    int failed;                        /* a thread found no memory for its scratch */
};

BF16DOT static void job_rows_experts(const void *c, long b, long e) {
    /* chosen experts active[b .. e-1], each choice of each into its own output row */
    struct rows_experts_job *j = (struct rows_experts_job *)c;
    const long D = j->D, I = j->I, P = j->P, Pb = (P + 15) / 16 * 16;
    char *at = amx_scratch_of(Pb * D * 2 + P * 2 * I * 4 + 2 * Pb * I * 2 + P * 3 * sizeof(void *) + P * 4 + 64 * 7);
    if (!at) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
#define TAKE(type, name, count) type *name = (type *)at; at += ((count) * sizeof(type) + 63) / 64 * 64
    TAKE(bf16, packed_x, Pb * D);
    TAKE(float, h, P * 2 * I);
    TAKE(bf16, act, Pb * I);
    TAKE(bf16, packed_act, Pb * I);
    TAKE(const bf16 *, xrow, P);
    TAKE(float *, hrow, P);
    TAKE(float *, yrow, P);
    TAKE(float, alpha, P);
#undef TAKE
    if (j->amx)
        amx_begin();
    for (long t = b; t < e; t++) {
        const long ex = j->active[t];
        const bf16 *gu = j->gate_up + ex * 2 * I * D, *dn = j->down + ex * D * I;
        for (long r0 = j->start[ex]; r0 < j->start[ex + 1]; r0 += P) {
            const long rows = j->start[ex + 1] - r0 < P ? j->start[ex + 1] - r0 : P;
            for (long m = 0; m < rows; m++) {
                const long choice = j->order[r0 + m];
                xrow[m] = j->x + (choice / j->A) * D;
                hrow[m] = h + m * 2 * I;
                yrow[m] = j->out + (r0 + m) * D;
                alpha[m] = j->weights[choice];
            }
            amx_sink to_h = {.kind = TO_ROWS, .out = hrow};
            if (!j->amx)
                dot_gemm(xrow, rows, gu, D, 2 * I, D, NULL, &to_h); /* [rows, 2I]: gate | up */
            else if (amx_rows_gemm(xrow, rows, packed_x, gu, 2 * I, D, &to_h))
                __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
            for (long m = 0; m < rows; m++) { /* silu(gate) * up, rounded once */
                const float *hm = hrow[m];
                bf16 *am = act + m * I;
                for (long i = 0; i < I; i += 16) {
                    __m512 g = _mm512_loadu_ps(hm + i);
                    __m512 s = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
                    __m512 v = _mm512_mul_ps(_mm512_div_ps(g, s), _mm512_loadu_ps(hm + I + i));
                    _mm256_storeu_si256((__m256i *)(am + i), (__m256i)_mm512_cvtneps_pbh(v));
                }
                xrow[m] = am;
            }
            amx_sink to_y = {.kind = SCALED_TO_ROWS, .out = yrow, .alpha = alpha};
            if (!j->amx)
                dot_gemm(xrow, rows, dn, I, D, I, NULL, &to_y); /* weight * [rows, D] */
            else if (amx_rows_gemm(xrow, rows, packed_act, dn, D, I, &to_y))
                __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        }
    }
    if (j->amx)
        amx_end();
}

struct rows_sum_job {
    const float *out;
    const int *pos; /* each choice's grouped position */
    bf16 *y;
    long A, D;
};

BF16DOT static void job_rows_sum(const void *c, long b, long e) {
    /* tokens b .. e-1: y[n] = its choices' outputs summed in choice order, rounded once */
    const struct rows_sum_job *j = c;
    const long D = j->D;
    for (long n = b; n < e; n++)
        for (long d = 0; d < D; d += 16) {
            __m512 v = _mm512_loadu_ps(j->out + j->pos[n * j->A] * D + d);
            for (long a = 1; a < j->A; a++)
                v = _mm512_add_ps(v, _mm512_loadu_ps(j->out + j->pos[n * j->A + a] * D + d));
            _mm256_storeu_si256((__m256i *)(j->y + n * D + d), (__m256i)_mm512_cvtneps_pbh(v));
        }
}

static int experts_rows(const bf16 *x, const long *ids, const float *weights, const bf16 *gate_up, const bf16 *down,
                        bf16 *y, long *counts, long N, long A, long D, long E, long I, int amx) {
    long T = AMX_EXPERTS_BYTES / (A * D * 4); /* tokens a round */
    T = T < 1 ? 1 : T > N ? N : T;
    const long R = T * A, pass = amx ? AMX_PASS_ROWS : DOT_PASS_ROWS;
    char *at = amx_shared_of(R * D * 4 + (3 * R + 2 * E + 1) * 4 + E * 8 + 64 * 6);
    if (!at)
        return -1;
#define TAKE(type, name, count) type *name = (type *)at; at += ((count) * sizeof(type) + 63) / 64 * 64
    TAKE(float, out, R * D);
    TAKE(int, order, R);
    TAKE(int, pos, R);
    TAKE(int, start, E + 1);
    TAKE(int, active, E);
    TAKE(long, part, E);
#undef TAKE
    for (long e = 0; e < E; e++)
        counts[e] = 0;
    for (long n0 = 0; n0 < N; n0 += T) {
        const long tokens = N - n0 < T ? N - n0 : T, r = tokens * A;
        group_by_expert(ids + n0 * A, r, E, part, order, start);
        long n_active = 0, most = 0;
        for (long e = 0; e < E; e++)
            if (part[e]) {
                counts[e] += part[e];
                active[n_active++] = (int)e;
                most = part[e] > most ? part[e] : most;
            }
        for (long i = 0; i < r; i++)
            pos[order[i]] = (int)i;
        struct rows_experts_job ej = {x + n0 * D, weights + n0 * A, gate_up, down, order, start, active, out,
                                 A, D, I, most < pass ? most : pass, amx, 0};
        parallel_rows(job_rows_experts, &ej, n_active, n_active * 3 * D * I * 2, 1);
        if (ej.failed)
            return -1;
        struct rows_sum_job sj = {out, pos, y + n0 * D, A, D};
        parallel_rows(job_rows_sum, &sj, tokens, r * D * 4, row_chunk(tokens, A * D * 4));
    }
    return 0;
}

AMX int moe_amx_experts(const bf16 *x, const long *ids, const float *weights, const bf16 *gate_up, const bf16 *down,
                        bf16 *y, long *counts, long N, long A, long D, long E, long I) {
    return experts_rows(x, ids, weights, gate_up, down, y, counts, N, A, D, E, I, 1);
}

BF16DOT int moe_dpbf16_experts(const bf16 *x, const long *ids, const float *weights, const bf16 *gate_up,
                               const bf16 *down, bf16 *y, long *counts, long N, long A, long D, long E, long I) {
    return experts_rows(x, ids, weights, gate_up, down, y, counts, N, A, D, E, I, 0);
}
