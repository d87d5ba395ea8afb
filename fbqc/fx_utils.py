"""Small helpers over torch.fx nodes shared by the verifier, passes and backends."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .blocks import is_pointwise

CONV2D_DEFAULTS = {"bias": None, "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}


def flat_tensors(out: Any, detach: bool = True) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in pytree order (``detach``: without their graphs)."""
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.detach() if detach else t for t in leaves if isinstance(t, torch.Tensor)]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call_function node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def conv2d_params(node: fx.Node) -> dict[str, Any]:
    """bias/stride/padding/dilation/groups of an ``aten.conv2d.default`` node, defaults filled in."""
    names = ["bias", "stride", "padding", "dilation", "groups"]
    out = {k: arg(node, i + 2, k, CONV2D_DEFAULTS[k]) for i, k in enumerate(names)}
    for k in ("stride", "padding", "dilation"):
        v = out[k]
        out[k] = list(v) * 2 if len(v) == 1 else list(v)
    return out


def is_pointwise_conv(node: fx.Node, weight: torch.Tensor) -> bool:
    """An ``aten.conv2d`` node with ``weight`` is a pointwise (1×1) conv (:func:`fbqc.blocks.is_pointwise`)."""
    p = conv2d_params(node)
    return is_pointwise(weight.shape, p["stride"], p["padding"], p["dilation"], p["groups"])


def meta_val(shape, dtype: torch.dtype) -> torch.Tensor:
    """A shape/dtype description for ``node.meta['val']`` of nodes a pass creates."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")
