/* main.c: the runner of the emitted model.
 *
 *   run [--weights FILE] [--dump DIR] [--feed DIR] [--repeat N] INPUTS OUTPUTS
 *
 * INPUTS holds the model inputs back to back, OUTPUTS receives the outputs (see model.h and
 * README.md for their shapes and types; this file is the same for every model). The weights file defaults to weights.bin next to the
 * program, else next to INPUTS. --dump DIR writes, per quantized layer i, DIR/Liiii.xq (input
 * codes), .acc (int32 accumulators) and .yq (output codes), and DIR/layers.txt. --feed DIR makes
 * each quantized layer read its input codes from DIR/Liiii.xq instead (teacher forcing). */
#define _POSIX_C_SOURCE 199309L      /* clock_gettime, for wall-clock timings only */
#include "fbqc_runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(void) {
    fprintf(stderr, "usage: run [--weights FILE] [--dump DIR] [--feed DIR] [--repeat N] INPUTS OUTPUTS\n"
                    "model %s\ninputs (back to back in INPUTS):\n", FBQC_MODEL.name);
    for (int i = 0; i < FBQC_MODEL.n_inputs; i++)
        fprintf(stderr, "  %s %s (%ld elements, type %d)\n", FBQC_MODEL.inputs[i].name,
                FBQC_MODEL.inputs[i].shape, FBQC_MODEL.inputs[i].numel, (int)FBQC_MODEL.inputs[i].dtype);
    exit(2);
}

static int exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* DIR/weights.bin where DIR is the directory of `file` */
static void sibling(char *out, size_t size, const char *file) {
    const char *slash = strrchr(file, '/');
    if (slash)
        snprintf(out, size, "%.*s/weights.bin", (int)(slash - file), file);
    else
        snprintf(out, size, "weights.bin");
}

static double seconds(void) {
#ifdef CLOCK_MONOTONIC
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

static long io_bytes(const fbqc_io_info *io, int n) {
    long total = 0;
    for (int i = 0; i < n; i++) total += io[i].numel * (long)fbqc_dtype_size(io[i].dtype);
    return total;
}

int main(int argc, char **argv) {
    fbqc_ctx ctx = {0};
    const char *weights = NULL, *paths[2] = {NULL, NULL};
    int npaths = 0, repeat = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--weights") && i + 1 < argc) weights = argv[++i];
        else if (!strcmp(argv[i], "--dump") && i + 1 < argc) ctx.dump_dir = argv[++i];
        else if (!strcmp(argv[i], "--feed") && i + 1 < argc) ctx.feed_dir = argv[++i];
        else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = atoi(argv[++i]);
        else if (argv[i][0] == '-' || npaths == 2) usage();
        else paths[npaths++] = argv[i];
    }
    if (npaths != 2 || repeat < 1) usage();
    /* a contracted a*b+c (FMA) would round differently from PyTorch's separate multiply and add */
    volatile float a = 1.0f + 1.0f / 4096.0f, c = -(1.0f + 1.0f / 2048.0f);
    if (fbqc_contract_probe(a, a, c) != 0.0f)
        fbqc_fail("built with floating-point contraction (FMA); rebuild with -ffp-contract=off");

    char wpath[4096];
    if (weights) snprintf(wpath, sizeof wpath, "%s", weights);
    else {
        sibling(wpath, sizeof wpath, argv[0]);
        if (!exists(wpath)) sibling(wpath, sizeof wpath, paths[0]);
    }
    double t0 = seconds();
    fbqc_load_weights(&ctx, wpath);
    fbqc_prepare(&ctx);
    double t_load = seconds() - t0;

    long in_bytes = io_bytes(FBQC_MODEL.inputs, FBQC_MODEL.n_inputs);
    unsigned char *in = (unsigned char *)fbqc_alloc((size_t)in_bytes);
    FILE *f = fopen(paths[0], "rb");
    if (!f) fbqc_fail("cannot open inputs %s", paths[0]);
    long got = (long)fread(in, 1, (size_t)in_bytes, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (got != in_bytes || extra)
        fbqc_fail("%s: expected %ld bytes of inputs (run --help for their shapes)", paths[0], in_bytes);
    const void *inputs[64];
    void *outputs[64];
    if (FBQC_MODEL.n_inputs > 64 || FBQC_MODEL.n_outputs > 64) fbqc_fail("too many inputs or outputs");
    for (long i = 0, off = 0; i < FBQC_MODEL.n_inputs; i++) {
        inputs[i] = in + off;
        off += (FBQC_MODEL.inputs[i].numel * (long)fbqc_dtype_size(FBQC_MODEL.inputs[i].dtype));
    }
    long out_bytes = io_bytes(FBQC_MODEL.outputs, FBQC_MODEL.n_outputs);
    unsigned char *out = (unsigned char *)fbqc_alloc((size_t)out_bytes);
    for (long i = 0, off = 0; i < FBQC_MODEL.n_outputs; i++) {
        outputs[i] = out + off;
        off += (FBQC_MODEL.outputs[i].numel * (long)fbqc_dtype_size(FBQC_MODEL.outputs[i].dtype));
    }
    if (ctx.dump_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/layers.txt", ctx.dump_dir);
        FILE *lf = fopen(path, "w");
        if (!lf) fbqc_fail("cannot write %s (does the --dump directory exist?)", path);
        for (int l = 0; l < FBQC_MODEL.n_layers; l++)
            fprintf(lf, "L%04d %s\n", l, FBQC_MODEL.layers[l].name);
        fclose(lf);
    }
    for (int r = 0; r < repeat; r++) {
        double t = seconds();
        FBQC_MODEL.forward(&ctx, inputs, outputs);
        fprintf(stderr, "forward %d: %.3f s (weights loaded and prepared in %.3f s)\n", r, seconds() - t, t_load);
    }
    f = fopen(paths[1], "wb");
    if (!f || fwrite(out, 1, (size_t)out_bytes, f) != (size_t)out_bytes) fbqc_fail("cannot write %s", paths[1]);
    fclose(f);
    free(in);
    free(out);
    free(ctx.blob);
    return 0;
}
