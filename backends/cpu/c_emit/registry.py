"""Which emitter writes the C code of which op: keyed by the op object (``OpOverload``), never a string.

Each module of ``ops/`` marks its emitters with :func:`emits`; :func:`table` collects them from the
explicit list :data:`OP_MODULES` (nothing registers itself as an import side effect).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.fx as fx

from fbqc.errors import UserError

OP_MODULES = ("views", "concat", "elementwise", "reductions", "norms", "attention", "matmul", "conv",
              "creation", "quantized", "noops")

Emitter = Callable[[Any, fx.Node], Any]
_table: dict[object, Emitter] | None = None


def emits(*ops: object) -> Callable[[Emitter], Emitter]:
    """Mark ``fn`` as the emitter of ``ops`` (``torch._ops.OpOverload`` objects)."""
    def mark(fn: Emitter) -> Emitter:
        fn.fbqc_ops = ops  # type: ignore[attr-defined]
        return fn
    return mark


def table() -> dict[object, Emitter]:
    global _table
    if _table is None:
        found: dict[object, Emitter] = {}
        for name in OP_MODULES:
            mod = importlib.import_module(f"{__package__}.ops.{name}")
            for fn in vars(mod).values():
                for op in getattr(fn, "fbqc_ops", ()):
                    if op in found:
                        raise RuntimeError(f"two C emitters for {op}: {found[op].__name__}, {fn.__name__}")
                    found[op] = fn
        _table = found
    return _table


def emitter_for(node: fx.Node) -> Emitter:
    fn = table().get(node.target)
    if fn is None:
        raise UserError(f"--emit-c: no C generator for op {node.target} (node {node.name}); add one in "
                        f"backends/cpu/c_emit/ops/ or compile without --emit-c")
    return fn


def supported_ops() -> list[str]:
    return sorted(str(op) for op in table())
