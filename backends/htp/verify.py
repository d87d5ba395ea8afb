"""``fbqc verify`` for htp artifacts: the HTP simulator against the cpu reference the artifact carries.

1. *Per layer, teacher-forced* (the agreement goal, always every layer): every quantized layer compiled
   for the HTP side by side (:func:`~.verify_build.layer_model`; ``--jobs N``: N chunks in parallel) and
   fed the reference's own input codes; its output codes against the reference's: exact, within 1 LSB,
   max |Δ| in LSB. A8 layers must have ≥ 99.9 % within 1 LSB; A16 layers are judged by relative error
   (the HTP is not bit-exact at A16, DESIGN.md §4).
2. *Sampled blocks* (``--blocks``/``--sample``; the default for models too big for 3): each chosen
   transformer block compiled as a graph of its own (:mod:`.blocks`) and fed the reference's block
   inputs: its output's relative error and max |Δ|, its layers' codes free-running inside the block.
3. *Whole model* (``--full``; the default when its estimate is small): per layer, free-running (the
   graph with each layer's output exposed, on the example inputs: the drift of the HTP's fp16 float
   ops), and end to end (the context binary's output against the cpu reference, the fake-quant and the
   float models' outputs stored in ``io.pt``).

The verdict (AGREE/DISAGREE) is the teacher-forced goal; blocks and the whole model are reported beside it.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import torch

from fbqc.agreement import end_to_end, layer_args, output_lsb
from fbqc.quant_math import act_container, act_qmax

from .qnn_compile import CTX_FILE, QDQ_FILE
from .simjobs import SimJob, SimResult, run_jobs
from .verify_build import layer_model, with_layer_outputs

A8_WITHIN_1LSB_GOAL = 0.999
A16_REL_ERROR_LIMIT = 1e-3     # ‖Δ‖/‖y‖ of an A16 layer (the HTP is not bit-exact at A16; ~6e-5 seen)


@dataclass
class CodeAgreement:
    layer: str
    act_bits: int
    elements: int
    exact: float            # fraction of identical codes
    within_1lsb: float      # fraction within 1 LSB
    max_lsb: int
    rel_error: float        # ‖htp − ref‖ / ‖ref − z_y‖ in code units

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_codes(layer: str, bits: int, htp: np.ndarray, ref: np.ndarray, zp: int) -> CodeAgreement:
    htp, ref = htp.astype(np.int64).reshape(-1), ref.astype(np.int64).reshape(-1)
    d = np.abs(htp - ref)
    signal = np.linalg.norm((ref - zp).astype(np.float64))
    return CodeAgreement(layer, bits, int(d.size), float((d == 0).mean()), float((d <= 1).mean()),
                         int(d.max(initial=0)), float(np.linalg.norm(d.astype(np.float64)) / max(signal, 1e-30)))


def summarize(rows: list[CodeAgreement]) -> dict[str, Any]:
    a8 = [r for r in rows if r.act_bits == 8]
    a16 = [r for r in rows if r.act_bits != 8]
    n8 = sum(r.elements for r in a8)
    out = {"layers": len(rows), "a8_layers": len(a8), "a16_layers": len(a16), "a8_elements": n8,
           "a8_exact": sum(r.exact * r.elements for r in a8) / max(n8, 1),
           "a8_within_1lsb": sum(r.within_1lsb * r.elements for r in a8) / max(n8, 1),
           "a8_max_lsb": max((r.max_lsb for r in a8), default=0),
           "a16_max_rel_error": max((r.rel_error for r in a16), default=0.0),
           "a16_max_lsb": max((r.max_lsb for r in a16), default=0)}
    out["passed"] = (out["a8_within_1lsb"] >= A8_WITHIN_1LSB_GOAL if a8 else True) and \
        out["a16_max_rel_error"] <= A16_REL_ERROR_LIMIT
    return out


def _bits(act_bits: float) -> int:
    """8 (A8) or 16 (A16): the activation codes' container."""
    return act_container(act_bits).bits


def _codes2d(t: torch.Tensor, kind: str) -> np.ndarray:
    a = t.to(torch.int64).numpy()
    return a if kind == "conv1x1" else a.reshape(-1, a.shape[-1])


# --- 1. teacher-forced ------------------------------------------------------------------------------

def _chunks(layers: list[str], weight: dict[str, int], n: int) -> list[list[str]]:
    """``layers`` in ``n`` contiguous chunks of about equal ``weight``."""
    n = max(1, min(n, len(layers)))
    total, out, acc = sum(weight.values()) or 1, [[]], 0
    for name in layers:
        if out[-1] and acc >= total * len(out) / n and len(out) < n:
            out.append([])
        out[-1].append(name)
        acc += weight[name]
    return out


def _input_codes(t: torch.Tensor, kind: str) -> np.ndarray:
    """A layer's input codes as the layer model takes them: uint8, or uint16 for A16 (int32 codes)."""
    a = t.numpy() if t.dtype == torch.uint8 else t.to(torch.int32).numpy().astype(np.uint16)
    return a if kind == "conv1x1" else a.reshape(-1, a.shape[-1])


def teacher_forced_jobs(art, ref, codes, kinds, tmp: Path, chunks: int = 1) -> list[SimJob]:
    """The layer model in ``chunks`` parts of about equal size (each compiled and run on its own)."""
    qdq = ir.load(art.directory / QDQ_FILE)
    layers = list(ref.layers())
    size = {name: codes[name]["xq"].numel() for name in layers}
    parts = _chunks(layers, size, chunks)
    jobs = []
    for i, part in enumerate(parts):
        feeds = {f"{name}:x": _input_codes(codes[name]["xq"], kinds[name]) for name in part}
        model = layer_model(qdq, {name: feeds[f"{name}:x"].shape for name in part})
        path = tmp / f"layers{i}.onnx"
        ir.save(model, path)
        jobs.append(SimJob(f"teacher-forced {i + 1}/{len(parts)}" if len(parts) > 1 else "teacher-forced",
                           str(path), art.target.name, feeds, placement=True, info={"part": "layers"}))
    return jobs


def teacher_forced_rows(ref, codes, kinds, results: list[SimResult]) -> tuple[list[CodeAgreement], dict]:
    outs = {k: v for r in results for k, v in r.outputs.items()}
    rows = []
    for name, node in ref.layers().items():
        a = layer_args(ref.constants(node))
        rows.append(compare_codes(name, _bits(a["y_bits"]), outs[f"{name}:y"],
                                  _codes2d(codes[name]["yq"], kinds[name]), a["y_zp"]))
    info = {"compile_seconds": sum(r.compile_seconds for r in results),
            "run_seconds": sum(r.run_seconds for r in results),
            "cpu_nodes": sum(r.cpu_nodes or 0 for r in results)}
    return rows, info


# --- free-running codes (inside a block, or the whole model) ----------------------------------------

def free_rows(ref, layers: list[str], outs: dict[str, np.ndarray], names: dict[str, str], codes
              ) -> list[CodeAgreement]:
    """Each layer's dequantized output read back as codes, against the reference's codes."""
    nodes = ref.layers()
    rows = []
    for name in layers:
        a = layer_args(ref.constants(nodes[name]))
        y = outs[names[name]].astype(np.float64)
        got = np.clip(np.rint(y / np.float32(a["y_scale"])) + a["y_zp"], 0, act_qmax(a["y_bits"]))
        want = codes[name]["yq"].to(torch.int64).numpy()
        rows.append(compare_codes(name, _bits(a["y_bits"]), got.reshape(want.shape), want, a["y_zp"]))
    return rows


def free_running_job(art, ref, inputs, tmp: Path) -> tuple[SimJob, dict[str, str]]:
    model, names = with_layer_outputs(ir.load(art.directory / QDQ_FILE), list(ref.layers()))
    path = tmp / "free_running.onnx"
    ir.save(model, path)
    return SimJob("free-running (whole model)", str(path), art.target.name, art.feeds(inputs),
                  info={"part": "free_running"}), names


def end_to_end_job(art, inputs) -> SimJob:
    return SimJob("end to end (context binary)", str(art.directory / CTX_FILE), art.target.name,
                  art.feeds(inputs), info={"part": "end_to_end"})


# --- 2. blocks --------------------------------------------------------------------------------------

def block_job(graph, soc: str) -> SimJob:
    return SimJob(f"block {graph.block.name}", str(graph.model), soc, graph.feeds,
                  info={"part": "block", "block": graph.block.name})


def block_row(ref, graph, res: SimResult, want: list[torch.Tensor], codes) -> dict[str, Any]:
    outs = list(res.outputs.values())
    got = [torch.from_numpy(np.asarray(o, np.float32)) for o in outs[:graph.outputs]]
    rows = free_rows(ref, graph.block.layers, res.outputs, graph.layer_outputs, codes)
    b = graph.block
    return {"block": b.name, "index": b.index, "gmac": graph.gmac,
            "inputs": list(graph.feeds), "outputs": [o.name for o in b.outputs],
            "vs_cpu": [r.as_dict() for r in end_to_end(got, want)],
            "summary": summarize(rows), "per_layer": [r.as_dict() for r in rows],
            "seconds": {"lower": graph.lower_seconds, "compile": res.compile_seconds, "run": res.run_seconds}}


# --- the whole check --------------------------------------------------------------------------------

def verify(art, io: dict[str, Any], *, blocks: str | None = None, sample: int | None = None,
           full: bool | None = None, jobs: int = 1, log: Callable[[str], None] | None = None
           ) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from . import blocks as B
    from .verify_plan import plan_verify

    t_start = time.perf_counter()
    ref = art.reference()
    inputs = io["inputs"]
    kinds = {r["layer"]: r["kind"] for r in art.manifest["layers"]}
    plan = plan_verify(ref, B.find_blocks(ref.program), blocks, sample, full, jobs)
    if log is not None:
        log(plan.text())
    seconds: dict[str, Any] = {}
    # a full-size model takes many minutes per part on the simulator: show where it is (a terminal only)
    bar = tqdm(total=1 + len(plan.blocks) + plan.sim_parts, desc="verify", unit="part", disable=None,
               dynamic_ncols=True)
    try:
        bar.set_postfix_str("cpu reference")
        t = time.perf_counter()
        cap = B.capture(ref.program, inputs, plan.blocks)
        seconds["cpu_reference"] = time.perf_counter() - t
        bar.update()
        with tempfile.TemporaryDirectory(prefix="fbqc_htp_verify_") as tmp:
            tmp = Path(tmp)
            sim = teacher_forced_jobs(art, ref, cap.codes, kinds, tmp, plan.layer_chunks)
            graphs = []
            for b in plan.blocks:
                bar.set_postfix_str(f"lowering block {b.name}")
                graphs.append(B.build(ref.program, b, cap.inputs[b.name], tmp / f"block{b.index}"))
                sim.append(block_job(graphs[-1], art.target.name))
                bar.update()
            names = {}
            if plan.full:
                fr_job, names = free_running_job(art, ref, inputs, tmp)
                sim += [end_to_end_job(art, inputs), fr_job]
            bar.set_postfix_str(f"{len(sim)} simulator part(s), {plan.jobs} at a time")
            t = time.perf_counter()
            results = run_jobs(sim, plan.jobs, on_done=lambda r: (bar.update(), bar.set_postfix_str(
                f"done: {r.key}")))
            seconds["simulator_wall"] = time.perf_counter() - t
    finally:
        bar.close()
    by_part: dict[str, list[SimResult]] = {}
    for r in results:
        by_part.setdefault(r.info["part"], []).append(r)
    tf_rows, tf_info = teacher_forced_rows(ref, cap.codes, kinds, by_part["layers"])
    seconds.update(tf_info)
    tf = summarize(tf_rows)
    result = {
        "artifact": str(art.directory), "backend": "htp", "soc": art.target.name,
        "summary": {**tf, "exact": tf["passed"]},
        "per_layer": [r.as_dict() for r in tf_rows],
        "checks": plan.checks(), "estimate": plan.estimate(),
    }
    if plan.blocks:
        rows = [block_row(ref, g, r, cap.block_outputs[g.block.name], cap.codes)
                for g, r in zip(graphs, by_part["block"])]
        result["blocks"] = {"of": len(plan.all_blocks), "names": [b.name for b in plan.all_blocks],
                            "per_block": rows}
        seconds["blocks"] = {r["block"]: r["seconds"] for r in rows}
    if plan.full:
        e2e_res, fr_res = by_part["end_to_end"][0], by_part["free_running"][0]
        out = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in e2e_res.outputs.values()]
        fr_rows = free_rows(ref, list(ref.layers()), fr_res.outputs, names, cap.codes)
        lsb = output_lsb(ref.program)
        e2e = [r.as_dict() for r in end_to_end(out, cap.outputs, lsb)]
        for r, step in zip(e2e, lsb):
            r["max_lsb"] = r["max_abs"] / step if step else None
        result.update({
            "free_running": {"summary": summarize(fr_rows), "per_layer": [r.as_dict() for r in fr_rows]},
            "end_to_end_vs_cpu": e2e,
            "end_to_end_vs_fake_quant": [r.as_dict() for r in end_to_end(out, io["fake_quant_outputs"], lsb)],
            "end_to_end_vs_float": [r.as_dict() for r in end_to_end(out, io["float_outputs"])]})
        seconds["htp_run"] = e2e_res.compile_seconds + e2e_res.run_seconds
        seconds["free_running"] = {"compile": fr_res.compile_seconds, "run": fr_res.run_seconds}
    seconds["total"] = time.perf_counter() - t_start
    result["seconds"] = seconds
    return result
