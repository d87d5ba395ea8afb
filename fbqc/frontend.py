"""Frontend: load a model file, call its functions with the user's options, ``torch.export`` the module.

A model file defines ``model(**opts) -> nn.Module`` and ``example_inputs(**opts) -> dict`` (keyword
arguments of ``forward``), and optionally ``calibration_data``, ``training_data`` and
``dynamic_shapes``. ``opts`` holds only what the user gave (``--preset`` → ``preset=``,
``--checkpoint`` → ``checkpoint=``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from .errors import ExportError, ModelFileError
from .program import Program
from .stage import Stage

REQUIRED = ("model", "example_inputs")
OPTIONAL = ("calibration_data", "training_data", "dynamic_shapes")


@dataclass
class ModelFile:
    path: Path
    module: ModuleType
    opts: dict[str, Any]

    def has(self, name: str) -> bool:
        return callable(getattr(self.module, name, None))

    def check(self, name: str) -> None:
        """``name()`` exists and accepts the user's options (without calling it)."""
        fn = getattr(self.module, name, None)
        if not callable(fn):
            raise ModelFileError(f"{self.path}: defines no function {name}()")
        _check_accepts(self.path, name, fn, self.opts)

    def call(self, name: str) -> Any:
        fn = getattr(self.module, name, None)
        if not callable(fn):
            raise ModelFileError(f"{self.path}: defines no function {name}()")
        _check_accepts(self.path, name, fn, self.opts)
        try:
            return fn(**self.opts)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise ModelFileError(f"{self.path}: {name}({_fmt_opts(self.opts)}) failed: "
                                 f"{type(e).__name__}: {e}") from e


def _fmt_opts(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())


_FLAG = {"preset": "--preset", "checkpoint": "--checkpoint"}


def _check_accepts(path: Path, name: str, fn: Callable, opts: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in opts:
        if key not in params:
            raise ModelFileError(f"{path}: {name}() takes no '{key}' argument, so {_FLAG.get(key, key)} "
                                 f"cannot be used with this file (add a '{key}=' keyword to {name}())")


def load_model_file(path: str | Path, **opts: Any) -> ModelFile:
    """Import the model file at ``path``; errors name the file and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if path.suffix != ".py":
        raise ModelFileError(f"model file {path} is not a .py file")
    mod_name = f"fbqc_model_{abs(hash(str(path.resolve())))}"
    folder = str(path.resolve().parent)
    if folder not in sys.path:   # like `python model.py`: the file may import its neighbours
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelFileError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - user code can raise anything at import
        tb = traceback.extract_tb(e.__traceback__)
        line = next((f.lineno for f in reversed(tb) if Path(f.filename) == path), "?")
        raise ModelFileError(f"{path}:{line}: importing the model file failed: "
                             f"{type(e).__name__}: {e}") from e
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise ModelFileError(f"{path}: missing required function(s) {', '.join(m + '()' for m in missing)}"
                             f" (a model file defines model(**opts) and example_inputs(**opts))")
    opts = {k: v for k, v in opts.items() if v is not None}
    return ModelFile(path, module, opts)


def _bind_inputs(module: torch.nn.Module, inputs: dict[str, Any], source: str) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise ModelFileError(f"{source}: example_inputs() must return a dict of forward's keyword "
                             f"arguments, got {type(inputs).__name__}")
    sig = inspect.signature(module.forward)
    params = sig.parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in inputs if k not in params and not has_var_kw]
    if unknown:
        raise ModelFileError(f"{source}: example_inputs() has {', '.join(map(repr, unknown))}, which "
                             f"{type(module).__name__}.forward does not take (it takes "
                             f"{', '.join(p for p in params if p != 'self')})")
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in inputs
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise ModelFileError(f"{source}: example_inputs() lacks required forward argument(s) "
                             f"{', '.join(map(repr, missing))} of {type(module).__name__}")
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta \
                and not bool(torch.isfinite(v).all()):
            raise ModelFileError(f"{source}: example input {k!r} contains NaN or Inf")
    return inputs


def _entry(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy whose forward passes ``return_dict=False`` (diffusers) so outputs are tensors."""
    if "return_dict" not in inspect.signature(module.forward).parameters:
        return module
    entry = copy.copy(module)
    entry.forward = functools.partial(type(module).forward, entry, return_dict=False)
    return entry


def drop_guards(gm: torch.fx.GraphModule) -> None:
    """Remove ``ep.module()``'s input-guard call (shapes are static; data is checked by fbqc.data.take)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.recompile()


def export(module: torch.nn.Module, example_inputs: dict[str, Any], *, dynamic_shapes=None,
           source: str | None = None) -> Program:
    """``torch.export.export(..., strict=False)`` → an EXPORTED :class:`Program`."""
    name = type(module).__name__
    source = source or name
    inputs = _bind_inputs(module, example_inputs, source)
    module.eval()
    chatter = io.StringIO()   # torch prints graphs on some failures; keep the terminal to one line
    try:
        with contextlib.redirect_stdout(chatter):
            ep = torch.export.export(_entry(module), (), inputs, dynamic_shapes=dynamic_shapes,
                                     strict=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types; we name the module and reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{source}: torch.export of {name} failed: {type(e).__name__}: {reason}") from e
    gm = ep.module()
    drop_guards(gm)
    on_meta = any(p.is_meta for p in module.parameters())
    info = {"source": source, "module": f"{type(module).__module__}.{name}", "meta_weights": on_meta,
            "torch": torch.__version__}
    return Program(gm, Stage.EXPORTED, dict(inputs), info=info)


def export_model_file(path: str | Path, **opts: Any) -> tuple[Program, ModelFile]:
    """Load ``path``, build ``model(**opts)`` and export it with ``example_inputs(**opts)``."""
    mf = load_model_file(path, **opts)
    module = mf.call("model")
    if not isinstance(module, torch.nn.Module):
        raise ModelFileError(f"{mf.path}: model() returned {type(module).__name__}, not a torch.nn.Module")
    inputs = mf.call("example_inputs")
    dynamic = mf.call("dynamic_shapes") if mf.has("dynamic_shapes") else None
    program = export(module, inputs, dynamic_shapes=dynamic, source=str(mf.path))
    program.info.update({"model_file": str(mf.path), "opts": {k: str(v) for k, v in mf.opts.items()}})
    return program, mf
