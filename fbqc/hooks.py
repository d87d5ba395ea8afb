"""Shadow programs whose chosen call_function nodes are routed through Python hooks.

Used by calibration (observers in place of fake_quant_act) and verification (record the codes that
enter and leave each integer layer). The shadow shares tensors with the original and runs as
compiled fx code, not through an Interpreter.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from .program import Program


class NodeHook:
    """Callable standing in for a node's target; ``fn(node_name, target, *args)`` returns the value."""

    def __init__(self, node: fx.Node, fn: Callable):
        self.node_name, self.target, self.fn = node.name, node.target, fn
        self.__name__ = self.__qualname__ = f"hook_{node.name}"

    def __call__(self, *args, **kwargs):
        return self.fn(self.node_name, self.target, *args, **kwargs)


def hooked(program: Program, select: Callable[[fx.Node], bool], fn: Callable) -> tuple[Program, dict]:
    """Copy ``program`` and replace the target of every selected node by a :class:`NodeHook`.

    Returns the shadow and ``{node_name: original node}`` of the selected nodes in the *original*.
    """
    shadow = program.copy()
    originals = {n.name: n for n in program.graph.nodes}
    chosen = {}
    for n in shadow.graph.nodes:
        if n.op == "call_function" and select(n):
            chosen[n.name] = originals[n.name]
            n.target = NodeHook(n, fn)
    shadow.graph_module.recompile()
    return shadow, chosen
