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

#define PK_EXPORT __attribute__((visibility("default")))
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PK_AVX512 1
#if defined(__AVX512VBMI2__)
#define PK_BITMAP 1 /* the bitmap kernels need byte and float expands */
#endif
#endif

PK_EXPORT int pk_abi_version(void) { return 5; }

PK_EXPORT const char *pk_isa(void) {
#if defined(PK_BITMAP)
    return "avx512+vbmi2";
#elif defined(PK_AVX512)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
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

/* y[b][r] for a batch of rows: x is given transposed, xt[in][batch]; acc has batch floats. */
static inline void csr_row_batch(const void *vals, int int8, const void *cols, int wide,
                                 int64_t k0, int64_t k1, const float *xt, int64_t batch,
                                 float *acc) {
    memset(acc, 0, (size_t)batch * sizeof(float));
    for (int64_t k = k0; k < k1; ++k) {
        const float v = int8 ? (float)((const int8_t *)vals)[k] : ((const float *)vals)[k];
        const int64_t c = wide ? ((const int32_t *)cols)[k] : ((const uint16_t *)cols)[k];
        const float *xr = xt + c * batch;
        for (int64_t b = 0; b < batch; ++b) acc[b] += v * xr[b];
    }
}

static void spmm_csr(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                     const void *cols, int wide, const void *vals, int int8, const float *scale,
                     const float *bias, const float *x, const float *xt, float *y, int nthreads) {
    (void)in;
#pragma omp parallel num_threads(nthreads)
    {
        int part, nparts;
        team(&part, &nparts);
        int64_t r0 = row_split(rowptr, rows, part, nparts);
        int64_t r1 = row_split(rowptr, rows, part + 1, nparts);
        if (batch == 1) {
            for (int64_t r = r0; r < r1; ++r)
                y[r] = finish(csr_row_dot(vals, int8, cols, wide, rowptr[r], rowptr[r + 1], x),
                              scale, bias, r);
        } else {
            float *acc = (float *)malloc((size_t)batch * sizeof(float));
            if (acc) {
                for (int64_t r = r0; r < r1; ++r) {
                    csr_row_batch(vals, int8, cols, wide, rowptr[r], rowptr[r + 1], xt, batch, acc);
                    for (int64_t b = 0; b < batch; ++b)
                        y[b * rows + r] = finish(acc[b], scale, bias, r);
                }
                free(acc);
            }
        }
    }
}

/* CSR: y (batch x rows) = x (batch x in) W^T. For batch > 1, xt must hold x transposed. */
PK_EXPORT void pk_csr_f32(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                          const void *cols, int wide, const float *vals, const float *bias,
                          const float *x, const float *xt, float *y, int nthreads) {
    spmm_csr(rows, in, batch, rowptr, cols, wide, vals, 0, NULL, bias, x, xt, y, nthreads);
}

PK_EXPORT void pk_csr_i8(int64_t rows, int64_t in, int64_t batch, const int64_t *rowptr,
                         const void *cols, int wide, const int8_t *vals, const float *scale,
                         const float *bias, const float *x, const float *xt, float *y,
                         int nthreads) {
    spmm_csr(rows, in, batch, rowptr, cols, wide, vals, 1, scale, bias, x, xt, y, nthreads);
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
    int64_t format; /* 0 csr, 1 bitmap, 2 tiles */
    int64_t rows, in, int8, wide;
    const void *index0, *index1, *index2; /* csr: rowptr, cols; bitmap: rowptr, masks;
                                             tiles: slice_ptr, steps, cols */
    const void *vals;
    const float *scale, *bias;
} pk_plan;

PK_EXPORT int64_t pk_plan_size(void) { return (int64_t)sizeof(pk_plan); }

PK_EXPORT int pk_run(const pk_plan *p, int64_t batch, const float *x, const float *xt, float *y,
                     int nthreads) {
    switch (p->format) {
    case 0:
        spmm_csr(p->rows, p->in, batch, (const int64_t *)p->index0, p->index1, (int)p->wide,
                 p->vals, (int)p->int8, p->scale, p->bias, x, xt, y, nthreads);
        return 0;
    case 1:
        return pk_bitmap(p->rows, p->in, batch, (const int64_t *)p->index0,
                         (const uint16_t *)p->index1, p->vals, (int)p->int8, p->scale, p->bias, x,
                         y, nthreads);
    case 2:
        pk_tiles(p->rows, p->in, batch, (const int64_t *)p->index0, (const uint8_t *)p->index1,
                 (const uint8_t *)p->index2, p->vals, (int)p->int8, p->scale, p->bias, x, y,
                 nthreads);
        return 0;
    default:
        return -2;
    }
}
