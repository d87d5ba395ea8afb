"""Quantization choices as data: frozen specs that annotation passes write into ``node.meta``.

Deciding *what* to quantize (annotation passes) is separate from *how the nodes are inserted*
(one generic pass, :class:`fbqc.passes.InsertFakeQuant`), as in torchao's PT2E.

Who owns a bit-width (weights and activations alike), stage by stage:

* ANNOTATED: the spec (the annotation pass writes it).
* FAKE_QUANT: the 0-d buffers the fake-quant ops read — ``<layer>.w_bits`` (weight), ``<layer>.in_bits``
  and ``<layer>.out_bits`` (activations). InsertFakeQuant creates them from the spec; from then on they
  are the truth: the QAT schedule writes them, Calibrate reads them, and the spec's bits are only the
  annotation's starting values.
* Fold copies every buffer (weight, input, output) back into the spec; from FOLDED on the spec is the
  only owner: LowerToInteger and the backends read it (the integer ops' ``bits`` arguments are copies
  of it), and the verifier rejects a FOLDED activation buffer or an INTEGER op argument that differs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from .quant_math import act_container, check_bits, narrow_levels, weight_container, wide_levels

# node.meta keys
QUANT = "fbqc.quant"      # QuantSpec on the quantized linear / conv node
ROLE = "fbqc.role"        # "weight" | "input" | "output" on inserted fbqc nodes
LAYER = "fbqc.layer"      # module path of the layer an inserted node belongs to
SPEC_KEY = "fbqc.spec"    # QuantSpec as a dict in node.meta["custom"] (kept by torch.export.save)


@dataclass(frozen=True)
class WeightSpec:
    bits: float = 4.0
    scheme: Literal["narrow", "wide"] = "narrow"
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    axis: int | None = 0

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits, "weight bits"))
        if self.scheme not in ("narrow", "wide"):
            raise ValueError(f"weight scheme must be 'narrow' or 'wide', got {self.scheme!r}")
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ValueError(f"granularity must be 'per_channel' or 'per_tensor', got {self.granularity!r}")
        if self.granularity == "per_tensor":
            object.__setattr__(self, "axis", None)

    @property
    def container(self):
        return weight_container(self.bits, self.scheme)

    @property
    def levels(self) -> tuple[int, int]:
        return narrow_levels(self.bits) if self.scheme == "narrow" else wide_levels(self.bits)


@dataclass(frozen=True)
class ActSpec:
    bits: int = 8                                   # 8 (uint8) or 16 (uint16: a layer kept at A16)
    observer: Literal["minmax", "3sigma"] = "3sigma"

    def __post_init__(self):
        if self.bits not in (8, 16):
            raise ValueError(f"activation bits must be 8 or 16, got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))      # 8.0 read from a bits buffer → 8
        if self.observer not in ("minmax", "3sigma"):
            raise ValueError(f"observer must be 'minmax' or '3sigma', got {self.observer!r}")

    @property
    def container(self):
        return act_container(self.bits)


@dataclass(frozen=True)
class QuantSpec:
    """How one linear (or pointwise conv) layer is quantized. Lives in ``node.meta["fbqc.quant"]``."""

    layer: str                                      # module path, e.g. "transformer_blocks.0.attn1.to_q"
    kind: Literal["linear", "conv1x1"] = "linear"
    weight: WeightSpec = field(default_factory=WeightSpec)
    input: ActSpec = field(default_factory=ActSpec)
    output: ActSpec = field(default_factory=ActSpec)

    def with_bits(self, weight: float | None = None, *, input: int | None = None,
                  output: int | None = None) -> "QuantSpec":
        """This spec with the given weight / input / output bit-widths (None: unchanged)."""
        return replace(self, weight=self.weight if weight is None else replace(self.weight, bits=weight),
                       input=self.input if input is None else replace(self.input, bits=input),
                       output=self.output if output is None else replace(self.output, bits=output))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(d["layer"], d["kind"], WeightSpec(**d["weight"]), ActSpec(**d["input"]),
                   ActSpec(**d["output"]))

    def describe(self) -> str:
        return f"W{self.weight.bits:g}A{self.input.bits}" + (
            f"→A{self.output.bits}" if self.output.bits != self.input.bits else "")
