"""AnnotateLinears: decide which layers are quantized and how, as frozen specs in ``node.meta``."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable, Mapping

import torch

from fbqc.blocks import IN_BLOCK
from fbqc.fx_utils import arg, is_pointwise_conv
from fbqc.pass_infra import Pass, PassResult, PostconditionError, PreconditionError
from fbqc.program import Program
from fbqc.quant_math import check_bits
from fbqc.spec import QUANT, ActSpec, QuantSpec, WeightSpec
from fbqc.stage import Stage

LINEAR, CONV2D = torch.ops.aten.linear.default, torch.ops.aten.conv2d.default

#: every linear / 1×1 conv inside the transformer blocks (``transformer_blocks.N.``,
#: ``single_transformer_blocks.N.`` …); embeddings, norms, the final projection stay float.
DEFAULT_INCLUDE = (IN_BLOCK.pattern,)


def layer_name(weight_target: str) -> str:
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


def _compile(patterns: Iterable[str], flag: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{flag} {p!r} is not a valid regular expression: {e}") from None
    return out


class AnnotateLinears(Pass):
    """Annotate aten.linear and 1x1 aten.conv2d nodes (default: inside *blocks.N.) with QuantSpecs.

    ``include``/``exclude`` are regular expressions searched in the layer's module path
    (e.g. ``transformer_blocks.3.attn1.to_q``); ``layer_bits`` maps a pattern to a weight bit-width
    and ``layer_act_bits`` to 8 or 16 activation bits (the last matching pattern wins). A layer that
    an override names is quantized even if ``include`` does not match it; ``exclude`` always wins.
    """

    requires = (Stage.EXPORTED, Stage.ANNOTATED)
    produces = Stage.ANNOTATED

    def __init__(self, bits: float = 4.0, *, scheme: str = "narrow", granularity: str = "per_channel",
                 act_bits: int = 8, observer: str = "3sigma",
                 include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = (),
                 layer_bits: Mapping[str, float] | None = None,
                 layer_act_bits: Mapping[str, int] | None = None):
        self.bits = check_bits(bits, "--bits")
        self.weight = WeightSpec(self.bits, scheme, granularity)
        self.act = ActSpec(act_bits, observer)
        self.include = list(include)
        self.exclude = list(exclude)
        self.layer_bits = {k: check_bits(v, f"--layer-bits {k}") for k, v in (layer_bits or {}).items()}
        self.layer_act_bits = dict(layer_act_bits or {})
        self._inc = _compile(self.include, "--include")
        self._exc = _compile(self.exclude, "--exclude")
        self._wb = list(zip(_compile(self.layer_bits, "--layer-bits"), self.layer_bits.values()))
        self._ab = list(zip(_compile(self.layer_act_bits, "--a16"), self.layer_act_bits.values()))

    def spec_for(self, layer: str, kind: str) -> QuantSpec | None:
        bits = [b for p, b in self._wb if p.search(layer)]
        abits = [b for p, b in self._ab if p.search(layer)]
        included = bool(bits or abits) or any(p.search(layer) for p in self._inc)
        if not included or any(p.search(layer) for p in self._exc):
            return None
        weight = replace(self.weight, bits=bits[-1]) if bits else self.weight
        act = replace(self.act, bits=abits[-1]) if abits else self.act
        return QuantSpec(layer, kind, weight, act, act)

    def check_overrides_match(self, layers: list[str]) -> None:
        """Every --layer-bits / --a16 pattern names at least one candidate layer (a typo that matches
        nothing would otherwise leave those layers at the default bits, silently)."""
        for flag, patterns in (("--layer-bits", self._wb), ("--a16", self._ab)):
            for p, _ in patterns:
                if not any(p.search(layer) for layer in layers):
                    example = layers[len(layers) // 2] if layers else "transformer_blocks.0.attn1.to_q"
                    raise ValueError(f"{flag} pattern {p.pattern!r} matches no linear or 1x1 conv layer "
                                     f"(layers are named like {example!r}; fbqc compile --dry-run lists "
                                     f"the quantized ones)")

    def run(self, program: Program) -> PassResult:
        modified = False
        skipped = {}
        candidates = []
        for node in program.graph.nodes:
            if node.op != "call_function" or node.target not in (LINEAR, CONV2D):
                continue
            w = arg(node, 1, "weight")
            if not (hasattr(w, "op") and w.op == "get_attr"):
                continue
            layer = layer_name(w.target)
            candidates.append(layer)
            kind = "linear"
            if node.target is CONV2D:
                if not is_pointwise_conv(node, program.attr(w)):
                    skipped[layer] = "conv is not pointwise (1x1, stride 1, groups 1)"
                    continue
                kind = "conv1x1"
            spec = self.spec_for(layer, kind)
            if spec is None:
                continue
            if node.meta.get(QUANT) != spec:
                node.meta[QUANT] = spec
                modified = True
        try:
            self.check_overrides_match(candidates)
        except ValueError as e:
            raise PreconditionError(self.name, str(e)) from None
        program.info.setdefault("skipped_layers", {}).update(skipped)
        return PassResult(program, modified)

    def check_ensures(self, program: Program) -> None:
        if not program.quantized_nodes():
            raise PostconditionError(self.name, "no linear or 1x1 conv layer matched --include "
                                     f"{self.include} (exclude {self.exclude}); nothing to quantize")
