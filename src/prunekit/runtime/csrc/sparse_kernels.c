/* Sparse x dense kernels for prunekit.accelerate (CPU).
 *
 * Compiled on first use by prunekit/runtime/kernels.py with the machine's C compiler
 * (-O3 -march=native, -fopenmp when available) and called through ctypes with raw pointers.
 * torch is already loaded when this library is, so its OpenMP runtime (libgomp.so.1) is the
 * one these parallel loops use: one thread pool for torch ops and these kernels.
 *
 * Weight formats, all row-major over the output rows of W (out x in):
 *   CSR    values[nnz] (float32, or int8 codes with one float32 scale per row),
 *          cols[nnz] (uint16 when in <= 65536, else int32), rowptr[out + 1] (int64).
 *   BITMAP masks[out][ceil(in / 16)] (uint16: bit j set = column 16 * block + j is non-zero),
 *          values packed row by row in column order, rowptr[out + 1] (int64) offsets into
 *          values; values carry 64 bytes of padding so a full-vector load never leaves them.
 *
 *   TILES  the rows in slices of 16, the columns in blocks of 32; per (slice, block) tile,
 *          steps[tile] (uint8, at most 32) vectors of 16 lanes, lane i for row 16 * slice + i:
 *          values[step][16] (0 in unused lanes) and cols[step][16] (uint8, column within the
 *          block); slice_ptr[slices + 1] (int64) counts steps. The 32 inputs of a block sit in
 *          two registers and each step picks its 16 with one permute: no gather, no horizontal
 *          sum, 16 output rows at a time.
 *
 * Outputs: y[b][r] = scale[r] * sum_k W[r][k] * x[b][k] + bias[r], y is (batch x out).
 * Work is split over output rows so that each thread gets an equal share of the non-zeros.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define PK_NEON 1
#endif

#define PK_EXPORT __attribute__((visibility("default")))
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PK_AVX512 1
#if defined(__AVX512VBMI2__)
#define PK_BITMAP 1 /* the bitmap kernels need byte and float expands */
#endif
#endif

PK_EXPORT int pk_abi_version(void) { return 7; }

PK_EXPORT const char *pk_isa(void) {
#if defined(PK_BITMAP)
    return "avx512+vbmi2";
#elif defined(PK_AVX512)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(PK_NEON)
    return "neon";
#else
    return "scalar";
#endif
}

PK_EXPORT int pk_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

PK_EXPORT int pk_has_bitmap(void) {
#if defined(PK_BITMAP)
    return 1;
#else
    return 0;
#endif
}

/* This thread's number in the parallel team and the team's size (0 of 1 without OpenMP). */
static inline void team(int *part, int *nparts) {
#ifdef _OPENMP
    *part = omp_get_thread_num();
    *nparts = omp_get_num_threads();
#else
    *part = 0;
    *nparts = 1;
#endif
}

/* First row of the part-th of nparts chunks holding about equal numbers of non-zeros. */
static int64_t row_split(const int64_t *rowptr, int64_t rows, int part, int nparts) {
    if (part <= 0) return 0;
    if (part >= nparts) return rows;
    int64_t target = rowptr[rows] / nparts * part + (rowptr[rows] % nparts) * part / nparts;
    int64_t lo = 0, hi = rows; /* smallest r with rowptr[r] >= target */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (rowptr[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static inline float finish(float acc, const float *scale, const float *bias, int64_t r) {
    if (scale) acc *= scale[r];
    if (bias) acc += bias[r];
    return acc;
}

#if defined(PK_AVX512)
static inline __m512i load_cols16(const void *cols, int wide, int64_t k) {
    if (wide) return _mm512_loadu_si512((const void *)((const int32_t *)cols + k));
    const __m256i narrow = _mm256_loadu_si256((const __m256i *)((const uint16_t *)cols + k));
    return _mm512_cvtepu16_epi32(narrow);
}
static inline __m512i load_cols16_masked(const void *cols, int wide, int64_t k, __mmask16 m) {
    if (wide) return _mm512_maskz_loadu_epi32(m, (const int32_t *)cols + k);
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)cols + k));
}
static inline __m512 load_vals16(const void *vals, int int8, int64_t k) {
    if (int8) {
        const __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)vals + k));
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
    return _mm512_loadu_ps((const float *)vals + k);
}
static inline __m512 load_vals16_masked(const void *vals, int int8, int64_t k, __mmask16 m) {
    if (int8) {
        const __m128i q = _mm_maskz_loadu_epi8(m, (const int8_t *)vals + k);
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)vals + k);
}
#endif

/* ------------------------------------------------------------------------- MANY INPUT ROWS */

/* Batches of 2 to a few hundred input rows (a sentence of tokens, a batch of images) are a
 * small matrix-matrix product, not a vector product. Here a block of up to PK_NB input rows is
 * first packed transposed, xt[column][lane] (zero-padded to whole vectors), so that each stored
 * non-zero W[r][c] is one broadcast and PK_NV fused multiply-adds over a contiguous slice
 * xt[c][0..PK_NB): the weights are streamed once per block of input rows, and each output row
 * keeps its PK_NB sums in registers (several interleaved sets of accumulators, so that the
 * multiply-adds do not wait on each other). The same code serves CSR (batch > 1) and the N:M
 * format, float32 or int8 codes; bias, per-row scale and the activation are applied as the
 * sums are stored.
 *
 * One vector type per CPU class: AVX-512 (16 lanes), AVX2 + FMA (8), NEON on aarch64 (4; not
 * run by prunekit's x86 CI), else plain C (1 lane: the portable path and the reference). */
#if defined(PK_AVX512)
#define PK_VW 16
typedef __m512 pk_vf;
#define PK_VZERO() _mm512_setzero_ps()
#define PK_VLOAD(p) _mm512_loadu_ps(p)
#define PK_VSET1(v) _mm512_set1_ps(v)
#define PK_VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define PK_VADD(a, b) _mm512_add_ps(a, b)
#define PK_VSTORE(p, v) _mm512_storeu_ps(p, v)
#elif defined(__AVX2__) && defined(__FMA__)
#define PK_VW 8
typedef __m256 pk_vf;
#define PK_VZERO() _mm256_setzero_ps()
#define PK_VLOAD(p) _mm256_loadu_ps(p)
#define PK_VSET1(v) _mm256_set1_ps(v)
#define PK_VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define PK_VADD(a, b) _mm256_add_ps(a, b)
#define PK_VSTORE(p, v) _mm256_storeu_ps(p, v)
#elif defined(PK_NEON)
#define PK_VW 4
typedef float32x4_t pk_vf;
#define PK_VZERO() vdupq_n_f32(0.f)
#define PK_VLOAD(p) vld1q_f32(p)
#define PK_VSET1(v) vdupq_n_f32(v)
#define PK_VFMA(a, b, c) vfmaq_f32(c, a, b)
#define PK_VADD(a, b) vaddq_f32(a, b)
#define PK_VSTORE(p, v) vst1q_f32(p, v)
#else
#define PK_VW 1
typedef float pk_vf;
#define PK_VZERO() 0.f
#define PK_VLOAD(p) (*(p))
#define PK_VSET1(v) (v)
#define PK_VFMA(a, b, c) ((a) * (b) + (c))
#define PK_VADD(a, b) ((a) + (b))
#define PK_VSTORE(p, v) (*(p) = (v))
#endif
#define PK_NV 4 /* vectors of input rows per block */
#define PK_NB (PK_NV * PK_VW)

/* Activation codes of the epilogue (pk_plan.act). */
#define PK_ACT_NONE 0
#define PK_ACT_RELU 1
#define PK_ACT_GELU 2      /* x * Phi(x), with erf */
#define PK_ACT_GELU_TANH 3 /* the tanh approximation */

/* exp(x) for x <= 0 (x below -87 is taken as -87: the result is then ~1.6e-38, not 0).
 * Branch-free and free of libm calls and of float-to-int conversions, so that loops over it
 * vectorise on every target: 2^n e^r with n = round(x / ln 2) read from the low bits of
 * x / ln 2 + 1.5 * 2^23, ln 2 split in two (Cody-Waite) and e^r, |r| <= ln 2 / 2, by its
 * Taylor series to r^7 (relative error below 1e-7, about float32's rounding). */
static inline float exp_nonpositive(float x) {
    union bits {
        float f;
        int32_t i;
    };
    x = x < -87.f ? -87.f : x;
    const union bits shifted = {.f = x * 1.44269504088896341f + 12582912.f};
    const float n = shifted.f - 12582912.f;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    /* shifted's mantissa holds 2^22 + n; n in [-126, 0] gives a normal power of two */
    const union bits two_n = {.i = (shifted.i - 0x4B400000 + 127) << 23};
    return p * two_n.f;
}

/* x * Phi(x), Phi the normal CDF = erfc(-x / sqrt 2) / 2, with erfc(a) for a >= 0 from the
 * five-term rational form of Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), taken directly
 * on the side where Phi is small so that no 1 - erf cancels. */
static inline float gelu_erf(float x) {
    const float a = (x < 0.f ? -x : x) * 0.70710678118654752f;
    const float t = 1.f / (1.f + 0.3275911f * a);
    float q = 1.061405429f;
    q = q * t - 1.453152027f;
    q = q * t + 1.421413741f;
    q = q * t - 0.284496736f;
    q = q * t + 0.254829592f;
    const float half_erfc = 0.5f * q * t * exp_nonpositive(-a * a); /* Phi(-|x|) */
    return x * (x < 0.f ? half_erfc : 1.f - half_erfc);
}

/* The tanh form, x * (1 + tanh u) / 2 with u = sqrt(2 / pi) (x + 0.044715 x^3), written as
 * x * sigmoid(2u) with e = exp(-2|u|) so that nothing overflows or cancels. */
static inline float gelu_tanh(float x) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    const float e = exp_nonpositive(u < 0.f ? 2.f * u : -2.f * u);
    return x * ((u < 0.f ? e : 1.f) / (1.f + e));
}

/* The activation over y[0..n), in place; each case a plain loop the compiler vectorises. */
static void activate_span(float *y, int64_t n, int act) {
    switch (act) {
    case PK_ACT_RELU:
        for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.f ? 0.f : y[i]; /* NaN stays NaN */
        break;
    case PK_ACT_GELU:
        for (int64_t i = 0; i < n; ++i) y[i] = gelu_erf(y[i]);
        break;
    case PK_ACT_GELU_TANH:
        for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh(y[i]);
        break;
    default: break;
    }
}

/* kinds of index */
#define PK_K_CSR16 0
#define PK_K_CSR32 1
#define PK_K_NM 2
#define PK_K_NM24 3 /* 2:4, decoded a byte (two groups, four slots) at a time */

/* The PK_NB (nv vectors) sums of output row r, for non-zeros k0..k1; vals[k - voff] is the
 * value of non-zero k (int8 codes when i8). kind, nv and i8 are constants once inlined, so the
 * accumulators live in registers. */
static inline __attribute__((always_inline)) void many_row(
    const int kind, const int nv, int64_t k0, int64_t k1, const void *cols, const uint8_t *ib,
    const int lgn, const int lgm, const int bits, const void *vals, const int i8, int64_t voff,
    const float *xt, float *out) {
    /* interleaved sets so that about 8 independent multiply-add chains are in flight */
    enum { UMAX = 8 };
    const int U = nv >= 3 ? 2 : (nv == 2 ? 4 : 8);
    const int stride = nv * PK_VW;
    const int mask = (1 << bits) - 1;
    pk_vf acc[UMAX][PK_NV];
    for (int u = 0; u < U; ++u)
        for (int j = 0; j < nv; ++j) acc[u][j] = PK_VZERO();
#define PK_MANY_COL(kk)                                                                        \
    (kind == PK_K_CSR16   ? (int64_t)((const uint16_t *)cols)[kk]                             \
     : kind == PK_K_CSR32 ? (int64_t)((const int32_t *)cols)[kk]                              \
                          : ((((kk) - k0) >> lgn) << lgm) +                                   \
                                ((ib[(((kk) - k0) * bits) >> 3] >> ((((kk) - k0) * bits) & 7)) & \
                                 mask))
#define PK_MANY_VAL(kk)                                                                        \
    (i8 ? (float)((const int8_t *)vals)[(kk) - voff] : ((const float *)vals)[(kk) - voff])
    int64_t k = k0;
    if (kind == PK_K_NM24) { /* byte q holds slots 4q..4q+3 of groups 2q and 2q+1 */
        const int64_t full = (k1 - k0) / 4;
        for (int64_t q = 0; q < full; ++q) {
            const unsigned b = ib[q];
            const int64_t base = 8 * q, kk = k0 + 4 * q;
            const int64_t c[4] = {base + (b & 3u), base + ((b >> 2) & 3u),
                                  base + 4 + ((b >> 4) & 3u), base + 4 + (b >> 6)};
            for (int j = 0; j < 4; ++j) {
                const float *xp = xt + c[j] * stride;
                const pk_vf v = PK_VSET1(PK_MANY_VAL(kk + j));
                pk_vf *a = acc[j % U];
                for (int jj = 0; jj < nv; ++jj) a[jj] = PK_VFMA(v, PK_VLOAD(xp + jj * PK_VW), a[jj]);
            }
        }
        k = k0 + 4 * full; /* an odd last group: its two slots below, decoded one by one */
    }
    for (; kind != PK_K_NM24 && k + U <= k1; k += U) {
        for (int u = 0; u < U; ++u) {
            const float *xp = xt + PK_MANY_COL(k + u) * stride;
            const pk_vf v = PK_VSET1(PK_MANY_VAL(k + u));
            for (int j = 0; j < nv; ++j) acc[u][j] = PK_VFMA(v, PK_VLOAD(xp + j * PK_VW), acc[u][j]);
        }
    }
    for (; k < k1; ++k) {
        const float *xp = xt + PK_MANY_COL(k) * stride;
        const pk_vf v = PK_VSET1(PK_MANY_VAL(k));
        for (int j = 0; j < nv; ++j) acc[0][j] = PK_VFMA(v, PK_VLOAD(xp + j * PK_VW), acc[0][j]);
    }
#undef PK_MANY_COL
#undef PK_MANY_VAL
    for (int u = 1; u < U; ++u)
        for (int j = 0; j < nv; ++j) acc[0][j] = PK_VADD(acc[0][j], acc[u][j]);
    for (int j = 0; j < nv; ++j) PK_VSTORE(out + j * PK_VW, acc[0][j]);
}

/* Everything spmm_many needs about the weight. */
typedef struct {
    int kind;
    int64_t rows, in, in_pad;
    const int64_t *rowptr; /* CSR */
    const void *cols;      /* CSR */
    const uint8_t *idx;    /* N:M: per row, (in_pad >> lgm) << lgn indices of `bits` bits */
    int lgn, lgm, bits;
    int64_t row_nnz, row_bytes; /* N:M: slots and index bytes per row */
    const void *vals;
    int int8;
    const float *scale, *bias;
    int act;
} many_weight;

/* The first k in [k, k1) whose column is >= lim (CSR columns ascend within a row). */
static inline int64_t csr_chunk_end(const int kind, const void *cols, int64_t k, int64_t k1,
                                    int64_t lim) {
#if defined(__AVX2__)
    if (kind == PK_K_CSR16) {
        const uint16_t *c = (const uint16_t *)cols;
        const __m256i top = _mm256_set1_epi16((short)(uint16_t)(lim - 1)); /* lim <= 65536 here */
        for (; k + 16 <= k1; k += 16) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(c + k));
            /* v <= lim - 1 (unsigned): min(v, top) == v; the lanes below lim form a prefix */
            const unsigned below = (unsigned)_mm256_movemask_epi8(
                _mm256_cmpeq_epi16(_mm256_min_epu16(v, top), v));
            if (below != 0xFFFFFFFFu) return k + __builtin_ctz(~below) / 2;
        }
    } else {
        const int32_t *c = (const int32_t *)cols;
        const __m256i l = _mm256_set1_epi32((int32_t)lim);
        for (; k + 8 <= k1; k += 8) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(c + k));
            const unsigned below = (unsigned)_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(l, v)));
            if (below != 0xFFu) return k + __builtin_ctz(~below & 0xFFu);
        }
    }
#endif
    if (kind == PK_K_CSR16)
        while (k < k1 && (int64_t)((const uint16_t *)cols)[k] < lim) ++k;
    else
        while (k < k1 && (int64_t)((const int32_t *)cols)[k] < lim) ++k;
    return k;
}

#define PK_ROW_BLOCK 64 /* output rows per pass over the column chunks */
#define PK_TILE_ROWS 16 /* output rows per store of the epilogue */
#define PK_AHEAD 4 /* rows of prefetch distance in the chunked CSR sweep */

#if defined(__AVX2__)
/* The 8 x 8 block tile[i0 + k][b0 + j] transposed: v[j] holds rows i0..i0+7 of column b0 + j. */
static inline void tile_block_t(const float (*tile)[PK_NB], int i0, int64_t b0, __m256 v[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        const __m256 a = _mm256_loadu_ps(&tile[i0 + k][b0]);
        const __m256 b = _mm256_loadu_ps(&tile[i0 + k + 1][b0]);
        t[k] = _mm256_unpacklo_ps(a, b); /* a0 b0 a1 b1 | a4 b4 a5 b5 */
        t[k + 1] = _mm256_unpackhi_ps(a, b); /* a2 b2 a3 b3 | a6 b6 a7 b7 */
    }
    for (int k = 0; k < 8; k += 4) { /* four rows' columns 0, 1 (then 2, 3) per lane */
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) { /* rows 0-3 with rows 4-7: low lanes column j, high j + 4 */
        v[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        v[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
}

/* A full tile (PK_TILE_ROWS output rows t0..) into y (pointing at output t0 of input row 0):
 * transposed 8 x 8 in registers and stored 8 outputs at a time, where the scalar loop reads
 * the tile a whole row apart per value (13 us of a 384 -> 1536 layer at 32 rows). Multiply,
 * then add, as the scalar loop does, so both give the same bits. Needs bt <= the tile's
 * width rounded up to 8, which the packing guarantees (stride is a multiple of PK_VW). */
static inline void store_tile(const float (*tile)[PK_NB], int64_t bt, const many_weight *w,
                              float *y, int64_t t0) {
    enum { HALVES = PK_TILE_ROWS / 8 };
    __m256 sc[HALVES], bi[HALVES];
    for (int h = 0; h < HALVES; ++h) {
        sc[h] = w->scale ? _mm256_loadu_ps(w->scale + t0 + 8 * h) : _mm256_set1_ps(1.f);
        bi[h] = w->bias ? _mm256_loadu_ps(w->bias + t0 + 8 * h) : _mm256_setzero_ps();
    }
    /* input rows outermost, so that the halves of each output line are stored back to back:
     * y's rows are `rows` floats apart and, with widths such as 1536, all fall in a few L1
     * sets, which evicted a line between its two halves when the halves came in turn */
    for (int64_t b0 = 0; b0 < bt; b0 += 8) {
        const int64_t kn = bt - b0 < 8 ? bt - b0 : 8;
        __m256 v[HALVES][8];
        for (int h = 0; h < HALVES; ++h) tile_block_t(tile, 8 * h, b0, v[h]);
        for (int64_t k = 0; k < kn; ++k)
            for (int h = 0; h < HALVES; ++h)
                _mm256_storeu_ps(y + (b0 + k) * w->rows + 8 * h,
                                 _mm256_add_ps(_mm256_mul_ps(v[h][k], sc[h]), bi[h]));
    }
}
#endif

/* Output rows r0..r1 against one packed block of bt input rows (nv vectors), over the packed
 * columns [c_lo, c_hi) only (the whole row when they span it). With several column chunks,
 * each row's sums gather in part[(r - r0) * PK_NB ...] (first chunk: stored, then added) and
 * pos[r - r0] is the row's next CSR non-zero; the last chunk applies the epilogue.
 *
 * The epilogue collects PK_TILE_ROWS rows before it stores: y is (batch x rows), so one row's
 * outputs are bt floats a whole output row apart, and with a power-of-two width (1024, 4096)
 * all of them fall in one L1 set; stored row by row, every store missed. A tile stores
 * PK_TILE_ROWS adjacent floats (a cache line) per input row instead. */
static inline __attribute__((always_inline)) void many_rows(
    const int kind, const int nv, const int i8, const many_weight *w, int64_t r0, int64_t r1,
    const float *xt, int64_t bt, float *y, int64_t c_lo, int64_t c_hi, int first, int last,
    float *part, int64_t *pos, float *conv) {
    float tile[PK_TILE_ROWS][PK_NB];
    const int whole = first && last;
    const int64_t stride = (int64_t)nv * PK_VW;
    int64_t t0 = r0; /* first row of the tile being filled */
    for (int64_t r = r0; r < r1; ++r) {
        int64_t k0, k1;
        const uint8_t *ib = NULL;
        const float *xc = xt;
        if (kind == PK_K_NM || kind == PK_K_NM24) {
            const int64_t skip = (c_lo >> w->lgm) << w->lgn; /* slots before the chunk */
            k0 = r * w->row_nnz + skip;
            k1 = r * w->row_nnz + ((c_hi >> w->lgm) << w->lgn);
            ib = w->idx + r * w->row_bytes + ((skip * w->bits) >> 3);
            xc = xt + c_lo * stride; /* N:M columns are decoded relative to the chunk */
        } else if (whole) {
            k0 = w->rowptr[r];
            k1 = w->rowptr[r + 1];
        } else {
            k0 = first ? w->rowptr[r] : pos[r - r0];
            if (!first && r + PK_AHEAD < r1) { /* rows jump: pull a later row's slice early */
                const int64_t ka = pos[r + PK_AHEAD - r0];
                const char *va = (const char *)w->vals + ka * (i8 ? 1 : 4);
                const char *ca = (const char *)w->cols + ka * (kind == PK_K_CSR16 ? 2 : 4);
                __builtin_prefetch(va);
                __builtin_prefetch(va + 64);
                __builtin_prefetch(ca);
            }
            k1 = last ? w->rowptr[r + 1] : csr_chunk_end(kind, w->cols, k0, w->rowptr[r + 1], c_hi);
            pos[r - r0] = k1;
        }
        float *out = last ? tile[r - t0] : tile[0]; /* before the last chunk: scratch */
        if (i8 && nv == 1 && PK_VW == 8) { /* AVX2, one vector of rows: converting the row's
            int8 codes first, vectorised, is 5-10 % faster than a convert per non-zero (with
            AVX-512 it was 7-18 % slower) */
            const int8_t *q = (const int8_t *)w->vals + k0;
            for (int64_t k = 0; k < k1 - k0; ++k) conv[k] = (float)q[k];
            many_row(kind, nv, k0, k1, w->cols, ib, w->lgn, w->lgm, w->bits, conv, 0, k0, xc, out);
        } else {
            many_row(kind, nv, k0, k1, w->cols, ib, w->lgn, w->lgm, w->bits, w->vals, i8, 0, xc,
                     out);
        }
        if (!whole) {
            float *sums = part + (r - r0) * PK_NB;
            if (first)
                for (int64_t b = 0; b < stride; ++b) sums[b] = out[b];
            else
                for (int64_t b = 0; b < stride; ++b) sums[b] += out[b];
            if (!last) continue;
            for (int64_t b = 0; b < stride; ++b) out[b] = sums[b];
        }
        if (r + 1 - t0 < PK_TILE_ROWS && r + 1 < r1) continue;
        const int64_t n = r + 1 - t0; /* rows t0..r of the tile, stored input row by input row */
#if defined(__AVX2__)
        if (n == PK_TILE_ROWS) {
            store_tile((const float(*)[PK_NB])tile, bt, w, y + t0, t0);
            t0 = r + 1;
            continue;
        }
#endif
        for (int64_t b = 0; b < bt; ++b) {
            float *yb = y + b * w->rows + t0;
            for (int64_t i = 0; i < n; ++i) {
                const float sc = w->scale ? w->scale[t0 + i] : 1.f;
                const float bi = w->bias ? w->bias[t0 + i] : 0.f;
                yb[i] = tile[i][b] * sc + bi;
            }
        }
        t0 = r + 1;
    }
}

#define PK_MANY_NV(KIND, I8)                                                                   \
    switch (nv) {                                                                              \
    case 1: many_rows(KIND, 1, I8, w, r0, r1, xt, bt, yb, c_lo, c_hi, first, last, part, pos, conv); break; \
    case 2: many_rows(KIND, 2, I8, w, r0, r1, xt, bt, yb, c_lo, c_hi, first, last, part, pos, conv); break; \
    case 3: many_rows(KIND, 3, I8, w, r0, r1, xt, bt, yb, c_lo, c_hi, first, last, part, pos, conv); break; \
    default: many_rows(KIND, PK_NV, I8, w, r0, r1, xt, bt, yb, c_lo, c_hi, first, last, part, pos, conv); break; \
    }

static void many_dispatch(const many_weight *w, int nv, int64_t r0, int64_t r1, const float *xt,
                          int64_t bt, float *yb, int64_t c_lo, int64_t c_hi, int first, int last,
                          float *part, int64_t *pos, float *conv) {
    switch (w->kind * 2 + (w->int8 ? 1 : 0)) {
    case 0: PK_MANY_NV(PK_K_CSR16, 0); break;
    case 1: PK_MANY_NV(PK_K_CSR16, 1); break;
    case 2: PK_MANY_NV(PK_K_CSR32, 0); break;
    case 3: PK_MANY_NV(PK_K_CSR32, 1); break;
    case 4: PK_MANY_NV(PK_K_NM, 0); break;
    case 5: PK_MANY_NV(PK_K_NM, 1); break;
    case 6: PK_MANY_NV(PK_K_NM24, 0); break;
    default: PK_MANY_NV(PK_K_NM24, 1); break;
    }
}
#undef PK_MANY_NV

/* The packing buffer of the calling thread, kept between calls (no allocation per call), and
 * each team thread's partial sums and row cursors for the column chunks. */
static _Thread_local float *many_buf = NULL;
static _Thread_local size_t many_cap = 0;
static _Thread_local float *part_buf = NULL;
static _Thread_local int64_t *pos_buf = NULL;
static _Thread_local size_t part_cap = 0;

/* Bytes of packed input one column chunk may fill: a 32 KiB L1 data cache, so that the inputs
 * a chunk's non-zeros pick stay in L1 while every output row of a block passes over it. Each
 * chunk costs every row a restart (its sums stored and reloaded, the interleaved accumulators
 * summed), so a layer is cut into at most PK_MAX_CHUNKS chunks, or none. The limit was 4 by
 * an earlier measurement; re-measured with the tiled, vectorised epilogue (below), up to 16
 * chunks pay (Zen 4, benchmarks/kernel_ab.py at 70 %, 32 and 128 rows: AVX2 build
 * 1536 x 384 0.80x the time of 4 at most, 2048 x 2048 0.86x, 3072 x 768 0.83x; AVX-512 at
 * 32 rows 0.80-0.89x). Nor is a
 * weight of more than PK_CHUNK_MAX_WEIGHT bytes cut: it streams from memory, and the chunks'
 * jumps from row to row slow that stream more than L1 gains (4096 x 4096 at 70 %: 20 %).
 * Nor is a row cut into pieces of fewer than PK_CHUNK_MIN_NNZ non-zeros on average: at 90 %
 * sparsity a 256-column chunk holds about 26 per row, and restarting the sums that often cost
 * more than L1 gave (1024 x 1024, 32 and 128 rows: 2-5 % slower than no chunks; at 70 %, 77
 * per chunk, 20 % faster). PRUNEKIT_CHUNK_BYTES overrides the budget (0: never cut). */
#define PK_CHUNK_MAX_WEIGHT (16 << 20)
#define PK_CHUNK_MIN_NNZ 48
#define PK_MAX_CHUNKS 16
static int64_t chunk_bytes = -1;

static int64_t forced_chunk_bytes = -1; /* pk_set_chunk_bytes: -1 the rule above */

/* Force the chunk budget (bytes > 0: always cut, whatever the count or weight size; 0: never
 * cut; -1: back to the rule above and PRUNEKIT_CHUNK_BYTES). For tests and tuning; returns
 * the previous setting. Not thread-safe against running kernels. */
PK_EXPORT int64_t pk_set_chunk_bytes(int64_t bytes) {
    const int64_t before = forced_chunk_bytes;
    forced_chunk_bytes = bytes < 0 ? -1 : bytes;
    return before;
}

/* Read PRUNEKIT_CHUNK_BYTES once, by the calling thread before any parallel region. */
static void read_chunk_budget(void) {
    if (chunk_bytes < 0) {
        const char *env = getenv("PRUNEKIT_CHUNK_BYTES");
        chunk_bytes = env ? atoll(env) : 32768;
    }
}

static int64_t chunk_columns(int64_t stride, int64_t in_pad, int64_t weight_bytes,
                             double row_nnz) {
    const int forced = forced_chunk_bytes >= 0;
    const int64_t budget = forced ? forced_chunk_bytes : chunk_bytes;
    if (budget <= 0 || (!forced && weight_bytes > PK_CHUNK_MAX_WEIGHT)) return in_pad;
    /* a multiple of 64 columns: whole N:M groups and whole index bytes (2:4: two groups) */
    int64_t cols = budget / (int64_t)sizeof(float) / stride / 64 * 64;
    if (cols < 64) cols = 64;
    if (forced) return cols;
    const int64_t chunks = (in_pad + cols - 1) / cols;
    return chunks > PK_MAX_CHUNKS || row_nnz / (double)chunks < PK_CHUNK_MIN_NNZ ? in_pad : cols;
}

static int grow_parts(int64_t rows) {
    const size_t need = (size_t)(rows > 0 ? rows : 1);
    if (need <= part_cap) return 0;
    float *p = (float *)realloc(part_buf, need * PK_NB * sizeof(float));
    if (!p) return -3;
    part_buf = p;
    int64_t *q = (int64_t *)realloc(pos_buf, need * sizeof(int64_t));
    if (!q) return -3;
    pos_buf = q;
    part_cap = need;
    return 0;
}

/* Columns [c0, c1) of the packed block: xt[c * stride + b] = x[b * in + c] for the bt input
 * rows, zeros in the padding rows (b >= bt) and columns (c >= in). Sixteen columns (a cache
 * line of each input row) at a time: column by column, the bt reads of a column lie `in`
 * floats apart, and with in = 1536 all 32 fell in two L1 sets and missed every time (the
 * packing alone took 90 us of a 1536-input layer at 32 rows, one thread). */
static void pack_transposed(const float *x, int64_t in, int64_t bt, int64_t stride, int64_t c0,
                            int64_t c1, float *xt) {
    enum { LINE = 16 };
    for (int64_t c = c0; c < c1; c += LINE) {
        const int64_t ce = c + LINE < c1 ? c + LINE : c1;
        const int64_t real = ce < in ? ce : (c > in ? c : in); /* columns [c, real) exist */
        for (int64_t b = 0; b < bt; ++b) {
            const float *src = x + b * in;
            for (int64_t k = c; k < real; ++k) xt[k * stride + b] = src[k];
        }
        for (int64_t k = c; k < ce; ++k) {
            float *dst = xt + k * stride;
            for (int64_t b = k < real ? bt : 0; b < stride; ++b) dst[b] = 0.f;
        }
    }
}

/* y (batch x rows) = act(scale * (x (batch x in) W^T) + bias). Returns 0, or -3 when the
 * packing buffer cannot be allocated. */
static int spmm_many(const many_weight *w, int64_t batch, const float *x, float *y,
                     int nthreads) {
    const int64_t first_bt = batch < PK_NB ? batch : PK_NB;
    const size_t packed = (size_t)w->in_pad * (size_t)((first_bt + PK_VW - 1) / PK_VW * PK_VW);
    /* int8 codes on AVX2 (the only build many_rows converts them a row at a time on): behind
     * the packed inputs, one row of float values per thread (a row, or its part in a column
     * chunk, holds at most in_pad non-zeros) */
    const size_t team_max = (size_t)(nthreads > 1 ? nthreads : 1);
    const size_t need = packed + (w->int8 && PK_VW == 8 ? team_max * (size_t)w->in_pad : 0);
    if (need > many_cap) {
        float *grown = (float *)realloc(many_buf, need * sizeof(float) + 64);
        if (!grown) return -3;
        many_buf = grown;
        many_cap = need;
    }
    float *xt = (float *)(((uintptr_t)many_buf + 63) & ~(uintptr_t)63); /* whole cache lines */
    const int64_t rows = w->rows, in = w->in, in_pad = w->in_pad;
    const int nm = w->kind == PK_K_NM || w->kind == PK_K_NM24;
    const int64_t nnz = nm ? rows * w->row_nnz : w->rowptr[rows];
    const int64_t weight_bytes = nnz * (w->int8 ? 1 : 4) + (nm ? rows * w->row_bytes
                                                              : nnz * (w->kind == PK_K_CSR32 ? 4 : 2));
    read_chunk_budget();
#pragma omp parallel num_threads(nthreads)
    {
        int part, nparts;
        team(&part, &nparts);
        int64_t r0, r1;
        if (w->kind == PK_K_NM || w->kind == PK_K_NM24) { /* every row costs the same */
            r0 = rows * part / nparts;
            r1 = rows * (part + 1) / nparts;
        } else {
            r0 = row_split(w->rowptr, rows, part, nparts);
            r1 = row_split(w->rowptr, rows, part + 1, nparts);
        }
        const int64_t c0 = in_pad * part / nparts, c1 = in_pad * (part + 1) / nparts;
        float *conv = PK_VW == 8 ? xt + packed + part * in_pad : NULL; /* int8 rows, AVX2 */
        for (int64_t b0 = 0; b0 < batch; b0 += PK_NB) {
            const int64_t bt = batch - b0 < PK_NB ? batch - b0 : PK_NB;
            const int nv = (int)((bt + PK_VW - 1) / PK_VW);
            const int64_t stride = (int64_t)nv * PK_VW;
            pack_transposed(x + b0 * in, in, bt, stride, c0, c1, xt);
            int64_t width = chunk_columns(stride, in_pad, weight_bytes,
                                          rows > 0 ? (double)nnz / (double)rows : 0.0);
            if (width >= in_pad || grow_parts(PK_ROW_BLOCK) != 0) width = in_pad;
#pragma omp barrier
            /* rows in blocks, so that their partial sums stay in L1 and their weights are read
             * as a few dozen sequential streams; within a block, column chunk by chunk */
            for (int64_t rb = r0; rb < r1; rb += PK_ROW_BLOCK) {
                const int64_t re = rb + PK_ROW_BLOCK < r1 ? rb + PK_ROW_BLOCK : r1;
                for (int64_t lo = 0; lo < in_pad; lo += width) {
                    const int64_t hi = lo + width < in_pad ? lo + width : in_pad;
                    many_dispatch(w, nv, rb, re, xt, bt, y + b0 * rows, lo, hi, lo == 0,
                                  hi == in_pad, part_buf, pos_buf, conv);
                }
            }
            /* the activation over this thread's outputs, input row by input row: long spans
             * vectorise well, where 16 outputs at a time in the epilogue ran at half speed */
            for (int64_t b = 0; w->act != PK_ACT_NONE && b < bt; ++b)
                activate_span(y + (b0 + b) * rows + r0, r1 - r0, w->act);
#pragma omp barrier
        }
    }
    return 0;
}

/* One row of a CSR sparse-vector dot product. */
static inline float csr_row_dot(const void *vals, int int8, const void *cols, int wide,
                                int64_t k0, int64_t k1, const float *x) {
#if defined(PK_AVX512)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
        __m512 x0 = _mm512_i32gather_ps(load_cols16(cols, wide, k), x, 4);
        __m512 x1 = _mm512_i32gather_ps(load_cols16(cols, wide, k + 16), x, 4);
        a0 = _mm512_fmadd_ps(load_vals16(vals, int8, k), x0, a0);
        a1 = _mm512_fmadd_ps(load_vals16(vals, int8, k + 16), x1, a1);
    }
    if (k + 16 <= k1) {
        __m512 x0 = _mm512_i32gather_ps(load_cols16(cols, wide, k), x, 4);
        a0 = _mm512_fmadd_ps(load_vals16(vals, int8, k), x0, a0);
        k += 16;
    }
    if (k < k1) {
        __mmask16 m = (__mmask16)((1u << (k1 - k)) - 1u);
        __m512i idx = load_cols16_masked(cols, wide, k, m);
        __m512 x0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x, 4);
        a1 = _mm512_fmadd_ps(load_vals16_masked(vals, int8, k, m), x0, a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    /* AVX2 without AVX-512: 8-wide gathers, the tail in scalar code */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
        __m256i c0, c1;
        __m256 v0, v1;
        if (wide) {
            c0 = _mm256_loadu_si256((const __m256i *)((const int32_t *)cols + k));
            c1 = _mm256_loadu_si256((const __m256i *)((const int32_t *)cols + k + 8));
        } else {
            const uint16_t *c = (const uint16_t *)cols + k;
            c0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)c));
            c1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(c + 8)));
        }
        if (int8) {
            const __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)vals + k));
            v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
        } else {
            v0 = _mm256_loadu_ps((const float *)vals + k);
            v1 = _mm256_loadu_ps((const float *)vals + k + 8);
        }
        a0 = _mm256_fmadd_ps(v0, _mm256_i32gather_ps(x, c0, 4), a0);
        a1 = _mm256_fmadd_ps(v1, _mm256_i32gather_ps(x, c1, 4), a1);
    }
    const __m256 a = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; k < k1; ++k) {
        const int64_t c = wide ? ((const int32_t *)cols)[k] : ((const uint16_t *)cols)[k];
        sum += (int8 ? (float)((const int8_t *)vals)[k] : ((const float *)vals)[k]) * x[c];
    }
    return sum;
#else
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t k = k0;
#define PK_COL(i) (wide ? ((const int32_t *)cols)[i] : (int32_t)((const uint16_t *)cols)[i])
#define PK_VAL(i) (int8 ? (float)((const int8_t *)vals)[i] : ((const float *)vals)[i])
    for (; k + 4 <= k1; k += 4) {
        a0 += PK_VAL(k) * x[PK_COL(k)];
        a1 += PK_VAL(k + 1) * x[PK_COL(k + 1)];
        a2 += PK_VAL(k + 2) * x[PK_COL(k + 2)];
        a3 += PK_VAL(k + 3) * x[PK_COL(k + 3)];
    }
    for (; k < k1; ++k) a0 += PK_VAL(k) * x[PK_COL(k)];
    return (a0 + a1) + (a2 + a3);
#endif
}

static int spmm_csr(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                    const void *cols, int wide, const void *vals, int int8, const float *scale,
                    const float *bias, int act, const float *x, float *y, int nthreads) {
    if (batch > 1) {
        many_weight w = {wide ? PK_K_CSR32 : PK_K_CSR16, rows, in, in, rowptr, cols, NULL, 0, 0,
                         0, 0, 0, vals, int8, scale, bias, act};
        return spmm_many(&w, batch, x, y, nthreads);
    }
#pragma omp parallel num_threads(nthreads)
    {
        int part, nparts;
        team(&part, &nparts);
        int64_t r0 = row_split(rowptr, rows, part, nparts);
        int64_t r1 = row_split(rowptr, rows, part + 1, nparts);
        for (int64_t r = r0; r < r1; ++r)
            y[r] = finish(csr_row_dot(vals, int8, cols, wide, rowptr[r], rowptr[r + 1], x), scale,
                          bias, r);
        activate_span(y + r0, r1 - r0, act);
    }
    return 0;
}

/* CSR: y (batch x rows) = x (batch x in) W^T. xt is unused (kept for the call signature): a
 * batch of several rows is packed inside. Returns 0, or -3 when no packing buffer is had. */
PK_EXPORT int pk_csr_f32(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                         const void *cols, int wide, const float *vals, const float *bias,
                         const float *x, const float *xt, float *y, int nthreads) {
    (void)xt;
    return spmm_csr(rows, in, batch, rowptr, cols, wide, vals, 0, NULL, bias, PK_ACT_NONE, x, y,
                    nthreads);
}

PK_EXPORT int pk_csr_i8(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                        const void *cols, int wide, const int8_t *vals, const float *scale,
                        const float *bias, const float *x, const float *xt, float *y,
                        int nthreads) {
    (void)xt;
    return spmm_csr(rows, in, batch, rowptr, cols, wide, vals, 1, scale, bias, PK_ACT_NONE, x, y,
                    nthreads);
}

#if defined(PK_BITMAP)
/* One row of the bitmap format against one input row: expand the packed values of each block of
 * 16 columns into place and multiply with the 16 inputs of that block. */
static inline float bitmap_row_dot(const uint16_t *masks, int64_t nblocks, int64_t nfull,
                                   const void *vals, int int8, int64_t off, const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t b = 0;
    if (int8) {
        const int8_t *v = (const int8_t *)vals;
        for (; b + 2 <= nblocks; b += 2) {
            __mmask16 m0 = masks[b], m1 = masks[b + 1];
            __m128i q0 = _mm_maskz_expand_epi8(m0, _mm_loadu_si128((const __m128i *)(v + off)));
            off += __builtin_popcount(m0);
            __m128i q1 = _mm_maskz_expand_epi8(m1, _mm_loadu_si128((const __m128i *)(v + off)));
            off += __builtin_popcount(m1);
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)),
                                 _mm512_maskz_loadu_ps(m0, x + 16 * b), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)),
                                 _mm512_maskz_loadu_ps(m1, x + 16 * (b + 1)), a1);
        }
        for (; b < nblocks; ++b) {
            __mmask16 m0 = masks[b];
            __m128i q0 = _mm_maskz_expand_epi8(m0, _mm_loadu_si128((const __m128i *)(v + off)));
            off += __builtin_popcount(m0);
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)),
                                 _mm512_maskz_loadu_ps(m0, x + 16 * b), a0);
        }
    } else {
        const float *v = (const float *)vals;
        for (; b + 2 <= nfull; b += 2) { /* full blocks: x is read unmasked */
            __mmask16 m0 = masks[b], m1 = masks[b + 1];
            _mm_prefetch((const char *)(v + off + 256), _MM_HINT_T0);
            __m512 w0 = _mm512_maskz_expand_ps(m0, _mm512_loadu_ps(v + off));
            off += __builtin_popcount(m0);
            __m512 w1 = _mm512_maskz_expand_ps(m1, _mm512_loadu_ps(v + off));
            off += __builtin_popcount(m1);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 16 * b), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16 * b + 16), a1);
        }
        for (; b < nblocks; ++b) {
            __mmask16 m0 = masks[b];
            __m512 w0 = _mm512_maskz_expand_ps(m0, _mm512_loadu_ps(v + off));
            off += __builtin_popcount(m0);
            a0 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + 16 * b), a0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

#define PK_TILE 8 /* input rows sharing one expanded weight block in the batched bitmap kernel */

static inline __m512 bitmap_block(const uint16_t m, const void *vals, int int8, int64_t off) {
    if (int8) {
        const __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)vals + off));
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_expand_epi8(m, q)));
    }
    return _mm512_maskz_expand_ps(m, _mm512_loadu_ps((const float *)vals + off));
}

/* One row of the bitmap format against up to PK_TILE input rows (x is batch x in). */
static inline void bitmap_row_tile(const uint16_t *masks, int64_t nblocks, int64_t in,
                                   const void *vals, int int8, int64_t off, const float *x,
                                   int64_t tile, float *out) {
    __m512 acc[PK_TILE];
    for (int64_t t = 0; t < tile; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblocks; ++b) {
        const uint16_t m = masks[b];
        const __m512 w = bitmap_block(m, vals, int8, off);
        off += __builtin_popcount(m);
        for (int64_t t = 0; t < tile; ++t)
            acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * in + 16 * b), acc[t]);
    }
    for (int64_t t = 0; t < tile; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}
#endif

/* BITMAP: y (batch x rows) = x (batch x in) W^T.
 * Returns 0, or -1 when this build has no bitmap kernel (needs AVX-512 with VBMI2). */
PK_EXPORT int pk_bitmap(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                        const uint16_t *masks, const void *vals, int int8, const float *scale,
                        const float *bias, const float *x, float *y, int nthreads) {
#if defined(PK_BITMAP)
    const int64_t nblocks = (in + 15) / 16;
#pragma omp parallel num_threads(nthreads)
    {
        int part, nparts;
        team(&part, &nparts);
        /* every row costs nblocks steps whatever its non-zeros: split rows evenly */
        const int64_t r0 = rows * part / nparts, r1 = rows * (part + 1) / nparts;
        if (batch == 1) {
            for (int64_t r = r0; r < r1; ++r)
                y[r] = finish(bitmap_row_dot(masks + r * nblocks, nblocks, in / 16, vals, int8,
                                             rowptr[r], x),
                              scale, bias, r);
        } else {
            float out[PK_TILE];
            for (int64_t b0 = 0; b0 < batch; b0 += PK_TILE) {
                const int64_t tile = batch - b0 < PK_TILE ? batch - b0 : PK_TILE;
                for (int64_t r = r0; r < r1; ++r) {
                    bitmap_row_tile(masks + r * nblocks, nblocks, in, vals, int8, rowptr[r],
                                    x + b0 * in, tile, out);
                    for (int64_t t = 0; t < tile; ++t)
                        y[(b0 + t) * rows + r] = finish(out[t], scale, bias, r);
                }
            }
        }
    }
    return 0;
#else
    (void)rows; (void)in; (void)batch; (void)rowptr; (void)masks; (void)vals; (void)int8;
    (void)scale; (void)bias; (void)x; (void)y; (void)nthreads;
    return -1;
#endif
}

/* ------------------------------------------------------------------------------------ TILES */

#define PK_SLICE 16
#define PK_COLS 32
#define PK_BT 4 /* input rows sharing one pass over the tiles */

#if defined(PK_AVX512)
static inline __m512 tile_vals(const void *vals, int int8, int64_t step) {
    if (int8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)((const int8_t *)vals + step * PK_SLICE))));
    return _mm512_loadu_ps((const float *)vals + step * PK_SLICE);
}

/* One slice of 16 rows against `bt` (1..PK_BT, a constant once inlined) input rows. */
static inline __attribute__((always_inline)) void tiles_slice(
    int64_t s, int64_t rows, int64_t in, int64_t nblocks, const int64_t *slice_ptr,
    const uint8_t *steps, const uint8_t *cols, const void *vals, int int8, const float *scale,
    const float *bias, const float *x, int64_t xstride, float *y, int64_t ystride, const int bt) {
    __m512 acc[PK_BT];
    for (int b = 0; b < bt; ++b) acc[b] = _mm512_setzero_ps();
    int64_t p = slice_ptr[s];
    const uint8_t *st = steps + s * nblocks;
    for (int64_t cb = 0; cb < nblocks; ++cb) {
        const int64_t c0 = cb * PK_COLS;
        __m512 lo[PK_BT], hi[PK_BT];
        if (c0 + PK_COLS <= in) {
            for (int b = 0; b < bt; ++b) {
                lo[b] = _mm512_loadu_ps(x + b * xstride + c0);
                hi[b] = _mm512_loadu_ps(x + b * xstride + c0 + 16);
            }
        } else { /* the last, partial block */
            const int64_t left = in - c0;
            const __mmask16 mlo = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
            const __mmask16 mhi = left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
            for (int b = 0; b < bt; ++b) {
                lo[b] = _mm512_maskz_loadu_ps(mlo, x + b * xstride + c0);
                hi[b] = _mm512_maskz_loadu_ps(mhi, x + b * xstride + c0 + 16);
            }
        }
        const int64_t end = p + st[cb];
        for (; p < end; ++p) {
            const __m512i idx =
                _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cols + p * PK_SLICE)));
            const __m512 v = tile_vals(vals, int8, p);
            for (int b = 0; b < bt; ++b)
                acc[b] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(lo[b], idx, hi[b]), acc[b]);
        }
    }
    const int64_t r0 = s * PK_SLICE;
    const int64_t left = rows - r0;
    const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
    const __m512 sc = scale ? _mm512_maskz_loadu_ps(m, scale + r0) : _mm512_set1_ps(1.f);
    const __m512 bi = bias ? _mm512_maskz_loadu_ps(m, bias + r0) : _mm512_setzero_ps();
    for (int b = 0; b < bt; ++b)
        _mm512_mask_storeu_ps(y + b * ystride + r0, m, _mm512_fmadd_ps(acc[b], sc, bi));
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The input of each lane's column (0..31) out of four registers holding the 32 inputs of the
 * block: a permute in each register picks by the low 3 bits, two blends by bits 3 and 4. */
static inline __m256 pick32(__m256 x0, __m256 x1, __m256 x2, __m256 x3, __m256i idx) {
    const __m256 b3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* bit 3 -> sign */
    const __m256 b4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)); /* bit 4 -> sign */
    const __m256 q01 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(x0, idx),
                                        _mm256_permutevar8x32_ps(x1, idx), b3);
    const __m256 q23 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(x2, idx),
                                        _mm256_permutevar8x32_ps(x3, idx), b3);
    return _mm256_blendv_ps(q01, q23, b4);
}

static inline __m256 tile_vals8(const void *vals, int int8, int64_t off) {
    if (int8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64((const __m128i *)((const int8_t *)vals + off))));
    return _mm256_loadu_ps((const float *)vals + off);
}

/* One slice of 16 rows (two 8-lane halves) against one input row, AVX2. */
static void tiles_slice_avx2(int64_t s, int64_t rows, int64_t in, int64_t nblocks,
                             const int64_t *slice_ptr, const uint8_t *steps, const uint8_t *cols,
                             const void *vals, int int8, const float *scale, const float *bias,
                             const float *x, float *y) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    float pad[PK_COLS];
    int64_t p = slice_ptr[s];
    for (int64_t cb = 0; cb < nblocks; ++cb) {
        const float *xc = x + cb * PK_COLS;
        if (cb * PK_COLS + PK_COLS > in) { /* the last, partial block: zero-padded copy */
            memset(pad, 0, sizeof pad);
            memcpy(pad, xc, (size_t)(in - cb * PK_COLS) * sizeof(float));
            xc = pad;
        }
        const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8);
        const __m256 x2 = _mm256_loadu_ps(xc + 16), x3 = _mm256_loadu_ps(xc + 24);
        const int64_t end = p + steps[s * nblocks + cb];
        for (; p < end; ++p) {
            const uint8_t *c = cols + p * PK_SLICE;
            const __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c));
            const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8)));
            lo = _mm256_fmadd_ps(tile_vals8(vals, int8, p * PK_SLICE), pick32(x0, x1, x2, x3, i0),
                                 lo);
            hi = _mm256_fmadd_ps(tile_vals8(vals, int8, p * PK_SLICE + 8),
                                 pick32(x0, x1, x2, x3, i1), hi);
        }
    }
    float out[PK_SLICE];
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
    for (int i = 0; i < PK_SLICE && s * PK_SLICE + i < rows; ++i)
        y[s * PK_SLICE + i] = finish(out[i], scale, bias, s * PK_SLICE + i);
}
#else
static void tiles_slice_scalar(int64_t s, int64_t rows, int64_t in, int64_t nblocks,
                               const int64_t *slice_ptr, const uint8_t *steps, const uint8_t *cols,
                               const void *vals, int int8, const float *scale, const float *bias,
                               const float *x, float *y) {
    float acc[PK_SLICE] = {0};
    int64_t p = slice_ptr[s];
    for (int64_t cb = 0; cb < nblocks; ++cb) {
        const int64_t end = p + steps[s * nblocks + cb];
        for (; p < end; ++p)
            for (int i = 0; i < PK_SLICE; ++i) {
                const int64_t c = cb * PK_COLS + cols[p * PK_SLICE + i];
                const float v = int8 ? (float)((const int8_t *)vals)[p * PK_SLICE + i]
                                     : ((const float *)vals)[p * PK_SLICE + i];
                if (v != 0.f && c < in) acc[i] += v * x[c];
            }
    }
    for (int i = 0; i < PK_SLICE && s * PK_SLICE + i < rows; ++i)
        y[s * PK_SLICE + i] = finish(acc[i], scale, bias, s * PK_SLICE + i);
}
#endif

/* TILES: y (batch x rows) = x (batch x in) W^T. */
PK_EXPORT void pk_tiles(int64_t rows, int64_t in, int64_t batch, const int64_t *slice_ptr,
                        const uint8_t *steps, const uint8_t *cols, const void *vals, int int8,
                        const float *scale, const float *bias, const float *x, float *y,
                        int nthreads) {
    const int64_t nslices = (rows + PK_SLICE - 1) / PK_SLICE;
    const int64_t nblocks = (in + PK_COLS - 1) / PK_COLS;
#pragma omp parallel num_threads(nthreads)
    {
        int part, nparts;
        team(&part, &nparts);
        /* slices split so each thread gets about the same number of steps */
        const int64_t s0 = row_split(slice_ptr, nslices, part, nparts);
        const int64_t s1 = row_split(slice_ptr, nslices, part + 1, nparts);
#if defined(PK_AVX512)
        for (int64_t b0 = 0; b0 < batch; b0 += PK_BT) {
            const int64_t bt = batch - b0 < PK_BT ? batch - b0 : PK_BT;
            const float *xb = x + b0 * in;
            float *yb = y + b0 * rows;
            for (int64_t s = s0; s < s1; ++s) {
#define PK_SLICE_CALL(BT)                                                                  \
    tiles_slice(s, rows, in, nblocks, slice_ptr, steps, cols, vals, int8, scale, bias, xb, in, \
                yb, rows, BT)
                switch (bt) { /* constant tile widths: the accumulators stay in registers */
                case 1: PK_SLICE_CALL(1); break;
                case 2: PK_SLICE_CALL(2); break;
                case 3: PK_SLICE_CALL(3); break;
                default: PK_SLICE_CALL(PK_BT); break;
                }
#undef PK_SLICE_CALL
            }
        }
#elif defined(__AVX2__) && defined(__FMA__)
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t s = s0; s < s1; ++s)
                tiles_slice_avx2(s, rows, in, nblocks, slice_ptr, steps, cols, vals, int8, scale,
                                 bias, x + b * in, y + b * rows);
#else
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t s = s0; s < s1; ++s)
                tiles_slice_scalar(s, rows, in, nblocks, slice_ptr, steps, cols, vals, int8, scale,
                                   bias, x + b * in, y + b * rows);
#endif
    }
}

/* ------------------------------------------------------------------------------ ONE ENTRY */

/* Everything about a weight that does not change between calls, filled once by the caller:
 * one call then passes six arguments instead of thirteen (the per-call cost of a Python
 * binding grows with the argument count, and at batch 1 it is a visible part of the time). */
typedef struct {
    int64_t format; /* 0 csr, 1 bitmap, 2 tiles, 3 N:M */
    int64_t rows, in, int8, wide;
    const void *index0, *index1, *index2; /* csr: rowptr, cols; bitmap: rowptr, masks;
                                             tiles: slice_ptr, steps, cols; N:M: indices */
    const void *vals;
    const float *scale, *bias;
    int64_t lgn, lgm; /* N:M: log2 N and log2 M (M <= 16) */
    int64_t act;      /* PK_ACT_*: applied after bias */
} pk_plan;

PK_EXPORT int64_t pk_plan_size(void) { return (int64_t)sizeof(pk_plan); }

/* The activation over y, for the kernels that do not apply it as they store. */
static void activate_all(float *y, int64_t n, int act, int nthreads) {
    if (act == PK_ACT_NONE) return;
#pragma omp parallel num_threads(nthreads)
    {
        int part, nparts;
        team(&part, &nparts);
        const int64_t i0 = n * part / nparts, i1 = n * (part + 1) / nparts;
        activate_span(y + i0, i1 - i0, act);
    }
}

/* N:M: every group of M = 2^lgm columns of a row keeps N = 2^lgn slots (values, 0 in unused
 * slots) and their positions in the group, `bits` (2 when M <= 4, else 4) bits each. */
static int spmm_nm(const pk_plan *p, int64_t batch, const float *x, float *y, int nthreads) {
    const int lgn = (int)p->lgn, lgm = (int)p->lgm, bits = lgm <= 2 ? 2 : 4;
    if (lgn < 0 || lgn > lgm || lgm < 1 || lgm > 4) return -2;
    const int64_t groups = (p->in + (1 << lgm) - 1) >> lgm;
    const int64_t row_nnz = groups << lgn;
    many_weight w = {lgn == 1 && lgm == 2 ? PK_K_NM24 : PK_K_NM, p->rows, p->in, groups << lgm, NULL, NULL,
                     (const uint8_t *)p->index0, lgn, lgm, bits, row_nnz,
                     (row_nnz * bits + 7) / 8, p->vals, (int)p->int8, p->scale, p->bias,
                     (int)p->act};
    return spmm_many(&w, batch, x, y, nthreads);
}

PK_EXPORT int pk_run(const pk_plan *p, int64_t batch, const float *x, const float *xt, float *y,
                     int nthreads) {
    int rc;
    (void)xt;
    switch (p->format) {
    case 0:
        return spmm_csr(p->rows, p->in, batch, (const int64_t *)p->index0, p->index1,
                        (int)p->wide, p->vals, (int)p->int8, p->scale, p->bias, (int)p->act, x, y,
                        nthreads);
    case 1:
        rc = pk_bitmap(p->rows, p->in, batch, (const int64_t *)p->index0,
                       (const uint16_t *)p->index1, p->vals, (int)p->int8, p->scale, p->bias, x,
                       y, nthreads);
        break;
    case 2:
        pk_tiles(p->rows, p->in, batch, (const int64_t *)p->index0, (const uint8_t *)p->index1,
                 (const uint8_t *)p->index2, p->vals, (int)p->int8, p->scale, p->bias, x, y,
                 nthreads);
        rc = 0;
        break;
    case 3:
        return spmm_nm(p, batch, x, y, nthreads);
    default:
        return -2;
    }
    if (rc == 0) activate_all(y, batch * p->rows, (int)p->act, nthreads);
    return rc;
}
