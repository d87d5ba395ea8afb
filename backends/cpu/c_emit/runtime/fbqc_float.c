/* fbqc_float.c: the float32 operators of the graph (matrix products, attention, norms, conv). */
#include "fbqc_runtime.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MR 4    /* rows of A per register tile */
#define NR 16   /* columns of B per register tile (two AVX vectors) */
#define KC 256  /* depth of a block: an NR-wide strip of B stays in L1 */

/* C[0..MR)[0..NR) = (first ? 0 : C) + A[0..MR)[0..K) . B[0..K)[0..NR). The accumulators are
 * local arrays that never escape, so the compiler keeps them in vector registers; the j loop
 * vectorises. Each output is still a plain sum over k in order. */
static void tile(long K, const float *A, long lda, const float *B, long ldb, float *C, long ldc, int first) {
    float c0[NR], c1[NR], c2[NR], c3[NR];
    for (int j = 0; j < NR; j++) {
        c0[j] = first ? 0.0f : C[j];
        c1[j] = first ? 0.0f : C[ldc + j];
        c2[j] = first ? 0.0f : C[2 * ldc + j];
        c3[j] = first ? 0.0f : C[3 * ldc + j];
    }
    const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    for (long k = 0; k < K; k++) {
        const float *b = B + k * ldb;
        float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
        for (int j = 0; j < NR; j++) {
            float bj = b[j];
            c0[j] += x0 * bj;
            c1[j] += x1 * bj;
            c2[j] += x2 * bj;
            c3[j] += x3 * bj;
        }
    }
    for (int j = 0; j < NR; j++) {
        C[j] = c0[j];
        C[ldc + j] = c1[j];
        C[2 * ldc + j] = c2[j];
        C[3 * ldc + j] = c3[j];
    }
}

/* Strips of NR columns of B in parallel; within a strip, blocks of KC rows of B, and for each all
 * rows of A, MR at a time. Edge tiles (M % MR rows, N % NR columns) run on zero-padded copies. */
void fbqc_gemm_f32(long M, long N, long K, const float *A, long lda, const float *B, long ldb,
                   float *C, long ldc) {
    if (K == 0) {
        for (long i = 0; i < M; i++) memset(C + i * ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    long strips = (N + NR - 1) / NR;
    FBQC_PARALLEL_FOR_DYNAMIC
    for (long s = 0; s < strips; s++) {
        long j0 = s * NR, nj = N - j0 < NR ? N - j0 : NR;
        const float *Bs = B + j0;
        long ldbs = ldb;
        float *bpad = NULL;
        if (nj < NR) {                                  /* last strip: pad B with zero columns */
            bpad = (float *)fbqc_alloc((size_t)(K * NR) * sizeof(float));
            for (long k = 0; k < K; k++)
                for (long j = 0; j < NR; j++) bpad[k * NR + j] = j < nj ? B[k * ldb + j0 + j] : 0.0f;
            Bs = bpad;
            ldbs = NR;
        }
        for (long k0 = 0; k0 < K; k0 += KC) {
            long kc = K - k0 < KC ? K - k0 : KC;
            for (long i0 = 0; i0 < M; i0 += MR) {
                long mi = M - i0 < MR ? M - i0 : MR;
                if (mi == MR && nj == NR) {
                    tile(kc, A + i0 * lda + k0, lda, Bs + k0 * ldbs, ldbs, C + i0 * ldc + j0, ldc, k0 == 0);
                    continue;
                }
                float apad[MR * KC], cpad[MR * NR];
                memset(apad, 0, sizeof apad);
                memset(cpad, 0, sizeof cpad);
                for (long r = 0; r < mi; r++) {
                    memcpy(apad + r * kc, A + (i0 + r) * lda + k0, (size_t)kc * sizeof(float));
                    if (k0 > 0) memcpy(cpad + r * NR, C + (i0 + r) * ldc + j0, (size_t)nj * sizeof(float));
                }
                tile(kc, apad, kc, Bs + k0 * ldbs, ldbs, cpad, NR, k0 == 0);
                for (long r = 0; r < mi; r++) memcpy(C + (i0 + r) * ldc + j0, cpad + r * NR, (size_t)nj * sizeof(float));
            }
        }
        free(bpad);
    }
}

static float *transposed(const float *w, long rows, long cols) {
    float *t = (float *)fbqc_alloc((size_t)(rows * cols) * sizeof(float));
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < cols; c++) t[c * rows + r] = w[r * cols + c];
    return t;
}

void fbqc_linear_f32(float *y, const float *x, const float *w, const float *b, long M, long K, long N) {
    float *wt = transposed(w, N, K);                      /* (K, N) */
    fbqc_gemm_f32(M, N, K, x, K, wt, N, y, N);
    free(wt);
    if (b)
        for (long i = 0; i < M; i++)
            for (long j = 0; j < N; j++) y[i * N + j] = y[i * N + j] + b[j];
}

void fbqc_bmm_f32(float *out, const float *a, const float *c, long batch, long M, long K, long N) {
    for (long i = 0; i < batch; i++) fbqc_gemm_f32(M, N, K, a + i * M * K, K, c + i * K * N, N, out + i * M * N, N);
}

static void softmax_row(float *y, const float *x, long n) {
    float m = -INFINITY;
    for (long j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    double s = 0.0;
    for (long j = 0; j < n; j++) {
        y[j] = expf(x[j] - m);
        s += y[j];
    }
    float inv = (float)(1.0 / s);
    for (long j = 0; j < n; j++) y[j] = y[j] * inv;
}

void fbqc_softmax_f32(float *y, const float *x, long rows, long cols) {
    FBQC_PARALLEL_FOR
    for (long i = 0; i < rows; i++) softmax_row(y + i * cols, x + i * cols, cols);
}

/* per head: S = Q K^T * scale, P = softmax(S), O = P V */
void fbqc_sdpa_f32(float *out, const float *q, const float *k, const float *v, long bh, long lq,
                   long lk, long d, long dv, float scale) {
    fbqc_sdpa_mask_f32(out, q, k, v, NULL, bh, 1, lq, lk, d, dv, scale, 0, 0, 0);
}

void fbqc_sdpa_mask_f32(float *out, const float *q, const float *k, const float *v, const float *mask,
                        long bh, long heads, long lq, long lk, long d, long dv, float scale,
                        long m_batch, long m_head, long m_row) {
    FBQC_PARALLEL_FOR_DYNAMIC
    for (long h = 0; h < bh; h++) {
        float *kt = transposed(k + h * lk * d, lk, d);    /* (d, lk) */
        float *s = (float *)fbqc_alloc((size_t)(lq * lk) * sizeof(float));
        fbqc_gemm_f32(lq, lk, d, q + h * lq * d, d, kt, lk, s, lk);
        for (long i = 0; i < lq * lk; i++) s[i] = s[i] * scale;
        if (mask) {                                        /* additive: s + mask[b][head][row][col] */
            const float *m = mask + (h / heads) * m_batch + (h % heads) * m_head;
            for (long i = 0; i < lq; i++)
                for (long j = 0; j < lk; j++) s[i * lk + j] = s[i * lk + j] + m[i * m_row + j];
        }
        for (long i = 0; i < lq; i++) softmax_row(s + i * lk, s + i * lk, lk);
        fbqc_gemm_f32(lq, dv, lk, s, lk, v + h * lk * dv, dv, out + h * lq * dv, dv);
        free(s);
        free(kt);
    }
}

void fbqc_layer_norm_f32(float *y, const float *x, const float *w, const float *b, long rows,
                         long cols, float eps) {
    FBQC_PARALLEL_FOR
    for (long i = 0; i < rows; i++) {
        const float *r = x + i * cols;
        double s = 0.0, ss = 0.0;
        for (long j = 0; j < cols; j++) s += r[j];
        double mean = s / (double)cols;
        for (long j = 0; j < cols; j++) ss += (r[j] - mean) * (r[j] - mean);
        float m = (float)mean, rstd = (float)(1.0 / sqrt(ss / (double)cols + (double)eps));
        float *o = y + i * cols;
        for (long j = 0; j < cols; j++) {
            float t = (r[j] - m) * rstd;
            if (w) t = t * w[j];
            if (b) t = t + b[j];
            o[j] = t;
        }
    }
}

void fbqc_rms_norm_f32(float *y, const float *x, const float *w, long rows, long cols, float eps) {
    FBQC_PARALLEL_FOR
    for (long i = 0; i < rows; i++) {
        const float *r = x + i * cols;
        double ss = 0.0;
        for (long j = 0; j < cols; j++) ss += (double)r[j] * r[j];
        float rstd = (float)(1.0 / sqrt((double)(float)(ss / (double)cols) + (double)eps));
        float *o = y + i * cols;
        for (long j = 0; j < cols; j++) o[j] = w ? (r[j] * rstd) * w[j] : r[j] * rstd;
    }
}

void fbqc_sum_rows_f32(float *y, const float *x, long rows, long cols, int mean) {
    for (long i = 0; i < rows; i++) {
        double s = 0.0;
        for (long j = 0; j < cols; j++) s += x[i * cols + j];
        y[i] = (float)(mean ? s / (double)cols : s);
    }
}

void fbqc_sum_rows_f64(double *y, const double *x, long rows, long cols, int mean) {
    for (long i = 0; i < rows; i++) {
        double s = 0.0;
        for (long j = 0; j < cols; j++) s += x[i * cols + j];
        y[i] = mean ? s / (double)cols : s;
    }
}

/* direct convolution; the innermost loop runs over the output columns whose input is in range */
void fbqc_conv2d_f32(float *y, const float *x, const float *w, const float *b, long n, long c, long h,
                     long wd, long o, long kh, long kw, long sh, long sw, long ph, long pw, long dh,
                     long dw, long groups, long oh, long ow) {
    long cg = c / groups, og = o / groups;
    FBQC_PARALLEL_FOR
    for (long no = 0; no < n * o; no++) {
        long bn = no / o, oc = no % o, g = oc / og;
        float *out = y + no * oh * ow;
        for (long i = 0; i < oh * ow; i++) out[i] = b ? b[oc] : 0.0f;
        for (long ci = 0; ci < cg; ci++) {
            const float *in = x + (bn * c + g * cg + ci) * h * wd;
            for (long ky = 0; ky < kh; ky++)
                for (long kx = 0; kx < kw; kx++) {
                    float wv = w[((oc * cg + ci) * kh + ky) * kw + kx];
                    long off = kx * dw - pw;          /* ix = ox * sw + off */
                    long lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
                    long hi = (wd - 1 - off) < 0 ? 0 : (wd - 1 - off) / sw + 1;
                    if (hi > ow) hi = ow;
                    for (long oy = 0; oy < oh; oy++) {
                        long iy = oy * sh - ph + ky * dh;
                        if (iy < 0 || iy >= h) continue;
                        const float *row = in + iy * wd + off;
                        float *orow = out + oy * ow;
                        for (long ox = lo; ox < hi; ox++) orow[ox] = orow[ox] + wv * row[ox * sw];
                    }
                }
        }
    }
}
