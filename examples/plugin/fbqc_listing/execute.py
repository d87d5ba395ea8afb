"""Running a listing: each statement parsed once (its operator resolved by its qualified name, its
arguments read as literals and node references), then evaluated in order — from the text and the
constants file alone, never from the ``program.pt2`` the core keeps next to it.

Reading uses Python's ``ast`` (``%x`` becomes a reserved name first) but never ``eval``:
only the forms :mod:`.listing` writes are accepted, anything else is an error naming the line.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbqc.errors import ArtifactError

from .listing import CONSTANTS_FILE, FORMAT, LISTING_FILE, TORCH_ENUMS, NoTextForm, resolve_op

REF = "_fbqc_ref_"        # %name in the text → this prefix + name for Python's parser


@dataclass(frozen=True)
class Ref:
    """A reference to an earlier statement's value (``%name``)."""

    name: str


@dataclass
class Statement:
    lineno: int
    kind: str                       # "input" | "constant" | "op" | "return"
    name: str | None = None         # the value it defines (None: return)
    op: Any = None                  # the operator (kind op)
    op_name: str = ""
    args: tuple = ()                # templates: literals with Ref leaves
    kwargs: dict[str, Any] = field(default_factory=dict)
    value: Any = None               # input key, constant tensor, return template
    layer: str | None = None        # ": layer('…')": an integer layer, its first argument the input codes
    frees: list[str] = field(default_factory=list)   # values last used here (dropped after it)


def _bind(t: Any, env: dict[str, Any]) -> Any:
    if isinstance(t, Ref):
        return env[t.name]
    if isinstance(t, list):
        return [_bind(x, env) for x in t]
    if isinstance(t, tuple):
        return tuple(_bind(x, env) for x in t)
    return t


def _tensors(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v.detach()]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _dotted(e: ast.AST) -> str | None:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Attribute):
        base = _dotted(e.value)
        return None if base is None else f"{base}.{e.attr}"
    return None


#: a string literal (kept), a reference's "%" (→ REF) or a comment (dropped), scanning left to right
_LEXEME = re.compile(r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")|%(?=[A-Za-z_])|#.*""")


def _python(line: str) -> str:
    """The line with each ``%name`` turned into a Python name (string literals left alone)."""
    return _LEXEME.sub(lambda m: m.group(1) if m.group(1) is not None else ("" if m.group(0).startswith("#") else REF),
                       line)


class Listing:
    """A loaded listing (the backend's :class:`~fbqc.backends.base.LoadedArtifact`)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LISTING_FILE
        if not self.path.is_file():
            raise ArtifactError(f"{self.directory}: no {LISTING_FILE}; compile it again with --target listing")
        self._constants: dict[str, torch.Tensor] | None = None
        self.statements: list[Statement] = []
        self.inputs: list[str] = []                 # example-input keys, in the program's input order
        self._defined: set[str] = set()
        self._last_use: dict[str, int] = {}
        lines = self.path.read_text().splitlines()
        if not lines or lines[0].strip() != f"# {FORMAT}":
            raise ArtifactError(f"{self.path}:1: not a listing of this format (expected '# {FORMAT}')")
        for lineno, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                self.statements.append(self._parse(lineno, line))
        if not self.statements or self.statements[-1].kind != "return":
            raise ArtifactError(f"{self.path}: the listing does not end with a return statement")
        for i, s in enumerate(self.statements):       # free each value after its last use
            s.frees = [n for n, last in self._last_use.items() if last == i]

    # --- reading ---------------------------------------------------------------------------------------
    def _error(self, lineno: int, msg: str) -> ArtifactError:
        return ArtifactError(f"{self.path}:{lineno}: {msg}")

    def _parse(self, lineno: int, line: str) -> Statement:
        try:
            tree = ast.parse(_python(line.strip()))
        except SyntaxError as e:
            raise self._error(lineno, f"cannot read the statement ({e.args[0] if e.args else e})") from None
        if len(tree.body) != 1:
            raise self._error(lineno, "one statement per line")
        st = tree.body[0]
        self._lineno = lineno
        if isinstance(st, ast.Return) and st.value is not None:
            return Statement(lineno, "return", value=self._value(st.value))
        layer = None
        if isinstance(st, ast.AnnAssign) and st.value is not None:
            target, a = st.target, st.annotation
            if not (isinstance(a, ast.Call) and _dotted(a.func) == "layer" and len(a.args) == 1
                    and isinstance(a.args[0], ast.Constant) and isinstance(a.args[0].value, str)):
                raise self._error(lineno, "the only annotation of a value is layer('<quantized layer>')")
            layer = a.args[0].value
        elif isinstance(st, ast.Assign) and len(st.targets) == 1:
            target = st.targets[0]
        else:
            raise self._error(lineno, "expected '%name = <op>(…)' or 'return …'")
        if not (isinstance(target, ast.Name) and target.id.startswith(REF)):
            raise self._error(lineno, "a statement defines one value, %name")
        name = target.id[len(REF):]
        if name in self._defined:
            raise self._error(lineno, f"%{name} is defined twice")
        s = self._rhs(lineno, name, st.value)
        s.layer = layer
        if layer is not None and (s.kind != "op" or not s.args):
            raise self._error(lineno, f"layer {layer!r} marks an operator call whose first argument is its "
                                      f"input codes")
        self._defined.add(name)
        return s

    def _rhs(self, lineno: int, name: str, e: ast.AST) -> Statement:
        if not isinstance(e, ast.Call):
            raise self._error(lineno, "a value is defined by a call: an operator, input(), constant() or tensor()")
        fn = _dotted(e.func)
        if fn in ("input", "constant"):
            if len(e.args) != 1 or e.keywords or not isinstance(e.args[0], ast.Constant) \
                    or not isinstance(e.args[0].value, str):
                raise self._error(lineno, f"{fn}() takes one string, the {'example input' if fn == 'input' else 'constant'}'s key")
            key = e.args[0].value
            if fn == "input":
                self.inputs.append(key)
                return Statement(lineno, "input", name, value=key)
            if key not in self.constants:
                raise self._error(lineno, f"constant {key!r} is not in {CONSTANTS_FILE}")
            return Statement(lineno, "constant", name, value=self.constants[key])
        if fn == "tensor":
            if len(e.args) != 3 or e.keywords:
                raise self._error(lineno, "tensor() takes a dtype, a shape and a list of values")
            dtype, shape, values = (self._value(a) for a in e.args)
            if not isinstance(dtype, torch.dtype):
                raise self._error(lineno, "tensor()'s first argument is a torch dtype")
            try:
                t = torch.tensor(values, dtype=dtype).reshape(shape)
            except (TypeError, ValueError, RuntimeError) as err:
                raise self._error(lineno, f"bad tensor literal: {err}") from None
            return Statement(lineno, "constant", name, value=t)
        if fn is None:
            raise self._error(lineno, "the called operator must be a qualified name")
        try:
            op = resolve_op(fn)
        except NoTextForm as err:
            raise self._error(lineno, str(err)) from None
        if any(k.arg is None for k in e.keywords):
            raise self._error(lineno, "no **keyword unpacking in a listing")
        return Statement(lineno, "op", name, op=op, op_name=fn, args=tuple(self._value(a) for a in e.args),
                         kwargs={k.arg: self._value(k.value) for k in e.keywords})

    def _value(self, e: ast.AST) -> Any:
        if isinstance(e, ast.Constant) and (e.value is None or isinstance(e.value, (bool, int, float, str))):
            return e.value
        if (isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.USub, ast.UAdd)) and isinstance(e.operand, ast.Constant)
                and isinstance(e.operand.value, (int, float)) and not isinstance(e.operand.value, bool)):
            return -e.operand.value if isinstance(e.op, ast.USub) else e.operand.value
        if isinstance(e, ast.List):
            return [self._value(x) for x in e.elts]
        if isinstance(e, ast.Tuple):
            return tuple(self._value(x) for x in e.elts)
        if isinstance(e, ast.Name) and e.id.startswith(REF):
            name = e.id[len(REF):]
            if name not in self._defined:
                raise self._error(self._lineno, f"%{name} is used before it is defined")
            self._last_use[name] = len(self.statements)      # the statement being read
            return Ref(name)
        dotted = _dotted(e)
        if dotted and dotted.startswith("torch.") and dotted.count(".") == 1:
            v = getattr(torch, dotted.split(".")[1], None)
            if isinstance(v, TORCH_ENUMS):
                return v
        if (isinstance(e, ast.Call) and not e.keywords and len(e.args) == 1 and isinstance(e.args[0], ast.Constant)
                and isinstance(e.args[0].value, str)):
            f, s = _dotted(e.func), e.args[0].value
            if f == "torch.device":
                return torch.device(s)
            if f == "float" and s in ("inf", "-inf", "nan"):
                return float(s)
        raise self._error(self._lineno, f"cannot read the value {ast.unparse(e).replace(REF, '%')!r}")

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        if self._constants is None:
            from safetensors.torch import load_file

            path = self.directory / CONSTANTS_FILE
            if not path.is_file():
                raise ArtifactError(f"{self.directory}: the listing names constants but there is no {CONSTANTS_FILE}")
            # copies: load_file's tensors may sit at unaligned addresses, where float kernels take other
            # paths (results 1 ulp apart from the same op on aligned memory)
            self._constants = {k: v.clone() for k, v in load_file(str(path)).items()}
        return self._constants

    # --- running ---------------------------------------------------------------------------------------
    def _execute(self, inputs: dict[str, Any], codes: dict[str, dict[str, torch.Tensor]] | None = None) -> Any:
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise ArtifactError(f"{self.path}: inputs {', '.join(missing)} not given (the listing takes "
                                f"{', '.join(self.inputs)})")
        env: dict[str, Any] = {}
        with torch.no_grad():
            for s in self.statements:
                if s.kind == "input":
                    env[s.name] = inputs[s.value]
                elif s.kind == "constant":
                    env[s.name] = s.value
                elif s.kind == "op":
                    args, kwargs = _bind(s.args, env), {k: _bind(v, env) for k, v in s.kwargs.items()}
                    try:
                        env[s.name] = s.op(*args, **kwargs)
                    except Exception as e:  # noqa: BLE001 - name the line, whatever the op raised
                        raise self._error(s.lineno, f"%{s.name} = {s.op_name}(…) failed: "
                                                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
                    if codes is not None and s.layer is not None:
                        codes[s.layer] = {"xq": args[0], "yq": env[s.name]}
                else:
                    return _bind(s.value, env)
                for n in s.frees:
                    env.pop(n, None)
        raise AssertionError("unreachable: a listing ends with return")

    def run(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """The listing's outputs for ``inputs`` (example inputs by key), flattened in order."""
        return _tensors(self._execute(inputs))

    def layer_codes(self, inputs: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Per integer layer (``: layer('…')``): the codes entering it (``xq``) and leaving it (``yq``)."""
        codes: dict[str, dict[str, torch.Tensor]] = {}
        self._execute(inputs, codes)
        return codes


def load_listing(directory: Path) -> Listing:
    return Listing(Path(directory))
