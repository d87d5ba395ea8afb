"""The README.md an artifact with emitted C carries: build, run, file layouts, dumps, verification."""
from __future__ import annotations

from typing import Any


def _rows(rows) -> str:
    return "\n".join(f"| {i} | `{r['name']}` | {r['dtype']} | {r['shape']} | {r['numel']:,} |"
                     for i, r in enumerate(rows))


def readme(name: str, ins, outs, weights: dict[str, Any], n_layers: int, cflags: str, build: str) -> str:
    return f"""# C reference of {name}

Standalone C99 code for the quantized (INTEGER) program of this artifact: the same integers as fbqc's
in-process `cpu` reference, no PyTorch needed. Only libc and libm.

## Build and run

From this directory:

```
{build}
./run inputs.bin outputs.bin
```

(or from elsewhere: `cc {cflags} -o DIR/run DIR/c/*.c -lm` and `DIR/run DIR/inputs.bin out.bin`).
Keep `-ffp-contract=off` (GCC's default under `-std=c99`): the requantization `(float)acc * scale + bias`
must round the product and the sum separately, as PyTorch does; `run` refuses to start if it was
compiled with contraction (FMA). Faster: add `-O3 -march=native -fopenmp` (OpenMP over output channels,
rows and heads). Warning-free with `-Wall -Wextra`.

Options: `run [--weights FILE] [--dump DIR] [--feed DIR] [--repeat N] INPUTS OUTPUTS`

- `--weights FILE`: default `weights.bin` next to `run`, else next to INPUTS.
- `--dump DIR`: for each of the {n_layers} quantized layers `i`, writes `DIR/Liiii.xq` (input codes),
  `DIR/Liiii.acc` (int32 accumulators) and `DIR/Liiii.yq` (output codes), raw little endian in the
  layer's tensor layout (NCHW for 1x1 convs), and `DIR/layers.txt` (index, layer name).
- `--feed DIR`: each quantized layer reads its input codes from `DIR/Liiii.xq` instead of computing
  them (teacher forcing: compare layers one at a time against another implementation).
- `--repeat N`: run the forward N times (timings on stderr).

`fbqc verify` builds and runs this program and compares it with the in-process reference, per layer
(teacher-forced: int32 accumulators and output codes must be identical) and end to end.

## Inputs and outputs

`inputs.bin` holds the example inputs and OUTPUTS receives the outputs, each the tensors below back to
back, row-major, little endian:

| # | input | type | shape | elements |
|---|---|---|---|---|
{_rows(ins)}

| # | output | type | shape | elements |
|---|---|---|---|---|
{_rows(outs)}

## Weights

`weights.bin` ({weights['file_bytes']:,} bytes): a 64-byte header (magic `FBQCWTS1`, uint32 version,
uint32 tensor count, uint64 data bytes, 16-character model id), then {len(weights['tensors'])} tensors,
each at a 64-byte aligned offset listed in `weights.json` (name, type, shape, offset, bytes) and in the
`WEIGHTS` table of `c/model.c`. Quantized weights whose levels fit 4 bits are `int4`, packed two per
byte (element 2i in the low nibble of byte i, two's complement); other integer weights int8/int16,
float tensors float32 (float64 where the graph computes in float64), little endian.
Quantized weights: {weights['quantized_weight_params']:,} parameters in {weights['quantized_weight_bytes']:,}
bytes = {weights['bits_per_quantized_weight']:.3f} bits per parameter.

## Files

`c/model.c` (generated: the graph, one commented block per node; `LAYERS` lists the quantized layers),
`c/model.h`, `c/fbqc_runtime.h` (types and the numeric contract), `c/fbqc_tensor.c` (memory, copies,
weights file), `c/fbqc_float.c` (float operators), `c/fbqc_quant.c` (quantize, integer layers),
`c/main.c` (the runner).
"""
