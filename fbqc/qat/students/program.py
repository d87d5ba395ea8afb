"""The program student: a FAKE_QUANT program whose weights train and whose bit-widths live in 0-d buffers.

Each layer's weight bit-width is a ``fbqc_<layer>_w_bits`` buffer (read by ``fake_quant_weight``,
found by :func:`fbqc.passes.insert_fake_quant.bits_buffers`); the schedule writes them with
``fill_`` — the graph is never re-exported or recompiled. ``training_view`` is a copy of the
program's graph (sharing its tensors) whose activation quantizers are what training uses:
per-sample dynamic (``fbqc::fake_quant_act_dynamic``), the static calibrated ones, or none.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch

from fbqc.ops.fused import fq_act, fq_act_dynamic, fq_weight
from fbqc.program import Program
from fbqc.spec import QUANT
from fbqc.stage import Stage

fbqc = torch.ops.fbqc
ACT_MODES = ("dynamic", "static", "none")


def check_student(program: Program) -> None:
    if not isinstance(program, Program) or program.stage != Stage.FAKE_QUANT:
        got = program.stage if isinstance(program, Program) else type(program).__name__
        raise ValueError(f"the student must be a FAKE_QUANT Program (after AnnotateLinears + "
                         f"InsertFakeQuant), got {got}")


def default_scheduled(program: Program, final_bits: float) -> list[str]:
    """Layers the schedule drives by default: those annotated at the schedule's final bits
    (a layer with a per-layer override to other bits keeps its own)."""
    return [n.meta[QUANT].layer for n in program.quantized_nodes()
            if n.meta[QUANT].weight.bits == final_bits]


def set_bits(buffers: dict[str, torch.Tensor], layers: Iterable[str], bits: float) -> None:
    """Write ``bits`` into the buffers of ``layers`` (in place: no re-export, no recompilation)."""
    with torch.no_grad():
        for layer in layers:
            buffers[layer].fill_(bits)


def own_parameters(program: Program, device: torch.device, trainable) -> list[tuple[str, torch.nn.Parameter]]:
    """Give the student its own copy of every parameter, on ``device`` (a teacher that shares the
    tensors — the EXPORTED program the student came from — stays frozen and where it was).
    ``trainable(name) -> bool`` sets ``requires_grad``. Returns the trainable ones, in a fixed order."""
    gm = program.graph_module
    out = []
    for name, p in list(gm.named_parameters()):
        *path, leaf = name.split(".")
        owner = gm.get_submodule(".".join(path))
        new = torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=trainable(name))
        setattr(owner, leaf, new)
        if new.requires_grad:
            out.append((name, new))
    for name, b in list(gm.named_buffers()):
        *path, leaf = name.split(".")
        gm.get_submodule(".".join(path)).register_buffer(leaf, b.to(device))
    return out


def retarget(view: Program, device: torch.device | str | None = None) -> Program:
    """In place on a copy: drop export's ``aten._assert_tensor_metadata`` checks (bf16 autocast and
    another device would trip their dtype/device) and point device arguments at ``device``."""
    dev = torch.device(device) if device is not None else None
    for n in list(view.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target == torch.ops.aten._assert_tensor_metadata.default and not n.users:
            view.graph.erase_node(n)
            continue
        if dev is not None:
            if isinstance(n.kwargs.get("device"), torch.device):
                n.kwargs = {**n.kwargs, "device": dev}
            n.args = tuple(dev if isinstance(a, torch.device) else a for a in n.args)
    view.recompile()
    return view


def on_device(program: Program, device: torch.device | str) -> torch.fx.GraphModule:
    """A runnable copy of ``program`` on ``device`` (export bakes the example's device into the graph)
    with its own parameters and buffers: ``program`` stays where it is. (A pass's output shares its
    tensors with its input — a PTQ student's weights are the teacher's — so moving them in place would
    move the teacher too.)"""
    own = Program(copy.deepcopy(program.graph_module), program.stage, program.example_inputs)
    return retarget(own, device).graph_module.to(device)


#: the registered ops and their fusible twins (same argument names, same values)
FUSED = {fbqc.fake_quant_weight.default: fq_weight, fbqc.fake_quant_act.default: fq_act,
         fbqc.fake_quant_act_dynamic.default: fq_act_dynamic}


def fuse(view: Program) -> Program:
    """In place: call the fusible fake quant (:mod:`fbqc.ops.fused`) instead of the opaque ops."""
    for n in view.graph.nodes:
        if n.op == "call_function" and n.target in FUSED:
            n.target = FUSED[n.target]
    view.recompile()
    return view


def training_view(program: Program, act_quant: str, device: torch.device | str | None = None,
                  fused: bool = True) -> Program:
    """A copy of the graph (same tensors) with the activation quantizers used in training;
    ``fused``: through :mod:`fbqc.ops.fused` (what ``torch.compile`` fuses) instead of the ops."""
    if act_quant not in ACT_MODES:
        raise ValueError(f"act_quant must be one of {', '.join(ACT_MODES)}, got {act_quant!r}")
    view = _act_view(retarget(program.copy(), device), act_quant)
    return fuse(view) if fused else view


def _act_view(view: Program, act_quant: str) -> Program:
    if act_quant == "static":
        for n in view.graph.nodes:
            if n.target == fbqc.fake_quant_act.default:
                scale = view.attr(n.args[1])
                if not bool(torch.isfinite(scale).all()):
                    raise ValueError("act_quant='static' needs calibrated activation scales "
                                     "(run Calibrate on the student first)")
        return view
    for n in list(view.graph.nodes):
        if n.op == "call_function" and n.target == fbqc.fake_quant_act.default:
            x, _scale, _zp, bits = n.args
            if act_quant == "none":
                n.replace_all_uses_with(x)
                view.graph.erase_node(n)
            else:
                n.target = fbqc.fake_quant_act_dynamic.default
                n.args = (x, bits)
    view.graph.eliminate_dead_code()
    view.recompile()
    return view
