"""The listing format: an INTEGER program as text, one statement per graph node (``program.listing``).

::

    # fbqc-listing 1
    %hidden_states = input('hidden_states')                          # f32[1, 32, 8, 8]
    %proj_out_weight = constant('proj_out.weight')                   # f32[128, 64]
    %mul = torch.ops.aten.mul.Tensor(%silu, 0.5)                     # f32[1, 64]
    # layer transformer_blocks.0.attn1.to_q: linear W4A8, weight 4 bits narrow per channel, levels -8…7 …
    #   x_scale=0.0213 x_zp=131 w_scale[64]=0.00114…0.00931 y_scale=0.0402 y_zp=127
    %qlinear: layer('transformer_blocks.0.attn1.to_q') = torch.ops.fbqc.qlinear.default(%quantize, …)
    %getitem = operator.getitem(%chunk, 0)                           # f32[1, 64]
    return (%reshape_5,)

A statement is ``%name = <op>(<args>, <keyword>=<value>)`` where ``<op>`` is an operator's qualified name
(``torch.ops.<namespace>.<op>.<overload>``, or ``operator.getitem`` for fx's picks out of multi-output
ops) and every value is a node reference ``%name``, a Python literal (int, float — ``float('inf')`` for
non-finite ones —, str, bool, None, lists and tuples of values) or a torch enum (``torch.float32``,
``torch.strided``, ``torch.contiguous_format``, ``torch.device('cpu')``). ``input('key')`` binds an
example input (the lines come in the program's input order), ``constant('key')`` a tensor of
``constants.safetensors`` (``--listing-constants inline``: ``tensor(<dtype>, <shape>, <values>)``
instead), ``: layer('<name>')`` marks an integer layer (its first argument: the input codes). Comments
(``#``) are for people; the executor (:mod:`.execute`) ignores them.
"""
from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fbqc.program import Program
from fbqc.spec import LAYER, QUANT, ROLE, QuantSpec

FORMAT = "fbqc-listing 1"          # the listing's first line
LISTING_FILE = "program.listing"
CONSTANTS_FILE = "constants.safetensors"
CONSTANTS_MODES = ("safetensors", "inline")

#: the Python callables a listing may name, besides torch.ops.<ns>.<op>.<overload>
PY_FUNCTIONS = {"operator.getitem": operator.getitem}
TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)
SHORT_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
                torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                torch.uint8: "u8", torch.bool: "bool"}


class NoTextForm(ValueError):
    """A node or value that a listing cannot express (the message says which and why)."""


# --- operators ---------------------------------------------------------------------------------------
def op_text(target: Any) -> str:
    """The qualified name of a call_function target: ``torch.ops.aten.mul.Tensor``, ``operator.getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target}"                       # str(): "<namespace>.<op>.<overload>"
    for name, fn in PY_FUNCTIONS.items():
        if target is fn:
            return name
    what = f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', repr(target))}"
    raise NoTextForm(f"{what.lstrip('.')} is not an operator a listing can name (torch.ops.<namespace>.<op>."
                     f"<overload> or {', '.join(PY_FUNCTIONS)})")


def resolve_op(name: str) -> Any:
    """The operator a qualified name in a listing stands for (:func:`op_text` inverted)."""
    if name in PY_FUNCTIONS:
        return PY_FUNCTIONS[name]
    parts = name.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"]:
        raise NoTextForm(f"{name!r} is not an operator name (torch.ops.<namespace>.<op>.<overload> or "
                         f"{', '.join(PY_FUNCTIONS)})")
    _, _, namespace, op, overload = parts
    try:
        target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError) as e:
        raise NoTextForm(f"no operator {name} in this torch {torch.__version__} / fbqc "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(target, torch._ops.OpOverload):
        raise NoTextForm(f"{name} is not an operator overload")
    return target


# --- values --------------------------------------------------------------------------------------------
def value_text(v: Any) -> str:
    """An argument as listing text (raises :class:`NoTextForm` for anything the executor cannot read)."""
    if isinstance(v, fx.Node):
        return f"%{v.name}"
    if v is None or isinstance(v, (bool, str)):
        return repr(v)
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f"float({str(v)!r})"   # repr: round-trips exactly
    if isinstance(v, TORCH_ENUMS):
        return str(v)                                                     # torch.float32, torch.strided
    if isinstance(v, torch.device):
        return f"torch.device({str(v)!r})"
    if isinstance(v, tuple):
        inner = ", ".join(value_text(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, list):                                               # immutable_list too
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    raise NoTextForm(f"a {type(v).__name__} argument ({v!r:.60}) has no text form in a listing")


def tensor_text(t: torch.Tensor) -> str:
    """A constant inline: ``tensor(torch.int8, [64, 64], [3, -1, …])`` (exact: floats by repr)."""
    t = t.detach().cpu()
    values = t.flatten().tolist()
    return f"tensor({t.dtype}, {list(t.shape)}, [{', '.join(value_text(x) for x in values)}])"


def type_text(v: Any) -> str:
    """``f32[1, 64]`` for a node's example value (``node.meta['val']``), tuples for multi-output ops."""
    if isinstance(v, torch.Tensor):
        return f"{SHORT_DTYPES.get(v.dtype, str(v.dtype).removeprefix('torch.'))}[{', '.join(map(str, v.shape))}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(type_text(x) for x in v) + ")"
    return "" if v is None else type(v).__name__


def _short(k: str, v: Any, program: Program) -> str:
    """``x_scale=0.0235``, ``w_scale[64]=0.0012…0.0345`` (a per-channel constant: its range)."""
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = program.attr(v).detach().float()
        return f"{k}={t.item():.6g}" if t.numel() == 1 else f"{k}[{t.numel()}]={t.min().item():.6g}…{t.max().item():.6g}"
    return f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"


# --- the program ----------------------------------------------------------------------------------------
def layer_comment(node: fx.Node, spec: QuantSpec, program: Program) -> list[str]:
    """Two comment lines for an integer layer: its QuantSpec (bits, container) and its scales."""
    w, c = spec.weight, spec.weight.container
    lo, hi = w.levels
    lines = [f"# layer {spec.layer}: {spec.kind} {spec.describe()}, weight {w.bits:g} bits {w.scheme} "
             f"{w.granularity.replace('_', ' ')}, levels {lo}…{hi} in {c.logical} "
             f"({str(c.dtype).removeprefix('torch.')}), activations {spec.input.container.logical} in "
             f"({spec.input.observer}), {spec.output.container.logical} out"]
    try:   # the op's own argument names (x_scale, w_scale, y_zp …), whatever its signature is today
        named = node.normalized_arguments(program.graph_module, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - a comment is optional
        named = None
    if named is not None:
        shown = [_short(k, v, program) for k, v in named.kwargs.items()
                 if v is not None and (k.endswith("scale") or k.endswith("zp") or k.endswith("zero_point"))]
        if shown:
            lines.append("#   " + " ".join(shown))
    return lines


def input_key(node: fx.Node, program: Program) -> str:
    """The example-input key a placeholder binds (a listing binds top-level inputs by name)."""
    key = program.input_names()[node.name]
    if key not in program.example_inputs:
        raise NoTextForm(f"input {node.name} is {key}, inside a nested example input; a listing binds "
                         f"top-level inputs by name ({', '.join(program.example_inputs) or 'none'})")
    return key


def input_keys(program: Program) -> list[str]:
    """The example-input keys of the program's inputs, in its input order."""
    return [input_key(n, program) for n in program.graph.nodes if n.op == "placeholder"]


def statement(node: fx.Node, program: Program, mode: str, constants: dict[str, torch.Tensor] | None) -> list[str]:
    """The listing lines of one node (comments, then the statement). ``constants``: filled with the
    tensors of ``constant('key')`` lines (mode safetensors; None: only check that the node can be written)."""
    comment = type_text(node.meta.get("val"))
    if node.meta.get(LAYER) and node.meta.get(ROLE) and QUANT not in node.meta:
        comment += f"  {node.meta[ROLE]} of {node.meta[LAYER]}"
    pre: list[str] = []
    if node.op == "placeholder":
        text = f"%{node.name} = input({input_key(node, program)!r})"
    elif node.op == "get_attr":
        t = program.attr(node)
        if not isinstance(t, torch.Tensor):
            raise NoTextForm(f"get_attr {node.target} is a {type(t).__name__}, not a tensor")
        if t.numel() <= 4:
            comment += " = " + ", ".join(f"{x:.6g}" if isinstance(x, float) else str(x)
                                         for x in t.detach().flatten().tolist())
        if mode == "inline":
            text = f"%{node.name} = {tensor_text(t)}"
        else:
            if constants is not None:                  # clone: safetensors refuses shared storage
                constants[node.target] = t.detach().cpu().contiguous().clone()
            text = f"%{node.name} = constant({node.target!r})"
    elif node.op == "call_function":
        op = op_text(node.target)
        if resolve_op(op) is not node.target:
            raise NoTextForm(f"{op} does not name the node's operator back")
        args = [value_text(a) for a in node.args] + [f"{k}={value_text(v)}" for k, v in node.kwargs.items()]
        spec = node.meta.get(QUANT)
        mark = ""
        if isinstance(spec, QuantSpec):
            pre = layer_comment(node, spec, program)
            mark = f": layer({spec.layer!r})"
        text = f"%{node.name}{mark} = {op}({', '.join(args)})"
    elif node.op == "output":
        return [f"return {value_text(node.args[0])}"]
    else:
        raise NoTextForm(f"{node.op} nodes have no text form in a listing (an ATen graph has none)")
    return [*pre, f"{text}  # {comment}" if comment else text]


def write_listing(program: Program, directory: Path, mode: str = "safetensors") -> dict[str, Any]:
    """Write ``program.listing`` (and ``constants.safetensors`` unless ``mode`` is inline) into
    ``directory``; returns the backend's manifest section."""
    from safetensors.torch import save_file

    constants: dict[str, torch.Tensor] = {}
    body: list[str] = []
    layers = 0
    for node in program.graph.nodes:
        body += statement(node, program, mode, constants)
        layers += isinstance(node.meta.get(QUANT), QuantSpec)
    statements = sum(1 for line in body if not line.startswith("#"))
    module = program.info.get("module", "model")
    where = (f"{CONSTANTS_FILE} ({len(constants)} tensors, {sum(t.nbytes for t in constants.values()):,} bytes)"
             if mode == "safetensors" else "inline, as tensor(dtype, shape, values)")
    header = [f"# {FORMAT}",
              f"# the INTEGER program of {module}: {statements} statements, {layers} integer layers",
              f"# inputs: {', '.join(input_keys(program))}; constants: {where}",
              "# %name[: layer('<quantized layer>')] = <op>(<args>); <op>: torch.ops.<namespace>.<op>.<overload> "
              "or operator.getitem; comments: the value's dtype[shape]"]
    lines = header + body
    directory = Path(directory)
    (directory / LISTING_FILE).write_text("\n".join(lines) + "\n")
    files = [LISTING_FILE]
    if mode == "safetensors":
        save_file(constants, str(directory / CONSTANTS_FILE), metadata={"format": FORMAT})
        files.append(CONSTANTS_FILE)
    return {"listing": LISTING_FILE, "files": files, "lines": len(lines), "statements": statements,
            "layers": layers, "constants": mode, "constant_tensors": sum(
                1 for n in program.graph.nodes if n.op == "get_attr")}
