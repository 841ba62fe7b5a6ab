/* A stand-alone check of prunekit's sparse kernels, for builds that Python cannot load: the
 * aarch64 (NEON) build, cross-compiled and run under qemu-user by tests/test_kernel_paths.py.
 *
 * It includes the kernel source, builds random weights in CSR (uint16 columns) and N:M (2:4,
 * and 2:8 with 4-bit positions) layouts, float32 and int8 codes with per-row scales, runs
 * pk_run at batch 1 and at many input rows (block tails included) with each activation, and
 * compares every output with a float64 loop. Prints "isa=<path> cases=<n> worst=<error>" and
 * exits 1 on the first mismatch. */
#include "sparse_kernels.c"

#include <math.h> /* the float64 references: erf, tanh, sqrt, fabs */
#include <stdio.h>

static uint32_t seed = 12345u;
static uint32_t next_u32(void) {
    seed ^= seed << 13;
    seed ^= seed >> 17;
    seed ^= seed << 5;
    return seed;
}
static float uniform(void) { return (float)(next_u32() % 2000001u) / 1000000.f - 1.f; }

static double act_ref(double v, int act) {
    switch (act) {
    case PK_ACT_RELU: return v < 0 ? 0 : v;
    case PK_ACT_GELU: return 0.5 * v * (1 + erf(v / sqrt(2.0)));
    case PK_ACT_GELU_TANH:
        return 0.5 * v * (1 + tanh(sqrt(2.0 / 3.141592653589793) * (v + 0.044715 * v * v * v)));
    default: return v;
    }
}

int main(void) {
    const int64_t shapes[][3] = {{37, 100, 1}, {37, 100, 8}, {19, 130, 33}, {64, 384, 32},
                                 {23, 66, 130}, {5, 7, 3}, {40, 1000, 65}};
    int cases = 0;
    double worst = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
        const int64_t rows = shapes[s][0], in = shapes[s][1], batch = shapes[s][2];
        for (int format = 0; format < 3; ++format) { /* csr, 2:4, 2:8 */
            const int m = format == 2 ? 8 : 4, lgm = format == 2 ? 3 : 2, n = 2;
            const int64_t groups = (in + m - 1) / m, row_nnz = groups * n;
            const int bits = m <= 4 ? 2 : 4;
            const int64_t row_bytes = (row_nnz * bits + 7) / 8;
            float *w = calloc((size_t)(rows * in), sizeof(float));
            float *x = malloc((size_t)(batch * in) * sizeof(float));
            float *bias = malloc((size_t)rows * sizeof(float));
            float *scale = malloc((size_t)rows * sizeof(float));
            float *vals = calloc((size_t)(rows * (format ? row_nnz : in) + 64), sizeof(float));
            int8_t *codes = calloc((size_t)(rows * (format ? row_nnz : in) + 64), 1);
            uint16_t *cols = calloc((size_t)(rows * in + 64), sizeof(uint16_t));
            uint8_t *idx = calloc((size_t)(rows * row_bytes + 8), 1);
            int64_t *rowptr = calloc((size_t)rows + 1, sizeof(int64_t));
            int8_t *wq = calloc((size_t)(rows * in), 1);
            float *y = malloc((size_t)(batch * rows) * sizeof(float));
            for (int64_t i = 0; i < batch * in; ++i) x[i] = uniform();
            for (int64_t r = 0; r < rows; ++r) {
                bias[r] = uniform();
                scale[r] = 0.001f + 0.01f * (uniform() + 1.f);
                if (format == 0) { /* CSR: a density that grows with the row */
                    for (int64_t c = 0; c < in; ++c)
                        if ((double)(next_u32() % 1000u) < 1000.0 * (double)r / (double)rows) {
                            w[r * in + c] = uniform();
                            wq[r * in + c] = (int8_t)((int)(next_u32() % 255u) - 127);
                            vals[rowptr[r + 1]] = w[r * in + c];
                            codes[rowptr[r + 1]] = wq[r * in + c];
                            cols[rowptr[r + 1]++] = (uint16_t)c;
                        }
                    if (r + 1 < rows) rowptr[r + 2] = rowptr[r + 1];
                } else { /* N:M: two distinct positions per group, the last group partial */
                    for (int64_t g = 0; g < groups; ++g) {
                        int p0 = (int)(next_u32() % (uint32_t)m), p1 = (int)(next_u32() % (uint32_t)m);
                        if (p1 == p0) p1 = (p0 + 1) % m;
                        const int pos[2] = {p0, p1};
                        for (int j = 0; j < n; ++j) {
                            const int64_t slot = g * n + j, c = g * m + pos[j];
                            float v = c < in ? uniform() : 0.f;
                            int8_t q = c < in ? (int8_t)((int)(next_u32() % 255u) - 127) : 0;
                            if (c < in) {
                                w[r * in + c] = v;
                                wq[r * in + c] = q;
                            }
                            vals[r * row_nnz + slot] = v;
                            codes[r * row_nnz + slot] = q;
                            idx[r * row_bytes + slot * bits / 8] |=
                                (uint8_t)(pos[j] << ((slot * bits) % 8));
                        }
                    }
                }
            }
            for (int i8 = 0; i8 < 2; ++i8) {
                for (int act = 0; act < 4; ++act) {
                    pk_plan p;
                    memset(&p, 0, sizeof p);
                    p.format = format == 0 ? 0 : 3;
                    p.rows = rows;
                    p.in = in;
                    p.int8 = i8;
                    p.index0 = format == 0 ? (const void *)rowptr : (const void *)idx;
                    p.index1 = cols;
                    p.vals = i8 ? (const void *)codes : (const void *)vals;
                    p.scale = i8 ? scale : NULL;
                    p.bias = bias;
                    p.lgn = 1;
                    p.lgm = lgm;
                    p.act = act;
                    for (int64_t b = 1; b <= batch; b = b == batch ? batch + 1 : batch) {
                        if (pk_run(&p, b, x, NULL, y, 1) != 0) {
                            printf("pk_run failed\n");
                            return 1;
                        }
                        for (int64_t bb = 0; bb < b; ++bb)
                            for (int64_t r = 0; r < rows; ++r) {
                                double acc = 0;
                                for (int64_t c = 0; c < in; ++c)
                                    acc += (i8 ? (double)wq[r * in + c] : (double)w[r * in + c]) *
                                           (double)x[bb * in + c];
                                const double ref = act_ref(
                                    (i8 ? acc * (double)scale[r] : acc) + (double)bias[r], act);
                                const double err = fabs((double)y[bb * rows + r] - ref);
                                if (err > worst) worst = err;
                                if (!(err <= 1e-4 * (1 + fabs(ref)))) {
                                    printf("mismatch: rows %lld in %lld batch %lld format %d "
                                           "int8 %d act %d row %lld: %g vs %g\n",
                                           (long long)rows, (long long)in, (long long)b, format,
                                           i8, act, (long long)r, y[bb * rows + r], ref);
                                    return 1;
                                }
                            }
                        ++cases;
                    }
                }
            }
            free(w); free(x); free(bias); free(scale); free(vals); free(codes); free(cols);
            free(idx); free(rowptr); free(wq); free(y);
        }
    }
    printf("isa=%s cases=%d worst=%.3g\n", pk_isa(), cases, worst);
    return 0;
}
