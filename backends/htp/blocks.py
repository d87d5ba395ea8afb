"""Transformer blocks of an INTEGER program as subgraphs of their own (bounded-time verify and profile).

A *block* is the set of nodes that a module ``…blocks.N`` computes (``transformer_blocks.3``, FLUX's
``single_transformer_blocks.5``: named by module path, so FLUX's two lists are distinct blocks), found
from each node's ``nn_module_stack``. The integer layer ops the passes inserted (``quantize → qlinear |
qconv2d_1x1 → dequantize``) carry no module of their own after the re-export; they belong to the block
of their layer (its QuantSpec's module path).

:func:`extract` turns a block into an INTEGER :class:`~fbqc.program.Program`: placeholders are the values
the block reads from outside, get_attr constants are shared with the reference, outputs are the block's
values used outside. :func:`capture` runs the reference once and keeps the boundary values of the
chosen blocks only (with the model outputs and every layer's codes, so no second reference pass is
needed). :func:`lower_block` lowers one with the backend's own lowering; the extracted program run in
torch on the captured inputs reproduces the captured outputs bit for bit (tests/test_htp_blocks.py).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from fbqc.blocks import block_of
from fbqc.errors import UserError
from fbqc.program import Program
from fbqc.spec import QUANT
from fbqc.stage import Stage
from fbqc.stage_contract import QUANT_TARGETS_AT

_LAYER_OPS = QUANT_TARGETS_AT[Stage.INTEGER]          # the integer layer ops
_Q, _DQ = torch.ops.fbqc.quantize.default, torch.ops.fbqc.dequantize.default


@dataclass
class Block:
    name: str                                            # module path, e.g. transformer_blocks.3
    index: int                                           # position among the program's blocks
    nodes: list[fx.Node] = field(default_factory=list)   # call_function nodes, graph order
    inputs: list[fx.Node] = field(default_factory=list)  # values read from outside (not get_attr)
    outputs: list[fx.Node] = field(default_factory=list)  # values used outside
    layers: list[str] = field(default_factory=list)      # its quantized layers, graph order

    @property
    def group(self) -> str:
        """The block list it belongs to (``transformer_blocks``): blocks of one list cost alike."""
        return self.name.rpartition(".")[0]


def _stack_block(node: fx.Node) -> str | None:
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        b = block_of(path)
        if b is not None:
            return b
    return None


def find_blocks(program: Program) -> list[Block]:
    """The program's transformer blocks in graph order (empty if it has none)."""
    member: dict[fx.Node, str] = {}
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    for n in nodes:
        b = _stack_block(n)
        if n.target in _LAYER_OPS and QUANT in n.meta:
            b = block_of(n.meta[QUANT].layer)
        if b is not None:
            member[n] = b
    for n in nodes:                      # a layer's own quantize / dequantize go with the layer
        if n.target in _LAYER_OPS and n in member:
            xq = n.args[0]
            if isinstance(xq, fx.Node) and xq.target is _Q and \
                    all(member.get(u) == member[n] for u in xq.users):
                member[xq] = member[n]
            for u in n.users:
                if u.target is _DQ:
                    member[u] = member[n]
    blocks: dict[str, Block] = {}
    for n in nodes:
        if n in member:
            name = member[n]
            if name not in blocks:
                blocks[name] = Block(name, len(blocks))
            blocks[name].nodes.append(n)
    for b in blocks.values():
        inside = set(b.nodes)
        seen: set[fx.Node] = set()
        for n in b.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and a not in seen:
                    seen.add(a)
                    b.inputs.append(a)
            if n.target in _LAYER_OPS and QUANT in n.meta:
                b.layers.append(n.meta[QUANT].layer)
        b.outputs = [n for n in b.nodes if any(u not in inside for u in n.users)]
    return list(blocks.values())


# --- choosing blocks: --blocks SPEC / --sample K ----------------------------------------------------

def describe(blocks: list[Block]) -> str:
    """``transformer_blocks.0…18, single_transformer_blocks.0…37 (57 blocks, indices 0–56)``."""
    groups: dict[str, list[str]] = {}
    for b in blocks:
        groups.setdefault(b.group, []).append(b.name.rpartition(".")[2])
    parts = [f"{g}.{ids[0]}" + (f"…{ids[-1]}" if len(ids) > 1 else "") for g, ids in groups.items()]
    return f"{', '.join(parts)} ({len(blocks)} blocks, indices 0–{len(blocks) - 1})"


def sample(blocks: list[Block], k: int) -> list[Block]:
    """``k`` evenly spaced blocks, the first and the last included."""
    if k < 1:
        raise UserError(f"--sample {k}: give at least 1 block")
    n = len(blocks)
    k = min(k, n)
    if k == 1:
        return blocks[:1]
    idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [blocks[i] for i in idx]


def select(blocks: list[Block], spec: str | None = None, k: int | None = None, flag: str = "--blocks"
           ) -> list[Block]:
    """Blocks named by ``spec`` (``all``, ``first,middle,last``, indices ``0,13,27`` or names) or ``--sample k``."""
    if not blocks:
        raise UserError(f"{flag}: the model has no transformer blocks (no module path like "
                        f"transformer_blocks.N); run without it to check the whole model")
    if spec is not None and k is not None:
        raise UserError("give --blocks or --sample, not both")
    if k is not None:
        return sample(blocks, k)
    by_name = {b.name: b for b in blocks}
    n = len(blocks)
    chosen: set[int] = set()
    for tok in (t.strip() for t in (spec or "").split(",")):
        if not tok:
            continue
        if tok == "all":
            chosen.update(range(n))
        elif tok in ("first", "middle", "last"):
            chosen.add({"first": 0, "middle": (n - 1) // 2, "last": n - 1}[tok])
        elif re.fullmatch(r"-?\d+", tok) and -n <= int(tok) < n:
            chosen.add(int(tok) % n)
        elif tok in by_name:
            chosen.add(by_name[tok].index)
        else:
            raise UserError(f"{flag} {spec!r}: no block {tok!r}; known: {describe(blocks)}; or all, "
                            f"first, middle, last")
    if not chosen:
        raise UserError(f"{flag} {spec!r} names no block; known: {describe(blocks)}")
    return [blocks[i] for i in sorted(chosen)]


# --- extraction and the reference's boundary values -------------------------------------------------

def _constant_owner(program: Program, target: str) -> tuple[str, Any]:
    *path, leaf = target.split(".")
    owner = program.graph_module.get_submodule(".".join(path))
    kind = "parameter" if leaf in owner._parameters else "buffer" if leaf in owner._buffers else "attr"
    return kind, getattr(owner, leaf)


def _root(program: Program, targets: list[str]) -> torch.nn.Module:
    """A module holding the named constants (the same tensors) under the same dotted names."""
    root = torch.nn.Module()
    for target in targets:
        kind, value = _constant_owner(program, target)
        *path, leaf = target.split(".")
        owner = root
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        if kind == "parameter":
            owner.register_parameter(leaf, value)
        elif kind == "buffer":
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)
    return root


def extract(program: Program, block: Block, example_inputs: dict[str, Any] | None = None) -> Program:
    """Block ``block`` of ``program`` as an INTEGER program (inputs named after the outside values)."""
    for inp in block.inputs:
        if not isinstance(inp.meta.get("val"), torch.Tensor):
            raise UserError(f"block {block.name}: input {inp.name} is not a tensor "
                            f"({type(inp.meta.get('val')).__name__}); only tensors can cross a block boundary")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in block.inputs:
        ph = graph.placeholder(inp.name)
        ph.meta["val"] = inp.meta["val"]
        env[inp] = ph
    attrs: list[str] = []
    for n in block.nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = graph.get_attr(a.target)
                env[a].meta = dict(a.meta)
                attrs.append(a.target)
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[o] for o in block.outputs))
    gm = fx.GraphModule(_root(program, attrs), graph)
    info = {**program.info, "block": block.name}
    return Program(gm, Stage.INTEGER, dict(example_inputs or {}), [], info)


@dataclass
class Capture:
    """One reference pass: model outputs, every layer's codes, the chosen blocks' boundary values."""

    outputs: list[torch.Tensor]
    codes: dict[str, dict[str, torch.Tensor]]
    inputs: dict[str, dict[str, torch.Tensor]]     # block → {input name: value}
    block_outputs: dict[str, list[torch.Tensor]]   # block → values, in block.outputs order


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node], codes: bool):
        super().__init__(gm, garbage_collect_values=True)
        self.keep, self.kept, self.record_codes = keep, {}, codes
        self.codes: dict[str, dict[str, torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.record_codes and n.op == "call_function" and n.target in _LAYER_OPS and QUANT in n.meta:
            args, _ = self.fetch_args_kwargs_from_env(n)
            value = super().run_node(n)
            self.codes[n.meta[QUANT].layer] = {"xq": args[0], "yq": value}
        else:
            value = super().run_node(n)
        if n in self.keep:
            self.kept[n] = value
        return value


def capture(program: Program, inputs: dict[str, Any], blocks: list[Block] = (), codes: bool = True) -> Capture:
    """Run ``program`` on ``inputs`` once (an fx Interpreter that frees values after their last use);
    ``codes``: also record every layer's input and output codes."""
    from fbqc.fx_utils import flat_tensors

    gm = program.graph_module
    keep = {n for b in blocks for n in (*b.inputs, *b.outputs)}
    rec = _Recorder(gm, keep, codes)
    flat = program.flat_inputs(inputs)
    with torch.no_grad():
        out = rec.run(*flat, enable_io_processing=False)
    outputs = flat_tensors(gm.graph.process_outputs(out))
    return Capture(outputs, rec.codes,
                   {b.name: {i.name: rec.kept[i] for i in b.inputs} for b in blocks},
                   {b.name: [rec.kept[o] for o in b.outputs] for b in blocks})


def lower_block(program: Program, block: Block):
    """The block program lowered for the HTP (:func:`~.lower.lower`); an input the lowering would have
    to bake (it feeds float64 computation) or cannot take (float64, int64 beyond int32) is an error
    naming the block and the input."""
    from .lower import lower

    for name, value in program.example_inputs.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            raise UserError(f"block {block.name}: input {name} is float64 (the HTP has no float64); "
                            f"check the whole model (--full) instead")
    try:
        low = lower(program)
    except ValueError as e:
        raise UserError(f"block {block.name}: {e}") from e
    except RuntimeError as e:
        raise UserError(f"block {block.name}: lowering failed: {e}") from e
    if low.prepared.baked_inputs:
        names = ", ".join(low.prepared.baked_inputs)
        raise UserError(f"block {block.name}: input(s) {names} feed float64 computation; the lowering "
                        f"would bake their values into the block's graph; check the whole model (--full) "
                        f"instead")
    return low


# --- a block as a graph for the HTP simulator -------------------------------------------------------

@dataclass
class BlockGraph:
    """A selected block lowered and saved: the QDQ graph, its feeds (the reference's boundary values)."""

    block: Block
    qdq: Path                               # the block's QDQ ONNX (what profile compiles)
    model: Path                             # what verify compiles: ``qdq`` + each layer's output exposed
    outputs: int                            # the block's own outputs come first
    layer_outputs: dict[str, str]           # layer → ONNX output name of its dequantized output
    feeds: dict[str, np.ndarray]
    gmac: float
    lower_seconds: float


def feeds_for(model: ir.Model, values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The ONNX graph's inputs from the boundary values, cast to its input types (int64 → int32)."""
    out = {}
    for v in model.graph.inputs:
        x = values[v.name].detach().cpu().numpy()
        out[v.name] = np.ascontiguousarray(x.astype(v.dtype.numpy(), copy=False))
    return out


def build(program: Program, block: Block, inputs: dict[str, torch.Tensor], out_dir: Path,
          layer_outputs: bool = True) -> BlockGraph:
    """Extract, lower and save ``block`` under ``out_dir`` (``block.qdq.onnx``, ``block.layers.onnx``)."""
    from .estimate import gmac
    from .qnn_compile import QDQ_FILE, save_qdq
    from .verify_build import with_layer_outputs

    t = time.perf_counter()
    low = lower_block(extract(program, block, inputs), block)
    out_dir.mkdir(parents=True, exist_ok=True)
    qdq = save_qdq(low, out_dir).rename(out_dir / f"block.{QDQ_FILE}")
    n_out = len(low.model.graph.outputs)
    names: dict[str, str] = {}
    model = qdq
    if layer_outputs and block.layers:
        _, names = with_layer_outputs(low.model, block.layers)
        model = out_dir / "block.layers.onnx"
        ir.save(low.model, model)
    return BlockGraph(block, qdq, model, n_out, names, feeds_for(low.model, inputs), gmac(block.nodes),
                      time.perf_counter() - t)
