"""The stage contracts: one verifier per stage, a short allowlist of what may appear. Anything else is a bug with a name.

``verify(program, after="PassName")`` raises :class:`VerificationError` naming the pass that ran last,
the node and the rule it broke.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .fx_utils import arg, conv2d_params, is_pointwise_conv
from .program import Program
from .spec import QUANT, QuantSpec
from .stage import Stage

fbqc = torch.ops.fbqc
LINEAR, CONV2D = torch.ops.aten.linear.default, torch.ops.aten.conv2d.default

FBQC_OPS_AT = {
    Stage.EXPORTED: set(),
    Stage.ANNOTATED: set(),
    Stage.FAKE_QUANT: {fbqc.fake_quant_weight.default, fbqc.fake_quant_act.default},
    Stage.FOLDED: {fbqc.dequantize_weight.default, fbqc.fake_quant_act.default},
    Stage.INTEGER: {fbqc.quantize.default, fbqc.dequantize.default, fbqc.qlinear.default,
                    fbqc.qconv2d_1x1.default},
}
QUANT_TARGETS_AT = {
    Stage.ANNOTATED: {LINEAR, CONV2D}, Stage.FAKE_QUANT: {LINEAR, CONV2D},
    Stage.FOLDED: {LINEAR, CONV2D}, Stage.INTEGER: {fbqc.qlinear.default, fbqc.qconv2d_1x1.default},
}


class VerificationError(AssertionError):
    def __init__(self, after: str | None, stage: Stage, node: str, rule: str):
        where = f"after pass {after}" if after else "program"
        super().__init__(f"{where}: {stage} verifier: node {node}: {rule}")
        self.after, self.stage, self.node, self.rule = after, stage, node, rule


def _is_fbqc(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fbqc"


def _generic_ok(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "aten"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    return target is operator.getitem or getattr(target, "__module__", None) in ("_operator", "operator")


def _check_common(program: Program, fail: Callable[[fx.Node, str], None]) -> None:
    allowed = FBQC_OPS_AT[program.stage]
    for n in program.graph.nodes:
        if n.op in ("call_module", "call_method"):
            fail(n, f"{n.op} nodes are not allowed (expected an ATen graph)")
        if n.op != "call_function":
            continue
        if _is_fbqc(n.target):
            if n.target not in allowed:
                fail(n, f"op {n.target} is not allowed at stage {program.stage}")
        elif not _generic_ok(n.target):
            fail(n, f"op {n.target} is neither an ATen op nor getitem")
        if "val" not in n.meta and n.target is not operator.getitem:
            fail(n, "has no meta['val']")
        spec = n.meta.get(QUANT)
        if spec is not None:
            if program.stage == Stage.EXPORTED:
                fail(n, "carries a QuantSpec in an EXPORTED program")
            if not isinstance(spec, QuantSpec):
                fail(n, f"meta['{QUANT}'] is a {type(spec).__name__}, not a QuantSpec")
            if n.target not in QUANT_TARGETS_AT[program.stage]:
                fail(n, f"QuantSpec on op {n.target}, expected one of {QUANT_TARGETS_AT[program.stage]}")


def _producer(node: fx.Node, i: int, name: str):
    a = arg(node, i, name)
    return a if isinstance(a, fx.Node) else None


def _check_annotated(program, n, spec, fail):
    w = _producer(n, 1, "weight")
    if w is None or w.op != "get_attr":
        fail(n, "the weight of a quantized layer must be a get_attr constant")
    if spec.kind == "conv1x1" and not is_pointwise_conv(n, program.attr(w)):
        fail(n, f"conv1x1 spec on a conv that is not pointwise (weight {tuple(program.attr(w).shape)}, "
                f"{conv2d_params(n)})")


def _check_fake_quant(program, n, spec, fail):
    w = _producer(n, 1, "weight")
    x = _producer(n, 0, "input")
    if w is None or w.target != fbqc.fake_quant_weight.default:
        fail(n, "weight is not produced by fbqc.fake_quant_weight")
    if x is None or x.target != fbqc.fake_quant_act.default:
        fail(n, "input is not produced by fbqc.fake_quant_act")
    users = list(n.users)
    if len(users) != 1 or users[0].target != fbqc.fake_quant_act.default:
        fail(n, "output must feed exactly one fbqc.fake_quant_act")


def _check_folded(program, n, spec, fail):
    w = _producer(n, 1, "weight")
    if w is None or w.target != fbqc.dequantize_weight.default:
        fail(n, "weight is not produced by fbqc.dequantize_weight")
    wq = program.attr(w.args[0])
    if wq.dtype != spec.weight.container.dtype:
        fail(n, f"integer weight has dtype {wq.dtype}, spec wants {spec.weight.container.logical} "
                f"stored as {spec.weight.container.dtype}")
    _check_calibrated(program, n, fail)
    _check_act_bits_buffers(program, n, spec, fail)


def _check_calibrated(program, n, fail):
    for q in [_producer(n, 0, "input"), *n.users]:
        if q is None or q.target != fbqc.fake_quant_act.default:
            continue
        scale = program.attr(q.args[1])
        if not bool(torch.isfinite(scale).all()) or float(scale) <= 0:
            fail(q, "activation scale is not calibrated (run Calibrate before Fold)")


def _check_act_bits_buffers(program, n, spec, fail):
    """From FOLDED on the spec owns every bit-width (fbqc.spec): the activation bits buffers the
    FOLDED graph still reads are copies of it."""
    for q, act, role in ((_producer(n, 0, "input"), spec.input, "input"),
                         (next(iter(n.users), None), spec.output, "output")):
        if q is None or q.target != fbqc.fake_quant_act.default:
            continue
        bits = float(program.attr(q.args[3]))
        if bits != act.bits:
            fail(q, f"{role} bits buffer {q.args[3].target} holds {bits:g} but the spec says {act.bits} "
                    f"(from FOLDED on the spec owns the bit-width: Fold writes the buffers into it)")


def _check_integer(program, n, spec, fail):
    x = _producer(n, 0, "xq")
    if x is None or x.target not in (fbqc.quantize.default,):
        fail(n, "input codes are not produced by fbqc.quantize")
    for what, bits, want in (("input quantize", arg(x, 3, "bits"), spec.input.bits),
                             ("output", arg(n, 9, "y_bits"), spec.output.bits)):
        if bits != want:
            fail(n, f"{what} takes {bits} activation bits but the spec says {want}")
    wq = program.attr(n.args[3])
    if wq.dtype != spec.weight.container.dtype:
        fail(n, f"integer weight has dtype {wq.dtype}, spec wants {spec.weight.container.dtype}")
    lo, hi = int(wq.min()), int(wq.max())
    levels = spec.weight.levels
    if lo < levels[0] or hi > levels[1]:
        fail(n, f"integer weight values {lo}…{hi} exceed the {spec.weight.bits:g}-bit levels {levels}")
    for u in n.users:
        if u.target != fbqc.dequantize.default:
            fail(n, f"output codes feed {u.name} ({u.target}), expected fbqc.dequantize")


_PER_LAYER = {
    Stage.ANNOTATED: _check_annotated,
    Stage.FAKE_QUANT: _check_fake_quant,
    Stage.FOLDED: _check_folded,
    Stage.INTEGER: _check_integer,
}


def verify(program: Program, after: str | None = None) -> None:
    """Check the contract of ``program.stage``; raise VerificationError on the first broken rule."""

    def fail(node: fx.Node, rule: str):
        raise VerificationError(after, program.stage, node.name, rule)

    _check_common(program, fail)
    check = _PER_LAYER.get(program.stage)
    layers: set[str] = set()
    for n in program.quantized_nodes():
        spec: QuantSpec = n.meta[QUANT]
        if spec.layer in layers:
            fail(n, f"layer {spec.layer!r} is annotated twice")
        layers.add(spec.layer)
        if check is not None:
            check(program, n, spec, fail)
    if program.stage >= Stage.FAKE_QUANT and program.stage < Stage.INTEGER:
        for n in program.graph.nodes:
            if n.target in (LINEAR,) and QUANT not in n.meta and any(
                    isinstance(a, fx.Node) and a.target == fbqc.fake_quant_weight.default for a in n.args):
                fail(n, "fake-quantized weight feeds a layer without QuantSpec")
