/* fbqc_runtime.h: the fixed part of the C reference program emitted by `fbqc compile --emit-c`.
 *
 * model.c (generated) runs the INTEGER graph as a sequence of calls into these kernels. Every tensor
 * is a contiguous row-major buffer; view operations are aliases or strided copies. Plain C99, libc
 * and libm only. Numerics follow fbqc's contract (DESIGN.md section 3):
 *
 *   acc = sum_k (xq[k] - x_zp) * (wq[c][k] - w_zp[c])                      int32
 *   y   = (float)acc * (x_scale * w_scale[c]) + bias[c]                    fp32, product rounded first
 *   yq  = clamp(rint(y / y_scale) + y_zp, 0, y_qmax)                       half to even
 *
 * Build with floating-point contraction off (-ffp-contract=off; GCC's default in -std=c99 mode) so
 * that the multiply and the add above are rounded separately, as in PyTorch. */
#ifndef FBQC_RUNTIME_H
#define FBQC_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* OpenMP when built with -fopenmp, plain loops otherwise */
#define FBQC_PRAGMA(x) _Pragma(#x)
#ifdef _OPENMP
#define FBQC_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#define FBQC_PARALLEL_FOR_DYNAMIC _Pragma("omp parallel for schedule(dynamic, 1)")
#define FBQC_PARALLEL_FOR_IF(cond) FBQC_PRAGMA(omp parallel for schedule(static) if(cond))
#else
#define FBQC_PARALLEL_FOR
#define FBQC_PARALLEL_FOR_DYNAMIC
#define FBQC_PARALLEL_FOR_IF(cond)
#endif
#define FBQC_BIG (1L << 15)   /* loops over at least this many elements are worth splitting */

/* element types of tensors in weights.bin, inputs.bin, outputs.bin and dumps (little endian) */
typedef enum {
    FBQC_F32, FBQC_F64, FBQC_I64, FBQC_I32, FBQC_I16, FBQC_I8, FBQC_U8, FBQC_BOOL, FBQC_INT4
} fbqc_dtype;

/* one tensor of weights.bin (offset from the start of the file) */
typedef struct {
    const char *name;
    fbqc_dtype dtype;
    long offset, nbytes, numel;
} fbqc_weight_info;

/* one model input or output: inputs.bin / outputs.bin are these tensors back to back */
typedef struct {
    const char *name;
    fbqc_dtype dtype;
    long numel;
    const char *shape;          /* for messages, e.g. "1x4x16x16" */
} fbqc_io_info;

enum { FBQC_LINEAR = 0, FBQC_CONV1X1 = 1 };

/* one quantized layer (fbqc::qlinear or fbqc::qconv2d_1x1) */
typedef struct {
    const char *name;           /* the layer's module path */
    int kind;                   /* FBQC_LINEAR: x (M, K) -> y (M, N); FBQC_CONV1X1: NCHW */
    long K, N;                  /* input and output features (channels) */
    int weight;                 /* weights-table index of wq (N, K) */
    int w_scale;                /* index of the per-channel weight scales, float32 (N) */
    int w_zp;                   /* index of the weight zero points, int32 (N), or -1 (symmetric) */
    int bias;                   /* index of the float32 bias (N), or -1 */
    fbqc_dtype x_dtype, y_dtype;   /* code storage: FBQC_U8 (A8) or FBQC_I32 (A16) */
    float x_scale;
    int32_t x_zp;
    float y_scale;
    int32_t y_zp, y_qmax;
    /* filled by fbqc_prepare(): */
    void *packed;               /* wq - w_zp, (N, K), int16 (fast path) or int32 */
    int packed_i16;             /* 1: int16 weights and activations, 0: int32 */
    float *acc_scale;           /* x_scale * w_scale[c], rounded to float32 */
    const float *b;             /* the bias, or NULL */
} fbqc_qlayer;

/* what a run needs: the weights in memory and the options of the runner */
typedef struct {
    unsigned char *blob;        /* weights.bin, whole */
    long blob_size;
    const char *dump_dir;       /* --dump: write each layer's xq, int32 acc and yq here */
    const char *feed_dir;       /* --feed: read each layer's input codes from here (teacher forcing) */
} fbqc_ctx;

/* the generated model (model.c) */
typedef struct {
    const char *name;
    const char *model_id;       /* must match the id in the weights.bin header */
    int n_weights;
    const fbqc_weight_info *weights;
    int n_inputs, n_outputs;
    const fbqc_io_info *inputs, *outputs;
    int n_layers;
    fbqc_qlayer *layers;
    void (*forward)(fbqc_ctx *ctx, const void *const *inputs, void *const *outputs);
} fbqc_model;

extern fbqc_model FBQC_MODEL;

/* ---- memory and layout (fbqc_tensor.c) ---- */
void fbqc_fail(const char *fmt, ...);
void *fbqc_alloc(size_t bytes);
size_t fbqc_dtype_size(fbqc_dtype t);
const void *fbqc_weight(const fbqc_ctx *ctx, int index);
/* dst[i] = src[i] over an ndim index space, both sides strided (in elements of `elem` bytes) */
void fbqc_copy(void *dst, const void *src, int elem, int ndim, const long *shape,
               const long *dst_strides, const long *src_strides);
void fbqc_fill(void *dst, int elem, long n, const void *value);
void fbqc_load_weights(fbqc_ctx *ctx, const char *path);
void fbqc_prepare(fbqc_ctx *ctx);

/* ---- float kernels (fbqc_float.c) ---- */
/* C[M][N] = A[M][K] . B[K][N] (row-major, leading dimensions lda, ldb, ldc) */
void fbqc_gemm_f32(long M, long N, long K, const float *A, long lda, const float *B, long ldb,
                   float *C, long ldc);
/* y[M][N] = x[M][K] . w[N][K]^T + b[N] (b may be NULL) */
void fbqc_linear_f32(float *y, const float *x, const float *w, const float *b, long M, long K, long N);
/* out[b] = a[b] . c[b] for b < batch; a (M, K), c (K, N) */
void fbqc_bmm_f32(float *out, const float *a, const float *c, long batch, long M, long K, long N);
/* scaled dot-product attention, no mask: out (BH, Lq, Dv) */
void fbqc_sdpa_f32(float *out, const float *q, const float *k, const float *v, long bh, long lq,
                   long lk, long d, long dv, float scale);
/* the same with an additive float mask: element (b, head, i, j) at b*m_batch + head*m_head + i*m_row + j
   (a stride of 0 broadcasts that dimension); query head h is (b, head) = (h / heads, h % heads) */
void fbqc_sdpa_mask_f32(float *out, const float *q, const float *k, const float *v, const float *mask,
                        long bh, long heads, long lq, long lk, long d, long dv, float scale,
                        long m_batch, long m_head, long m_row);
void fbqc_softmax_f32(float *y, const float *x, long rows, long cols);
void fbqc_layer_norm_f32(float *y, const float *x, const float *w, const float *b, long rows,
                         long cols, float eps);
void fbqc_rms_norm_f32(float *y, const float *x, const float *w, long rows, long cols, float eps);
void fbqc_sum_rows_f32(float *y, const float *x, long rows, long cols, int mean);
void fbqc_sum_rows_f64(double *y, const double *x, long rows, long cols, int mean);
/* 2-D convolution, NCHW input, OIHW weights (I = C / groups) */
void fbqc_conv2d_f32(float *y, const float *x, const float *w, const float *b, long n, long c, long h,
                     long wd, long o, long kh, long kw, long sh, long sw, long ph, long pw, long dh,
                     long dw, long groups, long oh, long ow);

/* ---- integer kernels (fbqc_quant.c) ---- */
void fbqc_quantize(void *q, fbqc_dtype qt, const float *x, long n, float scale, int32_t zp,
                   int32_t qmax);
void fbqc_dequantize(float *x, const void *q, fbqc_dtype qt, long n, float scale, int32_t zp);
/* layer `layer` of FBQC_MODEL: y codes (M, N) from x codes (M, K) */
void fbqc_qlinear(fbqc_ctx *ctx, int layer, const void *xq, void *yq, long M);
/* NCHW codes: x (batch, K, hw) -> y (batch, N, hw) */
void fbqc_qconv1x1(fbqc_ctx *ctx, int layer, const void *xq, void *yq, long batch, long hw);
/* a*b+c with the build's floating-point flags: detects contraction (FMA) at start-up */
float fbqc_contract_probe(float a, float b, float c);

#endif
