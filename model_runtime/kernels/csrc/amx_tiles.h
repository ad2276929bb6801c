/* AMX tiles (TDPBF16PS), shared by the kernels (cpu_decode.c, paged_attention.c; decision 32).
 *
 * A tile multiply C [16 x 16 float32] += A [16 x 32 bfloat16] . B, where A's rows are 32 values of
 * K each (a row-major matrix as it is: a weight [out, in], a cache's key rows) and B holds 16
 * columns with pairs of K interleaved, B [K/2][16][2] ("VNNI"): what amx_pack_rows makes of 16 rows
 * of an activation (or of 16 query heads). C [r][c] is then the dot product of A's row r with B's
 * column c. Linux grants the tile data state per process on request (amx_request). */
#ifndef MOE_AMX_TILES_H
#define MOE_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#ifdef MOE_AMX_EMULATE
/* The tiles in software, for checking the AMX kernels' own logic (packing, tails, sinks, the
 * helpers' shares of a job) on a CPU without AMX: the build with -DMOE_AMX_EMULATE (the Python
 * loaders' MOE_RUNTIME_AMX_EMULATE=1, tests only) runs the same kernels with each tile instruction
 * replaced by a scalar loop over thread-local tiles of 16 rows x 64 bytes (the one shape the
 * kernels configure). TDPBF16PS sums each pair in float32 as the instruction does; hardware rounds
 * and flushes denormals its own way, so results agree with AMX's to float32 rounding, not to the
 * bit. Everything else in the kernels (AVX-512 packing, bfloat16 conversions) runs as on AMX
 * CPUs, so the build needs AVX512-BF16. */
static __thread unsigned char moe_emu_tiles[8][16][64];

static inline void moe_emu_tile_loadd(int t, const void *base, long stride) {
    for (int r = 0; r < 16; r++)
        memcpy(moe_emu_tiles[t][r], (const char *)base + r * stride, 64);
}

static inline void moe_emu_tile_stored(int t, void *base, long stride) {
    for (int r = 0; r < 16; r++)
        memcpy((char *)base + r * stride, moe_emu_tiles[t][r], 64);
}

static inline float moe_emu_bf16(const unsigned char *p) {
    uint32_t bits = (uint32_t)(p[0] | p[1] << 8) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void moe_emu_tile_dpbf16ps(int c, int a, int b) {
    /* C [m][n] (float32) += A [m][2k] B [k][2n] + A [m][2k+1] B [k][2n+1], k over 16 pairs */
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float sum;
            memcpy(&sum, moe_emu_tiles[c][m] + 4 * n, 4);
            for (int k = 0; k < 16; k++) {
                sum += moe_emu_bf16(moe_emu_tiles[a][m] + 4 * k) * moe_emu_bf16(moe_emu_tiles[b][k] + 4 * n);
                sum += moe_emu_bf16(moe_emu_tiles[a][m] + 4 * k + 2) * moe_emu_bf16(moe_emu_tiles[b][k] + 4 * n + 2);
            }
            memcpy(moe_emu_tiles[c][m] + 4 * n, &sum, 4);
        }
}

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadd(t, base, stride) moe_emu_tile_loadd(t, base, stride)
#define _tile_stored(t, base, stride) moe_emu_tile_stored(t, base, stride)
#define _tile_zero(t) memset(moe_emu_tiles[t], 0, sizeof moe_emu_tiles[t])
#define _tile_dpbf16ps(c, a, b) moe_emu_tile_dpbf16ps(c, a, b)
#define _tile_loadconfig(config) ((void)(config))
#define _tile_release() ((void)0)

static inline int amx_request(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl");
}
#else
static inline int amx_request(void) {
    /* whether the CPU has AMX-BF16 (and AVX512-BF16) and the kernel grants this process the tile
     * data state (Linux asks each process to request it; oneDNN does the same) */
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("avx512bf16"))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#endif

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_tile_config;

AMX static inline void amx_configure(void) {
    /* eight tiles of 16 rows x 64 bytes (the callers: C in 0-3, A in 4-5, B in 6-7) */
    amx_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    /* gcc 12's _tile_loadconfig does not tell the compiler that it reads c, which then drops the
     * stores above as dead (a #GP on the zeroed config): a compiler barrier keeps them */
    __asm__ __volatile__("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
}

__attribute__((target("avx512f"))) static inline void transpose16x16(__m512i r[16]) {
    /* r[i] holds 16 32-bit elements of row i -> r[c] holds element c of every row (AVX-512F only:
     * inlined into the AMX kernels and the AVX-512 ones) */
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int c = 0; c < 8; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
    }
}

AMX static inline void amx_pack_rows(const uint16_t *const *x, long rows, long K, uint16_t *B) {
    /* B [K/2][16][2] = the bfloat16 rows x[0 : rows] (at most 16; K a multiple of 32) with pairs of
     * K interleaved, zero rows to 16: 32 of K at a time, the rows' 16 pairs (32-bit elements)
     * transposed in registers */
    __m512i r[16];
    for (long k = 0; k < K; k += 32) {
        for (int t = 0; t < 16; t++)
            r[t] = t < rows ? _mm512_loadu_si512(x[t] + k) : _mm512_setzero_si512();
        transpose16x16(r);
        for (int p = 0; p < 16; p++)
            _mm512_storeu_si512(B + (k / 2 + p) * 32, r[p]);
    }
}

#endif
