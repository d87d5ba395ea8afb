"""Agreement measures of DESIGN.md §3: per layer teacher-forced, and end to end.

Per layer, each integer layer is fed the reference's own input codes and checked three ways:
1. its int32 accumulators against an independent exact computation (float64 matmul of the codes,
   exact below 2**53) — must be identical;
2. its requantized codes against the contract formula evaluated in NumPy float32 — identical;
3. its codes against the *fake-quant model's* float path for the same layer
   (``fake_quant_act(linear((xq - z_x)·S_x, Wq·S_w, b))``) — identical except at rounding ties: an
   element whose exact value lies within the fp32 error bound of that float path
   (``(K + 2)·2⁻²⁴·(Σ|x·w| + |b|)``, in output LSB) of a .5 boundary may round either way; such
   elements are counted as ties, any other difference is a failure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .ops.fake_quant import act_codes
from .ops.integer import int_matmul

_QLINEAR = torch.ops.fbqc.qlinear.default
from .quant_math import act_qmax

#: unit roundoff of float32: the float path's error is at most (K + 2)·u·(Σ|x·w| + |b|)
U32 = 2.0 ** -24


@dataclass
class LayerAgreement:
    layer: str
    elements: int
    acc_mismatches: int          # int32 kernel vs exact computation
    contract_mismatches: int     # requantized codes vs NumPy fp32 contract formula
    fq_equal: int                # codes identical to the fake-quant float path
    fq_ties: int                 # differ by 1 LSB at a .5 tie of the exact value
    fq_other: int                # any other difference (a failure)
    max_lsb: int                 # largest |difference| to the fake-quant path, in output LSB

    @property
    def exact(self) -> bool:
        return self.acc_mismatches == 0 and self.contract_mismatches == 0 and self.fq_other == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact}


def layer_args(args: list[Any]) -> dict[str, Any]:
    """An integer layer's arguments (``fbqc::qlinear`` and ``fbqc::qconv2d_1x1`` take the same) by the
    names of the op's schema: ``xq``, ``x_scale``, ``x_zp``, ``wq``, …, ``y_bits``."""
    return {a.name: v for a, v in zip(_QLINEAR._schema.arguments, args)}


def check_layer(layer: str, kind: str, args: list[Any], xq: torch.Tensor, yq: torch.Tensor
                ) -> LayerAgreement:
    """Teacher-forced check of one integer layer (``args`` as the qlinear op takes them)."""
    a = layer_args(args)
    x_last = xq.movedim(1, -1) if kind == "conv1x1" else xq
    y_last = (yq.movedim(1, -1) if kind == "conv1x1" else yq).to(torch.int64).numpy()
    wq = a["wq"].reshape(a["wq"].shape[0], -1)
    w_zp = a["w_zp"]

    acc_kernel = int_matmul(x_last, a["x_zp"], wq, w_zp).to(torch.int64).numpy()
    x_np = x_last.to(torch.int64).numpy().astype(np.float64) - a["x_zp"]
    w_np = wq.to(torch.int64).numpy().astype(np.float64)
    if w_zp is not None:
        w_np = w_np - w_zp.reshape(-1, 1).numpy()
    acc_exact = x_np @ w_np.T
    acc_mismatch = int(np.count_nonzero(acc_kernel != acc_exact))

    s_prod = np.float32(a["x_scale"]) * a["w_scale"].numpy().astype(np.float32)
    bias = np.zeros_like(s_prod) if a["bias"] is None else a["bias"].detach().numpy().astype(np.float32)
    y32 = acc_exact.astype(np.float32) * s_prod + bias
    q32 = np.clip(np.rint(y32 / np.float32(a["y_scale"])) + a["y_zp"], 0, act_qmax(a["y_bits"]))
    q32 = q32.astype(np.int64)
    contract_mismatch = int(np.count_nonzero(q32 != y_last))

    # the fake-quant model's float path for the same layer
    x_deq = (x_last.to(torch.float32) - a["x_zp"]) * torch.tensor(a["x_scale"], dtype=torch.float32)
    w_codes = wq.to(torch.float32) - (0 if w_zp is None else w_zp.reshape(-1, 1).to(torch.float32))
    w_deq = w_codes * a["w_scale"].reshape(-1, 1)
    if kind == "conv1x1":
        w4 = w_deq.reshape(*w_deq.shape, 1, 1)
        y_f = F.conv2d(x_deq.movedim(-1, 1), w4, a["bias"]).movedim(1, -1)
    else:
        y_f = F.linear(x_deq, w_deq, a["bias"])
    bits = torch.tensor(float(a["y_bits"]), dtype=torch.float32)
    q_fq = act_codes(y_f, torch.tensor(a["y_scale"], dtype=torch.float32),
                     torch.tensor(float(a["y_zp"])), bits).to(torch.int64).numpy()
    diff = np.abs(q_fq - y_last)
    y_scale = np.float64(a["y_scale"])
    exact_val = (acc_exact * s_prod.astype(np.float64) + bias) / y_scale
    magnitude = (np.abs(x_np) @ np.abs(w_np).T) * np.abs(s_prod.astype(np.float64)) + np.abs(bias)
    bound = (x_np.shape[-1] + 2) * U32 * magnitude / y_scale + 1e-9
    near_tie = np.abs(exact_val - np.floor(exact_val) - 0.5) <= bound
    ties = int(np.count_nonzero((diff == 1) & near_tie))
    other = int(np.count_nonzero(diff > 0)) - ties
    return LayerAgreement(layer, int(y_last.size), acc_mismatch, contract_mismatch,
                          int(np.count_nonzero(diff == 0)), ties, other, int(diff.max(initial=0)))


@dataclass
class EndToEnd:
    output: int
    elements: int
    max_abs: float
    rel_error: float            # ||a - b|| / ||b||
    within_1lsb: float | None   # fraction within 1 LSB of the output quantizer, if the output has one
    finite: bool = True         # both sides free of NaN/Inf (a non-finite comparison never agrees)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def end_to_end(outputs: list[torch.Tensor], reference: list[torch.Tensor],
               lsb: list[float | None] | None = None) -> list[EndToEnd]:
    if len(outputs) != len(reference):
        raise ValueError(f"artifact gives {len(outputs)} outputs, the reference has {len(reference)}")
    rows = []
    for i, (a, b) in enumerate(zip(outputs, reference)):
        a, b = a.detach().double(), b.detach().double()
        d = (a - b).abs()
        step = lsb[i] if lsb else None
        finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
        rows.append(EndToEnd(i, b.numel(), float(d.max()), float(d.norm() / b.norm().clamp_min(1e-30)),
                             float((d <= step * 1.0001).double().mean()) if step else None, finite))
    return rows


def nonfinite_rows(result: Any, path: str = "") -> list[str]:
    """``path[output]`` of every output comparison (an :func:`end_to_end` row) anywhere in a verify
    result that saw a NaN/Inf: the model's, the emitted C's, a sampled block's (``blocks.per_block.0.vs_cpu``)."""
    if isinstance(result, dict):
        if result.get("finite") is False and "output" in result:
            return [f"{path}[{result['output']}]"]
        return [r for k, v in result.items() for r in nonfinite_rows(v, f"{path}.{k}" if path else str(k))]
    if isinstance(result, list):
        rows = [r for r in result if isinstance(r, dict) and "finite" in r and "output" in r]
        if rows:                                  # a list of comparison rows: name them by output
            return [r for row in rows for r in nonfinite_rows(row, path)]
        return [r for i, v in enumerate(result) for r in nonfinite_rows(v, f"{path}.{i}")]
    return []


def output_lsb(program) -> list[float | None]:
    """Per model output: the scale of the quantizer that produced it, if it is an integer layer's."""
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    leaves, _ = torch.utils._pytree.tree_flatten(out_node.args[0])
    res = []
    for leaf in leaves:
        if isinstance(leaf, torch.fx.Node) and leaf.target == torch.ops.fbqc.dequantize.default:
            res.append(float(leaf.args[1]))
        else:
            res.append(None)
    return res


def summarize(layers: list[LayerAgreement]) -> dict[str, Any]:
    n = sum(r.elements for r in layers)
    return {"layers": len(layers), "elements": n,
            "acc_identical": all(r.acc_mismatches == 0 for r in layers),
            "contract_identical": all(r.contract_mismatches == 0 for r in layers),
            "fq_identical_fraction": sum(r.fq_equal for r in layers) / max(n, 1),
            "fq_ties": sum(r.fq_ties for r in layers),
            "fq_other": sum(r.fq_other for r in layers),
            "max_lsb": max((r.max_lsb for r in layers), default=0),
            "exact": all(r.exact for r in layers)}
