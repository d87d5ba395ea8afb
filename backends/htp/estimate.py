"""How long simulator work will take, from the multiply-accumulates (MACs) of the graph involved.

The QNN HTP simulator's time grows with the work the graph does; the rates below were measured on
the 2-core development machine (onnxruntime-qnn 2.7.0, QNN 2.51, SM8750). An estimate states them as
its basis; it is meant to tell seconds from minutes from hours, not to be precise.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.fx as fx

from fbqc.spec import QUANT
from fbqc.stage import Stage
from fbqc.stage_contract import QUANT_TARGETS_AT

aten = torch.ops.aten
_LAYER_OPS = QUANT_TARGETS_AT[Stage.INTEGER]          # the integer layer ops

#: Sana-600M at 1024 tokens, teacher-forced check of its 280 W4A8 layers (536 GMAC, 415.7 M output
#: codes): 28 s QNN compile + 316 s on the simulator
LAYERS_COMPILE_S_PER_GMAC = 28 / 536
LAYERS_SIM_S_PER_GMAC = 316 / 536
#: a whole graph (a block, or the model: the float ops between the layers — norms, attention,
#: activations, fp16 on the HTP — cost the simulator ~4.5× the layers' time per GMAC). Sana-600M at 1024
#: tokens: one block compiled on its own (20.0 GMAC): 3.3 s compile + 54 s simulated; the 1-block
#: model's context (21.3 GMAC) ran 78 s, its free-running graph 5 s + 78 s (the same run's teacher-forced
#: check of the block's 10 layers, 19.1 GMAC: 0.8 s + 11.2 s, the layer rate above)
GRAPH_COMPILE_S_PER_GMAC = 0.16
GRAPH_SIM_S_PER_GMAC = 2.7
#: each session: graph preparation, simulator start (tiny models are all overhead)
SESSION_SECONDS = 0.3
GRAPH_BASIS = "a Sana-600M block at 1024 tokens, 20.0 GMAC: 3.3 s compile + 54 s simulator"
LAYERS_BASIS = "Sana-600M's 280 layers, 536 GMAC: 28 s compile + 316 s simulator"
#: below this estimate for the whole-model checks, verify runs them by default
AUTO_FULL_SECONDS = 120.0


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def node_macs(n: fx.Node) -> int:
    """MACs of one node: integer layers, float matmuls, linears, convolutions, attention; else 0."""
    if n.op != "call_function":
        return 0
    out = _shape(n)
    if out is None:
        return 0
    numel = math.prod(out)
    if n.target in _LAYER_OPS:
        w = _shape(n.args[3])
        return numel * (w[1] if w else 0)
    if n.target in (aten.linear.default,):
        w = _shape(n.args[1])
        return numel * (w[-1] if w else 0)
    if n.target in (aten.mm.default, aten.bmm.default, aten.matmul.default):
        a = _shape(n.args[0])
        return numel * (a[-1] if a else 0)
    if n.target in (aten.addmm.default, aten.baddbmm.default):
        a = _shape(n.args[1])
        return numel * (a[-1] if a else 0)
    if n.target in (aten.convolution.default, aten.conv2d.default, aten.conv1d.default):
        w = _shape(n.args[1])
        return numel * (math.prod(w[1:]) if w else 0)
    if n.target is aten.scaled_dot_product_attention.default:
        q, k = _shape(n.args[0]), _shape(n.args[1])
        if q and k:
            return 2 * math.prod(q[:-1]) * k[-2] * q[-1]
    return 0


def gmac(nodes: Iterable[fx.Node]) -> float:
    return sum(node_macs(n) for n in nodes) / 1e9


def layer_gmac(program) -> float:
    return gmac(n for n in program.graph.nodes if n.target in _LAYER_OPS and QUANT in n.meta)


def layers_seconds(g: float) -> tuple[float, float]:
    """(compile, simulate) seconds of the teacher-forced layer model of ``g`` GMAC."""
    return SESSION_SECONDS + LAYERS_COMPILE_S_PER_GMAC * g, LAYERS_SIM_S_PER_GMAC * g


def graph_seconds(g: float) -> tuple[float, float]:
    """(compile, simulate) seconds of a whole graph (block or model) of ``g`` GMAC."""
    return SESSION_SECONDS + GRAPH_COMPILE_S_PER_GMAC * g, GRAPH_SIM_S_PER_GMAC * g


def whole_model_seconds(g: float) -> float:
    """verify --full's whole-model work: the context binary run + the free-running graph compiled and run."""
    c, s = graph_seconds(g)
    return SESSION_SECONDS + c + 2 * s


def basis() -> str:
    return (f"rates measured on a 2-core x86 machine: side-by-side layers {LAYERS_SIM_S_PER_GMAC:.2f} s/GMAC "
            f"simulated + {LAYERS_COMPILE_S_PER_GMAC:.2f} s/GMAC compile ({LAYERS_BASIS}); whole graphs "
            f"{GRAPH_SIM_S_PER_GMAC:.1f} s/GMAC simulated + {GRAPH_COMPILE_S_PER_GMAC:.2f} s/GMAC compile "
            f"({GRAPH_BASIS}); {SESSION_SECONDS} s per session")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
