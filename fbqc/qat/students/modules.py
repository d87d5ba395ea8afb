"""The module student: the QuantSpecs applied to the eager model, for distributed training.

The FAKE_QUANT program is flat, so DDP can wrap it but FSDP2 cannot shard it per block, nor can
activation checkpointing or regional ``torch.compile`` find the blocks. The module student keeps the
user's module hierarchy: each annotated ``nn.Linear`` / pointwise ``nn.Conv2d`` becomes a
:class:`FakeQuantLinear` / :class:`FakeQuantConv2d` *in place* (its class is swapped, so parameter
names, the state dict and ``fbqc compile RUN_DIR``'s loading are unchanged) whose forward is the same
fake quant the program runs — weight per channel, activation on the input and the output — through
the fusible functions of :mod:`fbqc.ops.fused`. The specs come from the same
:class:`~fbqc.passes.AnnotateLinears` rule (``spec_for``) as the exported program: one source of truth.

Bit-widths live in 0-d non-persistent float64 buffers on each layer (``fbqc_w_bits``); the schedule
writes them with ``fill_``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fbqc.blocks import is_block, is_pointwise
from fbqc.ops.fused import fq_act_dynamic, fq_weight
from fbqc.spec import QuantSpec

__all__ = ["FakeQuantLinear", "FakeQuantConv2d", "annotate_modules", "quantize_modules", "module_bits",
           "block_modules"]

class _FakeQuantMixin:
    fbqc_spec: QuantSpec
    fbqc_act: str
    fbqc_fused: bool = True          # False: the opaque registered ops (the straightforward baseline)

    def _act(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        if self.fbqc_act != "dynamic":
            return x
        return fq_act_dynamic(x, bits) if self.fbqc_fused else torch.ops.fbqc.fake_quant_act_dynamic(x, bits)

    def _fq_in(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(x, self.fbqc_a_bits)

    def _fq_out(self, y: torch.Tensor) -> torch.Tensor:
        return self._act(y, self.fbqc_o_bits)

    def _fq_w(self) -> torch.Tensor:
        w = self.fbqc_spec.weight
        fq = fq_weight if self.fbqc_fused else torch.ops.fbqc.fake_quant_weight
        return fq(self.weight, self.fbqc_w_bits, w.axis, w.scheme)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fbqc={self.fbqc_spec.describe()}, act={self.fbqc_act}"


class FakeQuantLinear(_FakeQuantMixin, torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_out(F.linear(self._fq_in(x), self._fq_w(), self.bias))


class FakeQuantConv2d(_FakeQuantMixin, torch.nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_out(self._conv_forward(self._fq_in(x), self._fq_w(), self.bias))


def _pointwise(m: torch.nn.Conv2d) -> bool:
    return is_pointwise(m.weight.shape, m.stride, m.padding, m.dilation, m.groups)


def annotate_modules(model: torch.nn.Module, annotate) -> dict[str, QuantSpec]:
    """``{module path: QuantSpec}`` for the model's Linear / pointwise Conv2d modules that
    ``annotate`` (an :class:`~fbqc.passes.AnnotateLinears`) selects — the rule the program uses."""
    specs, candidates = {}, []
    for name, m in model.named_modules():
        kind = ("linear" if type(m) is torch.nn.Linear
                else "conv1x1" if type(m) is torch.nn.Conv2d and _pointwise(m) else None)
        candidates += [name] if kind else []
        spec = annotate.spec_for(name, kind) if kind else None
        if spec is not None:
            specs[name] = spec
    annotate.check_overrides_match(candidates)
    if not specs:
        raise ValueError("no nn.Linear or pointwise nn.Conv2d module matched --include "
                         "(the module student quantizes modules; check --include/--exclude)")
    return specs


def quantize_modules(model: torch.nn.Module, specs: dict[str, QuantSpec], act_quant: str = "dynamic", *,
                     fused: bool = True) -> dict[str, torch.Tensor]:
    """In place: turn the layers named in ``specs`` into fake-quant layers; returns their bits buffers.

    ``act_quant``: ``dynamic`` (per-sample, what training uses) or ``none``. ``fused=False`` calls the
    opaque registered ops instead of :mod:`fbqc.ops.fused` (same values; for comparisons).
    """
    if act_quant not in ("dynamic", "none"):
        raise ValueError(f"the module student supports --act-quant dynamic or none, got {act_quant!r} "
                         f"(static scales need the program student: train with --nproc 1)")
    for layer, spec in specs.items():
        try:
            m = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"layer {layer} is not a submodule of {type(model).__name__}") from None
        cls = {torch.nn.Linear: FakeQuantLinear, torch.nn.Conv2d: FakeQuantConv2d}.get(type(m))
        if cls is None or (cls is FakeQuantConv2d and not _pointwise(m)):
            raise ValueError(f"layer {layer} is a {type(m).__name__}; the module student quantizes "
                             f"nn.Linear and pointwise nn.Conv2d modules (train with --nproc 1)")
        dev = m.weight.device
        m.__class__ = cls
        m.fbqc_spec, m.fbqc_act, m.fbqc_fused = spec, act_quant, fused
        for key, bits in (("fbqc_w_bits", spec.weight.bits), ("fbqc_a_bits", spec.input.bits),
                          ("fbqc_o_bits", spec.output.bits)):
            m.register_buffer(key, torch.tensor(float(bits), dtype=torch.float64, device=dev),
                              persistent=False)
    return module_bits(model)


def module_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: its weight-bits buffer}`` of a quantized model, in module order."""
    return {name: m.fbqc_w_bits for name, m in model.named_modules() if isinstance(m, _FakeQuantMixin)}


def block_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks (``…blocks.N``, :func:`fbqc.blocks.is_block`), outermost first; FSDP2
    shards, checkpoints and compiles them."""
    return [(n, m) for n, m in model.named_modules() if is_block(n)]
