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

static inline int amx_request(void) {
    /* whether the CPU has AMX-BF16 (and AVX512-BF16) and the kernel grants this process the tile
     * data state (Linux asks each process to request it; oneDNN does the same) */
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("avx512bf16"))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

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
