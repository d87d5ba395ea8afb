/* fbqc_quant.c: quantize / dequantize and the integer layers (fbqc::qlinear, fbqc::qconv2d_1x1). */
#include "fbqc_runtime.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* clamp(rint(v) + zp, 0, qmax) as a float; NaN becomes 0 */
static float code_of(float v, int32_t zp, int32_t qmax) {
    float q = rintf(v) + (float)zp;
    if (!(q >= 0.0f)) q = 0.0f;
    if (q > (float)qmax) q = (float)qmax;
    return q;
}

void fbqc_quantize(void *q, fbqc_dtype qt, const float *x, long n, float scale, int32_t zp,
                   int32_t qmax) {
    if (qt == FBQC_U8) {
        uint8_t *o = (uint8_t *)q;
        FBQC_PARALLEL_FOR_IF(n >= FBQC_BIG)
        for (long i = 0; i < n; i++) o[i] = (uint8_t)code_of(x[i] / scale, zp, qmax);
    } else {
        int32_t *o = (int32_t *)q;
        FBQC_PARALLEL_FOR_IF(n >= FBQC_BIG)
        for (long i = 0; i < n; i++) o[i] = (int32_t)code_of(x[i] / scale, zp, qmax);
    }
}

void fbqc_dequantize(float *x, const void *q, fbqc_dtype qt, long n, float scale, int32_t zp) {
    if (qt == FBQC_U8) {
        const uint8_t *c = (const uint8_t *)q;
        FBQC_PARALLEL_FOR_IF(n >= FBQC_BIG)
        for (long i = 0; i < n; i++) x[i] = ((float)c[i] - (float)zp) * scale;
    } else {
        const int32_t *c = (const int32_t *)q;
        FBQC_PARALLEL_FOR_IF(n >= FBQC_BIG)
        for (long i = 0; i < n; i++) x[i] = ((float)c[i] - (float)zp) * scale;
    }
}

float fbqc_contract_probe(float a, float b, float c) { return a * b + c; }

/* acc of a 3 x 4 tile: rows x[0..3) against weight rows w[0..4), dot products over k. Both operands
 * are contiguous in k, so the compiler turns the loop into packed int16 multiply-adds (pmaddwd). */
static void tile_i16(int32_t *acc, long N, const int16_t *x, const int16_t *w, long K) {
    const int16_t *x0 = x, *x1 = x0 + K, *x2 = x1 + K;
    const int16_t *w0 = w, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    int32_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
    int32_t s20 = 0, s21 = 0, s22 = 0, s23 = 0;
    for (long k = 0; k < K; k++) {
        int32_t a0 = x0[k], a1 = x1[k], a2 = x2[k];
        int32_t b0 = w0[k], b1 = w1[k], b2 = w2[k], b3 = w3[k];
        s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3;
        s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3;
        s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3;
    }
    acc[0] = s00; acc[1] = s01; acc[2] = s02; acc[3] = s03; acc += N;
    acc[0] = s10; acc[1] = s11; acc[2] = s12; acc[3] = s13; acc += N;
    acc[0] = s20; acc[1] = s21; acc[2] = s22; acc[3] = s23;
}

#define TM 24   /* rows of x per task (a multiple of 3; with K = 1152: 55 KB of int16) */
#define TN 64   /* weight rows per task (a multiple of 4) */

/* acc[M][N] = x[M][K] . w[N][K]^T, int16 x int16 -> int32 (exact: the caller checked the range).
 * Tasks of TM rows x TN channels (both blocks stay in L2) run in parallel; inside, 3 x 4 tiles. */
static void matmul_i16(int32_t *acc, const int16_t *x, const int16_t *w, long M, long K, long N) {
    long mt = (M + TM - 1) / TM, nt = (N + TN - 1) / TN;
    FBQC_PARALLEL_FOR_DYNAMIC
    for (long t = 0; t < mt * nt; t++) {
        long i0 = (t / nt) * TM, j0 = (t % nt) * TN;
        long i1 = i0 + TM < M ? i0 + TM : M, j1 = j0 + TN < N ? j0 + TN : N;
        long jt = j0 + (j1 - j0) / 4 * 4, it = i0 + (i1 - i0) / 3 * 3;
        for (long j = j0; j < jt; j += 4)
            for (long i = i0; i < it; i += 3) tile_i16(acc + i * N + j, N, x + i * K, w + j * K, K);
        for (long i = i0; i < i1; i++)                 /* edges: plain dot products */
            for (long j = (i < it ? jt : j0); j < j1; j++) {
                int32_t s = 0;
                for (long k = 0; k < K; k++) s += (int32_t)x[i * K + k] * w[j * K + k];
                acc[i * N + j] = s;
            }
    }
}

/* the general path (A16 codes or wide weights): int64 sums, wrapped to int32 like an int32 matmul */
static void matmul_i32(int32_t *acc, const int32_t *x, const int32_t *w, long M, long K, long N) {
    FBQC_PARALLEL_FOR
    for (long j = 0; j < N; j++)
        for (long i = 0; i < M; i++) {
            int64_t s = 0;
            for (long k = 0; k < K; k++) s += (int64_t)x[i * K + k] * w[j * K + k];
            acc[i * N + j] = (int32_t)(uint32_t)(uint64_t)s;
        }
}

static void io_file(const char *dir, int layer, const char *what, void *data, size_t bytes, int write) {
    char path[4096];
    snprintf(path, sizeof path, "%s/L%04d.%s", dir, layer, what);
    FILE *f = fopen(path, write ? "wb" : "rb");
    if (!f) fbqc_fail("cannot open %s", path);
    size_t done = write ? fwrite(data, 1, bytes, f) : fread(data, 1, bytes, f);
    if (done != bytes) fbqc_fail("%s: expected %lu bytes", path, (unsigned long)bytes);
    fclose(f);
}

/* x codes in (M, K) order -> y codes (M, N); `acc` receives the int32 accumulators */
static void qlinear_rows(const fbqc_qlayer *L, const void *xq, void *yq, int32_t *acc, long M) {
    long K = L->K, N = L->N;
    if (L->packed_i16) {
        const uint8_t *xc = (const uint8_t *)xq;
        int16_t *x = (int16_t *)fbqc_alloc((size_t)(M * K) * sizeof(int16_t));
        FBQC_PARALLEL_FOR_IF(M * K >= FBQC_BIG)
        for (long i = 0; i < M * K; i++) x[i] = (int16_t)(xc[i] - L->x_zp);
        matmul_i16(acc, x, (const int16_t *)L->packed, M, K, N);
        free(x);
    } else {
        int32_t *x = (int32_t *)fbqc_alloc((size_t)(M * K) * sizeof(int32_t));
        for (long i = 0; i < M * K; i++)
            x[i] = (L->x_dtype == FBQC_U8 ? ((const uint8_t *)xq)[i] : ((const int32_t *)xq)[i]) - L->x_zp;
        matmul_i32(acc, x, (const int32_t *)L->packed, M, K, N);
        free(x);
    }
    /* requantize: y = (float)acc * (x_scale * w_scale[c]) + bias[c], two roundings (no FMA) */
    FBQC_PARALLEL_FOR_IF(M * N >= FBQC_BIG)
    for (long i = 0; i < M; i++) {
        const int32_t *a = acc + i * N;
        for (long c = 0; c < N; c++) {
            float y = (float)a[c] * L->acc_scale[c];
            if (L->b) y = y + L->b[c];
            float q = code_of(y / L->y_scale, L->y_zp, L->y_qmax);
            if (L->y_dtype == FBQC_U8)
                ((uint8_t *)yq)[i * N + c] = (uint8_t)q;
            else
                ((int32_t *)yq)[i * N + c] = (int32_t)q;
        }
    }
}

/* codes of the layer's input: its own, or (--feed) the reference's from a file */
static const void *layer_input(fbqc_ctx *ctx, int layer, const void *xq, size_t bytes, void **fed) {
    *fed = NULL;
    if (!ctx->feed_dir) return xq;
    *fed = fbqc_alloc(bytes);
    io_file(ctx->feed_dir, layer, "xq", *fed, bytes, 0);
    return *fed;
}

static void dump(fbqc_ctx *ctx, int layer, const void *xq, size_t xbytes, const int32_t *acc,
                 const void *yq, long ny, fbqc_dtype yt) {
    if (!ctx->dump_dir) return;
    io_file(ctx->dump_dir, layer, "xq", (void *)xq, xbytes, 1);
    io_file(ctx->dump_dir, layer, "acc", (void *)acc, (size_t)ny * sizeof(int32_t), 1);
    io_file(ctx->dump_dir, layer, "yq", (void *)yq, (size_t)ny * fbqc_dtype_size(yt), 1);
}

void fbqc_qlinear(fbqc_ctx *ctx, int layer, const void *xq, void *yq, long M) {
    const fbqc_qlayer *L = &FBQC_MODEL.layers[layer];
    size_t xbytes = (size_t)(M * L->K) * fbqc_dtype_size(L->x_dtype);
    void *fed;
    xq = layer_input(ctx, layer, xq, xbytes, &fed);
    int32_t *acc = (int32_t *)fbqc_alloc((size_t)(M * L->N) * sizeof(int32_t));
    qlinear_rows(L, xq, yq, acc, M);
    dump(ctx, layer, xq, xbytes, acc, yq, M * L->N, L->y_dtype);
    free(acc);
    free(fed);
}

/* (batch, rows, cols) -> (batch, cols, rows) */
static void transpose(void *dst, const void *src, int elem, long batch, long rows, long cols) {
    long shape[3] = {batch, cols, rows};
    long ds[3] = {rows * cols, rows, 1};
    long ss[3] = {rows * cols, 1, cols};
    fbqc_copy(dst, src, elem, 3, shape, ds, ss);
}

void fbqc_qconv1x1(fbqc_ctx *ctx, int layer, const void *xq, void *yq, long batch, long hw) {
    const fbqc_qlayer *L = &FBQC_MODEL.layers[layer];
    int xe = (int)fbqc_dtype_size(L->x_dtype), ye = (int)fbqc_dtype_size(L->y_dtype);
    long M = batch * hw;
    size_t xbytes = (size_t)(M * L->K) * (size_t)xe;
    void *fed;
    xq = layer_input(ctx, layer, xq, xbytes, &fed);
    void *x_rows = fbqc_alloc(xbytes), *y_rows = fbqc_alloc((size_t)(M * L->N) * (size_t)ye);
    int32_t *acc_rows = (int32_t *)fbqc_alloc((size_t)(M * L->N) * sizeof(int32_t));
    transpose(x_rows, xq, xe, batch, L->K, hw);           /* NCHW -> (N*H*W, C) */
    qlinear_rows(L, x_rows, y_rows, acc_rows, M);
    transpose(yq, y_rows, ye, batch, hw, L->N);           /* back to NCHW */
    if (ctx->dump_dir) {
        int32_t *acc = (int32_t *)fbqc_alloc((size_t)(M * L->N) * sizeof(int32_t));
        transpose(acc, acc_rows, 4, batch, hw, L->N);
        dump(ctx, layer, xq, xbytes, acc, yq, M * L->N, L->y_dtype);
        free(acc);
    }
    free(x_rows);
    free(y_rows);
    free(acc_rows);
    free(fed);
}
