"""A large model as several QNN HTP contexts, prepared in parallel: one EPContext model that chains them.

QNN's HTP graph preparation is single-threaded and its memory grows with the graph (Sana-600M: ~150 s,
~3 GiB for one context). Cutting the QDQ graph into contiguous parts of about equal weight bytes and
preparing each in its own child process uses the machine's cores and bounds the memory of each
preparation; onnxruntime runs a model of several ``EPContext`` nodes as one session (each node loads its
own context binary, ``model_ctx_p<i>_qnn.bin``).

A cut is made only where no value crossing it is quantized codes (a ``QuantizeLinear`` output) or the
dequantized input of a quantized op (a ``DequantizeLinear`` output read by an op whose result is
quantized again: the DQ → op → Q unit the QNN EP turns into one integer op). Each part's inputs and
outputs are float/int tensors; a ``DequantizeLinear`` output read only by float ops may cross (with every
layer at A16, the timestep embedding's dequantized output feeds all the blocks). The HTP
computes in fp16 and a part's fp32 output holds its fp16 values exactly, so the parts chain without any
rounding of their own (tiny Sana, 2 parts: bit-identical outputs to one context). On a device each cut
costs one graph switch and the copy of the crossing tensors.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

QDQ = ("QuantizeLinear", "DequantizeLinear")
#: weight bytes per part when the number of parts is chosen automatically (Sana-600M: 2 parts)
PART_BYTES = 256 * 2**20


def auto_parts(model: onnx.ModelProto) -> int:
    return max(1, math.ceil(sum(len(t.raw_data) for t in model.graph.initializer) / PART_BYTES))


def _elem_bytes(vi: onnx.ValueInfoProto) -> int:
    t = vi.type.tensor_type
    n = 1
    for d in t.shape.dim:
        n *= d.dim_value if d.HasField("dim_value") else 1
    return n * max(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize, 1)


def plan(model: onnx.ModelProto, parts: int) -> list[int]:
    """Node indices at which to cut ``model`` (shape-inferred, nodes in topological order) into ``parts``.

    Cuts are clean (no Q/DQ output crosses), near equal shares of the weight bytes, and among the
    clean cuts near a share's boundary the one with the fewest crossing bytes.
    """
    g = model.graph
    nodes = list(g.node)
    if parts <= 1 or len(nodes) < 2 * parts:
        return []
    sizes = {t.name: len(t.raw_data) for t in g.initializer}
    infos = {v.name: v for v in list(g.value_info) + list(g.output)}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.input:
            last_use[v] = i
    outputs = {o.name for o in g.output}
    quantized = {v for n in nodes if n.op_type == "QuantizeLinear" for v in n.input[:1]}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for v in n.input:
            readers.setdefault(v, []).append(n)

    def binds(n: onnx.NodeProto) -> bool:
        """Would a cut after ``n`` split a Q/DQ unit (its outputs must stay inside the part)?"""
        if n.op_type == "QuantizeLinear":
            return True
        if n.op_type != "DequantizeLinear":
            return False
        return any(o in quantized for v in n.output for r in readers.get(v, ()) for o in r.output)

    weight = [0] * (len(nodes) + 1)          # weight bytes of nodes [0, k)
    seen: set[str] = set()
    live: dict[str, tuple[int, bool]] = {}   # value → (bytes, inside a Q/DQ unit)
    live_bytes = qdq_live = 0
    clean: list[tuple[int, int]] = []        # (cut index, crossing bytes)
    for k, n in enumerate(nodes):
        own = sum(sizes.get(v, 0) for v in n.input if v in sizes and v not in seen)
        seen.update(v for v in n.input if v in sizes)
        weight[k + 1] = weight[k] + own
        for v in n.input:                    # values whose last reader is this node die after it
            if v in live and last_use.get(v) == k and v not in outputs:
                b, q = live.pop(v)
                live_bytes -= b
                qdq_live -= q
        for v in n.output:
            if v and (last_use.get(v, -1) > k or v in outputs):
                b, q = (_elem_bytes(infos[v]) if v in infos else 0), binds(n)
                live[v] = (b, q)
                live_bytes += b
                qdq_live += q
        if 0 < k + 1 < len(nodes) and qdq_live == 0:
            clean.append((k + 1, live_bytes))
    total = weight[-1]
    cuts: list[int] = []
    for i in range(1, parts):
        target = total * i / parts
        near = [c for c in clean if abs(weight[c[0]] - target) <= 0.04 * total and (not cuts or c[0] > cuts[-1])]
        if not near:
            near = [c for c in clean if not cuts or c[0] > cuts[-1]]
            near = sorted(near, key=lambda c: abs(weight[c[0]] - target))[:1]
        if near:
            cuts.append(min(near, key=lambda c: (c[1], abs(weight[c[0]] - target)))[0])
    return cuts


def split(model: onnx.ModelProto, cuts: list[int]) -> list[onnx.ModelProto]:
    """The parts between ``cuts``: each a model whose inputs are the values it reads from before it
    (graph inputs included) and whose outputs are the values read after it (graph outputs included)."""
    g = model.graph
    nodes = list(g.node)
    inits = {t.name: t for t in g.initializer}
    infos = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    bounds = [0, *cuts, len(nodes)]
    later_reads: list[set[str]] = []
    reads: set[str] = {o.name for o in g.output}
    for a, b in reversed(list(zip(bounds, bounds[1:]))):
        later_reads.append(set(reads))
        reads |= {v for n in nodes[a:b] for v in n.input}
    later_reads.reverse()
    out = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = nodes[a:b]
        used = {v for n in part for v in n.input if v}
        made = [v for n in part for v in n.output if v]
        ins = [infos[v] for v in sorted(used - set(made)) if v not in inits]
        outs = [infos[v] for v in made if v in later_reads[i]]
        graph = helper.make_graph(part, f"{g.name}_p{i}", ins, outs, [inits[v] for v in sorted(used) if v in inits])
        m = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        out.append(m)
    return out


def join(contexts: list[onnx.ModelProto], model: onnx.ModelProto) -> onnx.ModelProto:
    """One model running the parts' EPContext nodes in order, with ``model``'s inputs and outputs."""
    nodes = [n for c in contexts for n in c.graph.node]
    inner = [o for c in contexts[:-1] for o in c.graph.output if o.name not in {v.name for v in model.graph.output}]
    graph = helper.make_graph(nodes, contexts[0].graph.name, list(model.graph.input), list(model.graph.output),
                              value_info=inner)
    return helper.make_model(graph, opset_imports=contexts[0].opset_import, ir_version=contexts[0].ir_version)


def run_children(jobs: list[tuple[Path, Path]], soc: str, parallel: int) -> list[dict[str, Any]]:
    """Compile each ``(part model, context path)`` in a child process, ``parallel`` at a time.

    Returns each child's result: ``{"rows": placement rows}`` or ``{"error": first line}``.
    """
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    running: list[tuple[int, subprocess.Popen, Path]] = []
    pending = list(enumerate(jobs))
    try:
        while pending or running:
            while pending and len(running) < max(parallel, 1):
                i, (model, ctx) = pending.pop(0)
                res = ctx.with_suffix(".result.json")
                proc = subprocess.Popen([sys.executable, "-m", __name__, str(model), str(ctx), soc, str(res)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                running.append((i, proc, res))
            i, proc, res = running.pop(0)
            _, err = proc.communicate()
            if res.is_file():
                results[i] = json.loads(res.read_text())
                res.unlink()
            else:
                tail = (err or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                results[i] = {"error": tail[0]}
    finally:
        for _, proc, _ in running:
            proc.kill()
            proc.communicate()
    return results  # type: ignore[return-value]


def default_parallel(parts: int) -> int:
    return max(1, min(parts, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _child(model: str, ctx: str, soc: str, result: str) -> None:
    """Child process: prepare one part for the HTP (CPU fallback disabled), write its EPContext model."""
    from . import qnn

    try:
        sess = qnn.session(Path(model), qnn.soc(soc), context=Path(ctx), record_placement=True)
        out: dict[str, Any] = {"rows": qnn.placement(sess)}
        del sess
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail types; the parent decides
        out = {"error": str(e).strip()}
    Path(result).write_text(json.dumps(out))


if __name__ == "__main__":
    _child(*sys.argv[1:5])
