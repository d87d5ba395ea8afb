"""Transformer blocks by module path, and the pointwise-conv rule: what every stage calls a "block"
and a "1×1 conv".

A *block* is a module whose path ends in ``…blocks.N`` (``transformer_blocks.3``, FLUX's
``single_transformer_blocks.5``, ``blocks.0``). The default ``--include`` quantizes the layers inside
blocks; the QAT module student shards, checkpoints and compiles per block; ``blocks_only`` training
trains the parameters inside blocks; the htp backend checks blocks as graphs of their own. All of them
use the patterns below.

A *pointwise conv* is a 2-D convolution with a 1×1 kernel, stride 1, no padding, dilation 1 and one
group: a linear layer over the channel dim (what AnnotateLinears quantizes as ``conv1x1``).
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ["BLOCK_PATH", "IN_BLOCK", "BLOCK", "is_block", "in_block", "block_of", "is_pointwise"]

#: the regex of a block's module path, unanchored at the end
BLOCK_PATH = r"(^|\.)\w*blocks\.\d+"
#: a module/parameter path inside a block (``transformer_blocks.3.attn1.to_q``); the default ``--include``
IN_BLOCK = re.compile(BLOCK_PATH + r"\.")
#: a block's own module path (``transformer_blocks.3``)
BLOCK = re.compile(BLOCK_PATH + "$")


def is_block(path: str) -> bool:
    """``path`` names a block module itself (``transformer_blocks.3``)."""
    return BLOCK.search(path) is not None


def in_block(path: str) -> bool:
    """``path`` (a module or parameter path) lies inside a block (``transformer_blocks.3.ff.weight``)."""
    return IN_BLOCK.search(path) is not None


def block_of(path: str) -> str | None:
    """The outermost block prefix of a module path (``transformer_blocks.3.attn1.to_q`` →
    ``transformer_blocks.3``), or None."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if is_block(prefix):
            return prefix
    return None


def _pair(v) -> tuple:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    return v * 2 if len(v) == 1 else v


def is_pointwise(weight_shape: Sequence[int], stride=1, padding=0, dilation=1, groups: int = 1) -> bool:
    """A conv2d with this weight shape (O, C/groups, kH, kW) and these parameters is a pointwise
    (1×1) conv: kernel 1×1, stride 1, padding 0 (or ``"valid"``), dilation 1, one group."""
    return (len(weight_shape) == 4 and tuple(weight_shape[2:]) == (1, 1) and groups == 1
            and _pair(stride) == (1, 1) and (padding == "valid" or _pair(padding) == (0, 0))
            and _pair(dilation) == (1, 1))
