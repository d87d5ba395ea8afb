"""Non-finite values (NaN, ±Inf) never pass as a result: find them and name where they start."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .spec import QUANT, QuantSpec


def nonfinite(tensors: list[torch.Tensor]) -> list[int]:
    """Indices of the floating-point tensors that hold a NaN or an Inf."""
    return [i for i, t in enumerate(tensors)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def describe_node(node: fx.Node) -> str:
    """A node as a user knows it: its quantized layer, else its module path and op."""
    spec = node.meta.get(QUANT)
    target = getattr(node.target, "__name__", str(node.target))
    if isinstance(spec, QuantSpec):
        return f"quantized layer {spec.layer} (node {node.name}, {target})"
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else None
    text = f"node {node.name} ({target}{', in module ' + path if path else ''})"
    fed = _nearest_quantized(node)
    return text + (f", downstream of quantized layer {fed}" if fed else "")


def _nearest_quantized(node: fx.Node) -> str | None:
    """The closest quantized layer upstream of ``node`` (breadth-first over its inputs)."""
    seen, frontier = {node}, list(node.all_input_nodes)
    while frontier:
        nxt = []
        for n in frontier:
            spec = n.meta.get(QUANT)
            if isinstance(spec, QuantSpec):
                return spec.layer
            for m in n.all_input_nodes:
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
        frontier = nxt
    return None


class _FirstNonFinite(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.first: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.first is None and n.op not in ("placeholder", "get_attr", "output"):
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if nonfinite(leaves):
                self.first = n
        return out


def first_nonfinite_node(program, inputs: dict[str, Any]) -> str | None:
    """The first node (graph order) of ``program`` whose value on ``inputs`` is not finite, described;
    None when every value is finite (a parameter that is itself non-finite shows as its first user)."""
    interp = _FirstNonFinite(program.graph_module)
    with torch.no_grad():
        interp.run(*program.flat_inputs(inputs))
    return describe_node(interp.first) if interp.first is not None else None

