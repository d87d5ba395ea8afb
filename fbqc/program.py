"""``Program``: an fx ``GraphModule`` from ``torch.export`` plus the stage it is in and its history.

The graph is the unlifted module of the ``ExportedProgram`` (``ep.module()``): parameters are
``get_attr`` nodes, so passes add constants with :meth:`Program.add_constant` and the module stays
trainable (QAT). Functional passes work on :meth:`Program.copy`, which copies the graph and shares
the tensors, so a 600 M-parameter model is not duplicated by a pass that rewrites a few nodes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .spec import QUANT, QuantSpec
from .stage import Stage


@dataclass
class PassRecord:
    name: str
    requires: str
    produces: str
    modified: bool
    seconds: float
    peak_rss_mb: float | None = None


@dataclass
class Program:
    graph_module: fx.GraphModule
    stage: Stage
    example_inputs: dict[str, Any]
    history: list[PassRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)   # source, preset, flags… (JSON-able)

    # --- running ------------------------------------------------------------------------------
    def __call__(self, **inputs):
        return self.graph_module(**inputs)

    def run_example(self):
        with torch.no_grad():
            return self(**self.example_inputs)

    # --- inputs -------------------------------------------------------------------------------
    def flat_inputs(self, inputs: dict[str, Any]) -> list[Any]:
        """The values of keyword ``inputs`` (shaped like :attr:`example_inputs`: nested dicts and lists,
        ``None`` for an absent one) in the order of the graph's placeholders: the leaves of the exported
        input tree, one per placeholder."""
        spec = getattr(self.graph_module, "_in_spec", None)
        if spec is None:                   # a graph built by hand: its placeholders are the input names
            return [inputs[n.target] for n in self.graph.nodes if n.op == "placeholder"]
        from torch.fx._pytree import tree_flatten_spec

        return tree_flatten_spec(((), dict(inputs)), spec)

    def input_names(self) -> dict[str, str]:
        """Each placeholder's name → the example input it receives: the key (``hidden_states``), or its
        path in a nested input (``added_cond_kwargs['resolution']``)."""
        from torch.utils import _pytree as pytree

        paths = pytree.tree_map_with_path(lambda path, _: str(path[0].key) + pytree.keystr(path[1:]),
                                          dict(self.example_inputs))     # the key, then the path inside it
        names = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        leaves = self.flat_inputs(paths)
        if len(leaves) != len(names):
            raise ValueError(f"the program has {len(names)} inputs, its example inputs {len(leaves)} leaves")
        return dict(zip(names, leaves))

    # --- graph access -------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def quantized_nodes(self) -> list[fx.Node]:
        """Nodes carrying a QuantSpec, in graph order."""
        return [n for n in self.graph.nodes if isinstance(n.meta.get(QUANT), QuantSpec)]

    def specs(self) -> dict[str, QuantSpec]:
        return {n.meta[QUANT].layer: n.meta[QUANT] for n in self.quantized_nodes()}

    def find(self, layer: str) -> fx.Node:
        for n in self.quantized_nodes():
            if n.meta[QUANT].layer == layer:
                return n
        raise KeyError(f"no quantized layer {layer!r} (known: {', '.join(self.specs()) or 'none'})")

    def attr(self, node: fx.Node) -> torch.Tensor:
        """The tensor behind a ``get_attr`` node."""
        if node.op != "get_attr":
            raise TypeError(f"{node.name} is a {node.op} node, not get_attr")
        obj: Any = self.graph_module
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj

    def add_constant(self, name: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
        """Register ``value`` as a buffer under a unique sanitized ``name``; return its get_attr node."""
        base = "fbqc_" + re.sub(r"\W", "_", name)
        target, i = base, 0
        while hasattr(self.graph_module, target):
            i += 1
            target = f"{base}_{i}"
        self.graph_module.register_buffer(target, value)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(target)
        node.meta["val"] = value
        return node

    def drop_unused_attrs(self) -> None:
        """Delete parameters/buffers no get_attr node references any more (e.g. folded float weights)."""
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for name in [k for k, _ in self.graph_module.named_parameters()] + \
                [k for k, _ in self.graph_module.named_buffers()]:
            if name not in used:
                *path, leaf = name.split(".")
                owner = self.graph_module.get_submodule(".".join(path))
                delattr(owner, leaf)
        self.graph_module.delete_all_unused_submodules()

    def graph_fingerprint(self) -> str:
        """Text of the graph: cheap to compare, used to check that functional passes kept their word."""
        return str(self.graph)

    # --- copying ------------------------------------------------------------------------------
    def copy(self) -> "Program":
        """New graph (node meta shallow-copied), same tensors, same stage and history."""
        old = self.graph_module.graph
        graph = fx.Graph()
        out = graph.graph_copy(old, {})
        graph.output(out)
        graph._codegen = old._codegen
        gm = fx.GraphModule(self.graph_module, graph)
        gm.meta = dict(getattr(self.graph_module, "meta", {}))
        return Program(gm, self.stage, self.example_inputs, list(self.history), dict(self.info))

    def recompile(self) -> None:
        self.graph.lint()
        self.graph_module.recompile()

    def __repr__(self) -> str:
        return (f"Program(stage={self.stage}, nodes={len(self.graph.nodes)}, "
                f"quantized={len(self.quantized_nodes())}, passes={len(self.history)})")


