"""The files of the C program: ``emit_c`` writes the standalone C program of an INTEGER program into an
artifact directory (the body of ``c/model.c`` comes from ``walker.py``).

Files written (relative to the artifact directory)::

    c/model.c, c/model.h      the graph, generated: one commented block per node
    c/fbqc_runtime.h, c/fbqc_tensor.c, c/fbqc_float.c, c/fbqc_quant.c, c/main.c
                              the fixed kernels and the runner (copied from this package)
    weights.bin, weights.json every constant, one file (layout in weights.py and weights.json)
    inputs.bin                the example inputs, back to back, in the order of model.h
    README.md                 how to build, run, dump and compare
"""
from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import fbqc
from fbqc.errors import UserError
from fbqc.program import Program
from fbqc.stage import Stage

from .walker import GraphWalker
from .context import DTYPE_ENUM
from .ops.quantized import layer_initializer
from .readme import readme
from .weights import WeightTable

C_DIR = "c"
RUNTIME_FILES = ("fbqc_runtime.h", "fbqc_tensor.c", "fbqc_float.c", "fbqc_quant.c", "main.c")
DEFAULT_CFLAGS = "-O2 -std=c99 -ffp-contract=off"
WEIGHTS_FILE, WEIGHTS_JSON, INPUTS_FILE = "weights.bin", "weights.json", "inputs.bin"


def normalize_cflags(cflags: str | None) -> str:
    """The user's flags plus what the numerics need: ISO C99 and no floating-point contraction."""
    flags = (cflags or DEFAULT_CFLAGS).split()
    if not any(f.startswith("-std=") for f in flags):
        flags.append("-std=c99")
    if not any(f.startswith("-ffp-contract") for f in flags):
        flags.append("-ffp-contract=off")
    return " ".join(flags)


def build_command(cflags: str = DEFAULT_CFLAGS, directory: str = ".") -> str:
    d = "" if directory in ("", ".") else directory.rstrip("/") + "/"
    return f"cc {cflags} -o {d}run {d}{C_DIR}/*.c -lm"


def emit_c(program: Program, out_dir: Path, *, inputs: dict[str, Any] | None = None,
           cflags: str = DEFAULT_CFLAGS) -> dict[str, Any]:
    """Write the C program of ``program`` into ``out_dir``; returns the manifest section."""
    if program.stage != Stage.INTEGER:
        raise UserError(f"--emit-c needs an INTEGER program, got {program.stage}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cflags = normalize_cflags(cflags)
    weights = WeightTable()
    gen = GraphWalker(program, weights)
    body = gen.run()
    wdesc = weights.write(out_dir / WEIGHTS_FILE)
    name = program.info.get("module", "model")
    ins = _io_rows(gen.inputs, gen.input_names)
    outs = _io_rows(gen.outputs, [f"output{i}" for i in range(len(gen.outputs))])
    layers = [{"index": i, "name": e["name"], "kind": e["kind"], "node": e["node"], "K": e["K"], "N": e["N"]}
              for i, e in enumerate(gen.layers)]
    wdesc.update({"inputs": ins, "outputs": outs, "layers": layers})
    (out_dir / WEIGHTS_JSON).write_text(json.dumps(wdesc, indent=1) + "\n")
    cdir = out_dir / C_DIR
    cdir.mkdir(exist_ok=True)
    runtime = resources.files(__package__) / "runtime"
    for f in RUNTIME_FILES:
        (cdir / f).write_bytes((runtime / f).read_bytes())
    (cdir / "model.h").write_text(_model_h(name, ins, outs))
    (cdir / "model.c").write_text(_model_c(name, weights, gen, body, ins, outs))
    _write_inputs(out_dir / INPUTS_FILE, program, inputs, ins)
    (out_dir / "README.md").write_text(readme(name, ins, outs, wdesc, len(gen.layers), cflags,
                                              build_command(cflags)))
    c_files = sorted(f"{C_DIR}/{p.name}" for p in cdir.iterdir())
    files = c_files + [WEIGHTS_FILE, WEIGHTS_JSON, INPUTS_FILE, "README.md"]
    return {"files": files, "sha256": {f: hashlib.sha256((out_dir / f).read_bytes()).hexdigest() for f in c_files},
            "cflags": cflags, "build": build_command(cflags), "model_id": weights.model_id,
            "inputs": ins, "outputs": outs, "layers": [e["name"] for e in gen.layers],
            "weights_bytes": wdesc["file_bytes"], "bits_per_quantized_weight": wdesc["bits_per_quantized_weight"]}


def _io_rows(values, names) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "numel": v.numel,
             "enum": DTYPE_ENUM[v.dtype]} for n, v in zip(names, values)]


def _write_inputs(path: Path, program: Program, inputs, rows) -> None:
    inputs = inputs if inputs is not None else program.example_inputs
    names = [r["name"] for r in rows]
    by_name = _leaves_by_placeholder(program, inputs)
    tensors = [by_name[n] for n in names] if all(n in by_name for n in names) else list(inputs.values())
    if len(tensors) != len(rows):
        raise UserError(f"--emit-c: the program takes {len(rows)} inputs, {len(tensors)} example inputs given")
    with open(path, "wb") as f:
        for t, r in zip(tensors, rows):
            if not isinstance(t, torch.Tensor) or list(t.shape) != r["shape"] or \
                    str(t.dtype).removeprefix("torch.") != r["dtype"]:
                raise UserError(f"--emit-c: example input {r['name']} does not match the program "
                                f"({r['dtype']}{r['shape']})")
            f.write(t.detach().contiguous().numpy().tobytes())


def _io_comment(ins, outs) -> list[str]:
    lines = [" * inputs (back to back in the INPUTS file):"]
    lines += [f" *   {i} {r['name']:<24} {r['dtype']:<8} {r['shape']}" for i, r in enumerate(ins)]
    lines += [" * outputs (back to back in the OUTPUTS file):"]
    lines += [f" *   {i} {r['name']:<24} {r['dtype']:<8} {r['shape']}" for i, r in enumerate(outs)]
    return lines


def _model_h(name: str, ins, outs) -> str:
    return "\n".join([
        f"/* model.h: interface of model.c, the C reference of {name} (generated by fbqc {fbqc.__version__}).",
        *_io_comment(ins, outs), " */", "#ifndef FBQC_MODEL_H", "#define FBQC_MODEL_H", "",
        '#include "fbqc_runtime.h"', "",
        f"#define FBQC_N_INPUTS {len(ins)}", f"#define FBQC_N_OUTPUTS {len(outs)}", "", "#endif", ""])


def _table(ctype: str, name: str, rows: list[str]) -> list[str]:
    if not rows:
        return [f"static {ctype} {name}[1];", ""]
    return [f"static {ctype} {name}[] = {{", *rows, "};", ""]


def _model_c(name: str, weights: WeightTable, gen: GraphWalker, body: list[str], ins, outs) -> str:
    io_rows = lambda rows: [f'    {{"{r["name"]}", {r["enum"]}, {r["numel"]}, "{"x".join(map(str, r["shape"])) or "scalar"}"}},'
                            for r in rows]
    lines = [
        f"/* model.c: the INTEGER graph of {name} as C99, generated by fbqc {fbqc.__version__}.",
        " * One block per graph node, in graph order, headed by the node as a comment. Every tensor is a",
        " * contiguous buffer; buffers are freed after their last reader. Quantized layers are entries of",
        " * LAYERS (weights by index into weights.bin) run by fbqc_qlinear / fbqc_qconv1x1.",
        *_io_comment(ins, outs), " */",
        '#include "model.h"', "", "#include <math.h>", "#include <stdlib.h>", "#include <string.h>", "",
        "/* name, type, offset in weights.bin, bytes, elements */",
        *_table("const fbqc_weight_info", "WEIGHTS", weights.c_table()),
        *_table("fbqc_qlayer", "LAYERS", [layer_initializer(i, e) for i, e in enumerate(gen.layers)]),
        *_table("const fbqc_io_info", "INPUTS", io_rows(ins)),
        *_table("const fbqc_io_info", "OUTPUTS", io_rows(outs)),
        "static void forward(fbqc_ctx *ctx, const void *const *inputs, void *const *outputs) {",
        "    (void)ctx;", "    (void)inputs;",
        *["    " + ln for ln in body],
        "}", "",
        f'fbqc_model FBQC_MODEL = {{"{name}", "{weights.model_id}", {len(weights.entries)}, WEIGHTS, '
        f'{len(ins)}, {len(outs)}, INPUTS, OUTPUTS, {len(gen.layers)}, LAYERS, forward}};', ""]
    return "\n".join(lines)


def copy_runtime(dest: Path) -> None:
    """The fixed C files alone (tests of the kernels)."""
    runtime = resources.files(__package__) / "runtime"
    for f in RUNTIME_FILES:
        shutil.copyfile(str(runtime / f), dest / f)


def _leaves_by_placeholder(program: Program, inputs: dict[str, Any]) -> dict[str, Any]:
    """The input pytree's leaves (nested dicts, ``None``) by the placeholder that receives each."""
    names = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    try:
        leaves = program.flat_inputs(inputs)
    except Exception:  # noqa: BLE001 - inputs not shaped like the program's: matched by name below
        leaves = None
    if leaves is None or len(leaves) != len(names):
        return {k: v for k, v in inputs.items()}
    return dict(zip(names, leaves))
