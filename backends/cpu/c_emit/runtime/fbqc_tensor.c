/* fbqc_tensor.c: memory, strided copies, the weights file and layer preparation. */
#include "fbqc_runtime.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void fbqc_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

void *fbqc_alloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) fbqc_fail("out of memory allocating %lu bytes", (unsigned long)bytes);
    return p;
}

size_t fbqc_dtype_size(fbqc_dtype t) {
    switch (t) {
    case FBQC_F64: case FBQC_I64: return 8;
    case FBQC_F32: case FBQC_I32: return 4;
    case FBQC_I16: return 2;
    default: return 1;          /* I8, U8, BOOL (INT4 is packed: handled by fbqc_prepare) */
    }
}

const void *fbqc_weight(const fbqc_ctx *ctx, int index) {
    return ctx->blob + FBQC_MODEL.weights[index].offset;
}

/* The innermost dimension is a plain loop; the outer ones are walked with an index counter. */
#define FBQC_COPY_LOOP(T)                                                                    \
    do {                                                                                     \
        T *d = (T *)dst;                                                                     \
        const T *s = (const T *)src;                                                         \
        long inner = shape[ndim - 1], ds = dst_strides[ndim - 1], ss = src_strides[ndim - 1]; \
        FBQC_PARALLEL_FOR_IF(outer * inner >= FBQC_BIG && outer > 1)                         \
        for (long o = 0; o < outer; o++) {                                                   \
            long rem = o, doff = 0, soff = 0;                                                \
            for (int k = ndim - 2; k >= 0; k--) {                                            \
                long i = rem % shape[k];                                                     \
                rem /= shape[k];                                                             \
                doff += i * dst_strides[k];                                                  \
                soff += i * src_strides[k];                                                  \
            }                                                                                \
            if (ds == 1 && ss == 1)                                                          \
                memcpy(d + doff, s + soff, (size_t)inner * sizeof(T));                       \
            else                                                                             \
                for (long i = 0; i < inner; i++) d[doff + i * ds] = s[soff + i * ss];        \
        }                                                                                    \
    } while (0)

void fbqc_copy(void *dst, const void *src, int elem, int ndim, const long *shape,
               const long *dst_strides, const long *src_strides) {
    long outer = 1;
    for (int k = 0; k < ndim - 1; k++) outer *= shape[k];
    if (ndim == 0) {
        memcpy(dst, src, (size_t)elem);
        return;
    }
    switch (elem) {
    case 1: FBQC_COPY_LOOP(uint8_t); break;
    case 2: FBQC_COPY_LOOP(uint16_t); break;
    case 4: FBQC_COPY_LOOP(uint32_t); break;
    case 8: FBQC_COPY_LOOP(uint64_t); break;
    default: fbqc_fail("fbqc_copy: element size %d", elem);
    }
}

void fbqc_fill(void *dst, int elem, long n, const void *value) {
    unsigned char *d = (unsigned char *)dst;
    for (long i = 0; i < n; i++) memcpy(d + i * elem, value, (size_t)elem);
}

/* weights.bin: a 64-byte header (magic, version, tensor count, data bytes, model id), then the
 * tensors at the offsets of the table in model.c (and weights.json). */
void fbqc_load_weights(fbqc_ctx *ctx, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) fbqc_fail("cannot open weights file %s (pass --weights FILE)", path);
    if (fseek(f, 0, SEEK_END) != 0) fbqc_fail("cannot seek in %s", path);
    long size = ftell(f);
    rewind(f);
    if (size < 64) fbqc_fail("%s: not an fbqc weights file (%ld bytes)", path, size);
    ctx->blob = (unsigned char *)fbqc_alloc((size_t)size);
    ctx->blob_size = size;
    if (fread(ctx->blob, 1, (size_t)size, f) != (size_t)size) fbqc_fail("cannot read %s", path);
    fclose(f);
    if (memcmp(ctx->blob, "FBQCWTS1", 8) != 0) fbqc_fail("%s: not an fbqc weights file", path);
    char id[17];
    memcpy(id, ctx->blob + 24, 16);
    id[16] = '\0';
    if (strcmp(id, FBQC_MODEL.model_id) != 0)
        fbqc_fail("%s belongs to model %s, this program was generated for %s", path, id,
                  FBQC_MODEL.model_id);
    const fbqc_weight_info *last = &FBQC_MODEL.weights[FBQC_MODEL.n_weights - 1];
    if (FBQC_MODEL.n_weights && last->offset + last->nbytes > size)
        fbqc_fail("%s is truncated (%ld bytes)", path, size);
}

/* all n integer weights as int32; int4: two per byte, element 2i in the low nibble of byte i */
static void unpack(int32_t *dst, const unsigned char *p, fbqc_dtype t, long n) {
    switch (t) {
    case FBQC_INT4:
        for (long i = 0; i < n; i++) {
            int v = (p[i >> 1] >> ((i & 1) * 4)) & 0xF;
            dst[i] = v >= 8 ? v - 16 : v;
        }
        break;
    case FBQC_I8: for (long i = 0; i < n; i++) dst[i] = ((const int8_t *)p)[i]; break;
    case FBQC_U8: for (long i = 0; i < n; i++) dst[i] = p[i]; break;
    case FBQC_I16: for (long i = 0; i < n; i++) dst[i] = ((const int16_t *)p)[i]; break;
    case FBQC_I32: memcpy(dst, p, (size_t)n * sizeof(int32_t)); break;
    default: fbqc_fail("unsupported integer weight type %d", (int)t);
    }
}

/* Once per run: unpack each layer's weights minus their zero point, as int16 when
 * |x - x_zp| * |w - w_zp| * K fits int32 (the fast, vectorisable path), else as int32; and
 * precompute x_scale * w_scale[c] in float32. */
void fbqc_prepare(fbqc_ctx *ctx) {
    FBQC_PARALLEL_FOR_DYNAMIC
    for (int l = 0; l < FBQC_MODEL.n_layers; l++) {
        fbqc_qlayer *L = &FBQC_MODEL.layers[l];
        const fbqc_weight_info *wi = &FBQC_MODEL.weights[L->weight];
        const int32_t *zp = L->w_zp >= 0 ? (const int32_t *)fbqc_weight(ctx, L->w_zp) : NULL;
        const float *ws = (const float *)fbqc_weight(ctx, L->w_scale);
        long n = L->N * L->K;
        if (wi->numel != n) fbqc_fail("layer %s: weight has %ld elements, expected %ld", L->name, wi->numel, n);
        int32_t *w = (int32_t *)fbqc_alloc((size_t)n * sizeof(int32_t));
        unpack(w, ctx->blob + wi->offset, wi->dtype, n);
        int64_t wmax = 0;
        for (long c = 0; c < L->N; c++)
            for (long k = 0; k < L->K; k++) {
                int64_t v = (int64_t)w[c * L->K + k] - (zp ? zp[c] : 0);
                w[c * L->K + k] = (int32_t)v;
                wmax = v > wmax ? v : (-v > wmax ? -v : wmax);
            }
        double xmax = L->x_dtype == FBQC_U8 ? 255.0 : 65535.0;
        L->packed_i16 = L->x_dtype == FBQC_U8 && wmax <= 32767 &&
                        xmax * (double)wmax * (double)L->K < 2147483647.0;
        if (L->packed_i16) {
            int16_t *w16 = (int16_t *)fbqc_alloc((size_t)n * sizeof(int16_t));
            for (long i = 0; i < n; i++) w16[i] = (int16_t)w[i];
            free(w);
            L->packed = w16;
        } else {
            L->packed = w;
        }
        L->acc_scale = (float *)fbqc_alloc((size_t)L->N * sizeof(float));
        for (long c = 0; c < L->N; c++) L->acc_scale[c] = L->x_scale * ws[c];
        L->b = L->bias >= 0 ? (const float *)fbqc_weight(ctx, L->bias) : NULL;
    }
}
