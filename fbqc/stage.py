"""The five stages of an fbqc program, in pipeline order."""
from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    EXPORTED = 0     # ATen graph from torch.export, meta["val"] on nodes
    ANNOTATED = 1    # quantizable nodes carry a QuantSpec in node.meta["fbqc.quant"]
    FAKE_QUANT = 2   # fbqc::fake_quant_* nodes around annotated weights and activations
    FOLDED = 3       # weights are integer constants + scales, dequantized by fbqc::dequantize_weight
    INTEGER = 4      # fbqc::quantize → fbqc::qlinear / qconv2d_1x1 → fbqc::dequantize

    def __str__(self) -> str:
        return self.name
