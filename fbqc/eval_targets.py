"""Targets of ``fbqc eval``: a student transformer that takes the place of ``pipeline.transformer``.

TARGET is one of

* the float model (``--float``, or TARGET = the capture's model file): the pipeline's own transformer,
  called with the pipeline's whole batch (the sanity case: drift 0, PSNR ∞);
* a training run (``fbqc train -o RUN``): the trained FAKE_QUANT program with the run's activation
  quantizers (dynamic, static or none, as it was trained);
* a compiled artifact (``fbqc compile -o OUT``): its backend's loaded artifact (cpu: the INTEGER program
  in-process; htp: the context binary on the QNN x86 simulator); with ``fake_quant=True`` the
  artifact's FAKE_QUANT model, rebuilt from the manifest's model file and flags (export, annotate,
  insert fake quant, calibrate as the manifest says) and checked against the fake-quant outputs the
  artifact stores (``io.pt``).

The exported programs have static batch-1 shapes and take only their example inputs' keys, so
:class:`StudentTransformer` splits the pipeline's batch (classifier-free guidance: 2) into batch-1
calls, passes only those keys (cast to the program's dtypes) and drops the rest. A dropped argument
must be neutral (``None``, an empty dict, or an attention mask of all ones); otherwise a warning is
recorded (``eval.json``) and printed — the result is never silently wrong.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError
from .fx_utils import flat_tensors
from .trajectories import describe_value, neutral_argument


class EvalError(UserError):
    pass


class NonFinite(Exception):
    """A student output held NaN/Inf (raised from inside the pipeline; the prompt is marked failed)."""

    def __init__(self, call: int, what: str):
        super().__init__(f"non-finite {what} at transformer call {call}")
        self.call, self.what = call, what


# ---- the adapter -----------------------------------------------------------------------------------


class StudentTransformer(torch.nn.Module):
    """Set as ``pipe.transformer``. Keeps the float transformer's ``config``, ``dtype``, ``device`` and
    any other attribute the pipeline reads (``cache_context``…); its forward calls ``run``.

    ``run(**kwargs) -> list[Tensor]`` takes batch-1 inputs with the keys and dtypes of ``expected``
    (``{key: example value}``); ``expected=None`` means ``run`` takes the pipeline's own arguments
    (the float model). ``record(bound kwargs, output)`` is called with every call's full batch."""

    def __init__(self, teacher: torch.nn.Module, run: Callable[..., Any], expected: dict[str, Any] | None,
                 record: Callable[[dict[str, Any], torch.Tensor], None] | None = None):
        super().__init__()
        object.__setattr__(self, "_teacher", teacher)      # not a submodule: its weights are not ours
        object.__setattr__(self, "_run", run)
        self.config = teacher.config
        self.expected = expected
        self.record = record
        self.warnings: list[str] = []
        self.calls = 0
        self._sig = inspect.signature(teacher.forward)

        def forward(*args, **kwargs):                       # per instance: the teacher's signature, so
            return self._forward(*args, **kwargs)           # hooks bind positional arguments by name
        forward.__signature__ = self._sig
        object.__setattr__(self, "forward", forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_teacher"), name)

    @property
    def dtype(self) -> torch.dtype:
        return self._teacher.dtype

    @property
    def device(self) -> torch.device:
        return self._teacher.device

    def cache_context(self, name: str):                     # FLUX's pipeline enters it around each call
        fn = getattr(self._teacher, "cache_context", None)
        return fn(name) if fn is not None else contextlib.nullcontext()

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def _forward(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        bound = dict(self._sig.bind_partial(*args, **kwargs).arguments)
        bound.pop("return_dict", None)
        if self.expected is None:
            out = flat_tensors(self._run(**bound, return_dict=False))[0]
        else:
            out = self._split_call(bound)
        self.calls += 1
        if self.record is not None:
            self.record(bound, out)
        if not bool(torch.isfinite(out).all()):
            raise NonFinite(self.calls - 1, "transformer output")
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    def _split_call(self, bound: dict[str, Any]) -> torch.Tensor:
        for key, v in bound.items():
            if key not in self.expected and not neutral_argument(key, v):
                self._warn(f"the pipeline passes {key!r} ({describe_value(v)}), which the compiled program does "
                           f"not take; it was dropped (not neutral: the student computes without it)")
        batch = bound["hidden_states"].shape[0]
        outs = []
        for b in range(batch):
            inputs = {k: self._take(k, bound.get(k), ex, batch, b) for k, ex in self.expected.items()}
            outs.append(flat_tensors(self._run(**inputs))[0])
        return torch.cat(outs, 0) if batch > 1 else outs[0]

    def _take(self, key: str, v: Any, ex: Any, batch: int, b: int) -> Any:
        if isinstance(ex, dict):
            v = v or {}
            return {k: self._take(f"{key}.{k}", v.get(k), e, batch, b) for k, e in ex.items()}
        if not isinstance(ex, torch.Tensor):
            return ex if v is None else v
        if v is None:
            raise EvalError(f"the compiled program takes {key!r}, which the pipeline does not pass; was the "
                            f"target compiled from the same model file and preset as the capture?")
        v = torch.as_tensor(v)
        if v.dim() == ex.dim() and v.shape[0] == batch * ex.shape[0] and tuple(v.shape[1:]) == tuple(ex.shape[1:]) \
                and batch > 1:
            v = v[b * ex.shape[0]:(b + 1) * ex.shape[0]]
        elif v.dim() == 0 and ex.dim() == 1:
            v = v.reshape(1).expand(ex.shape)
        if tuple(v.shape) != tuple(ex.shape):
            raise EvalError(f"the pipeline passes {key!r} of shape {tuple(v.shape)} (batch {batch}); the "
                            f"compiled program is static at {tuple(ex.shape)}: capture and compile with the "
                            f"same preset / resolution")
        if v.dtype != ex.dtype:
            cast = v.to(ex.dtype)
            if not torch.equal(cast.to(v.dtype), v):
                self._warn(f"{key!r} is {v.dtype} in the pipeline and {ex.dtype} in the program; the cast "
                           f"changes its values")
            v = cast
        return v.contiguous()


# ---- targets ---------------------------------------------------------------------------------------


@dataclass
class Student:
    """A target, resolved: what it is, where its model file is, and how to run it."""

    kind: str                                   # float | qat | artifact | fake_quant
    description: dict[str, Any]
    model_file: str | None
    run: Callable[..., Any] | None = None       # None: the pipeline's own transformer (float)
    expected: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    #: Python API: ``wrap(float transformer) -> run`` called with the pipeline's whole batch
    wrap: Callable[[torch.nn.Module], Callable[..., Any]] | None = None

    def adapter(self, teacher: torch.nn.Module, record=None) -> StudentTransformer:
        if self.wrap is not None:
            return StudentTransformer(teacher, self.wrap(teacher), None, record)
        run = self.run if self.run is not None else teacher
        return StudentTransformer(teacher, run, self.expected if self.run is not None else None, record)


def _fake_quant_call(program) -> Callable[..., Any]:
    gm = program.graph_module if hasattr(program, "graph_module") else program

    def run(**inputs):
        with torch.no_grad():
            return gm(**inputs)
    return run


def load_student(target: str | Path | None, *, fake_quant: bool = False, float_model: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> Student:
    """Resolve TARGET (a run directory, an artifact directory, a model file) — see the module doc."""
    if float_model or (target is not None and Path(target).is_file()):
        if fake_quant:
            raise EvalError("--fake-quant applies to a compiled artifact, not to the float model")
        mf = str(target) if target is not None else None
        return Student("float", {"kind": "float", "model_file": mf,
                                 "note": "the pipeline's own float transformer (sanity case)"}, mf)
    if target is None:
        raise EvalError("fbqc eval needs a TARGET (a run or artifact directory) or --float")
    target = Path(target)
    if not target.is_dir():
        raise EvalError(f"TARGET {target} does not exist (give a run directory, an artifact directory, "
                        f"a model file, or --float)")
    if (target / "run.json").is_file():
        if fake_quant:
            raise EvalError(f"{target} is a training run: its student already is the fake-quant model; "
                            f"drop --fake-quant")
        return _qat_student(target, log)
    if (target / "manifest.json").is_file():
        return _artifact_student(target, fake_quant, log)
    raise EvalError(f"{target} is neither a training run (run.json) nor a compiled artifact (manifest.json)")


def _qat_student(run_dir: Path, log) -> Student:
    from .qat.rundir import checkpoint as ck
    from .passes import LoadTrainedState
    from .qat.model_file import options_from, prepare, run_model_file
    from .qat.students.program import training_view
    from .pass_infra import PassManager

    run = ck.read_run(run_dir)
    state = ck.load_student(run_dir)
    src = run["source"]
    model_file = run_model_file(run_dir, run)
    opts = options_from(src["flags"])
    if run.get("train", {}).get("strategy") not in (None, "auto") or run.get("train", {}).get("nproc", 1) > 1:
        log("note: the run trained the module student; evaluating it as the program student")
    log(f"loading the trained student of {run_dir} ({model_file.name})")
    _teacher, student, _mf, _s, _f = prepare(model_file, opts)
    student = PassManager([LoadTrainedState(state, f"{run_dir}/{ck.STUDENT}")])(student)
    gm = student.graph_module
    buffers = {k for k, _ in gm.named_buffers()}
    with torch.no_grad():                                 # static activation scales, learned bits: buffers
        for k, b in gm.named_buffers():
            if k in state and state[k].shape == b.shape:
                b.copy_(state[k].to(b.dtype))
    act = run.get("train", {}).get("act_quant", "dynamic")
    view = training_view(student, act, fused=False)
    desc = {"kind": "qat", "run": str(run_dir), "model_file": str(model_file), "schedule":
            run.get("schedule", {}).get("spec"), "steps": run.get("schedule", {}).get("steps"),
            "act_quant": act, "bits": sorted({s.weight.bits for s in student.specs().values()}),
            "buffers_loaded": len(buffers & set(state))}
    return Student("qat", desc, str(model_file), _fake_quant_call(view), dict(student.example_inputs))


def _artifact_student(directory: Path, fake_quant: bool, log) -> Student:
    from fbqc.plugins import load_backend

    from .artifact import check_hashes, load_io, read_manifest

    manifest = read_manifest(directory)
    bad = check_hashes(directory, manifest)
    if bad:
        raise EvalError(f"{directory}: file(s) {', '.join(bad)} do not match the manifest's hashes")
    io = load_io(directory)
    name = manifest["backend"]["name"]
    model = manifest.get("model", {})
    desc = {"kind": "fake_quant" if fake_quant else "artifact", "artifact": str(directory), "backend": name,
            "model_file": model.get("file"), "bits": manifest.get("flags", {}).get("bits"),
            "layers": len(manifest.get("layers", []))}
    if fake_quant:
        program, diff = _rebuild_fake_quant(directory, manifest, io, log)
        desc["rebuilt_fake_quant_max_abs_vs_io"] = diff
        warn = [] if diff == 0.0 else [
            f"the rebuilt fake-quant model differs from the artifact's stored fake-quant outputs by up to "
            f"{diff:.3g} (calibration not reproduced exactly)"]
        return Student("fake_quant", desc, model.get("file"), _fake_quant_call(program), dict(io["inputs"]), warn)
    log(f"{name}: running the artifact on its backend ({manifest['backend'].get('version', '?')})")
    loaded = load_backend(name).load(directory)

    def run(**inputs):
        return loaded.run(inputs)
    return Student("artifact", desc, model.get("file"), run, dict(io["inputs"]))


def _rebuild_fake_quant(directory: Path, manifest: dict[str, Any], io: dict[str, Any], log):
    """The artifact's FAKE_QUANT program from its model file + flags, and its max |Δ| vs ``io.pt``."""
    from dataclasses import fields

    from .captured_data import Calibration
    from .frontend import export_model_file
    from .pass_infra import PassManager
    from .pipeline import CompileOptions, build_passes
    from .qat.model_file import options_from

    mf_path = Path(manifest.get("model", {}).get("file") or "")
    if not mf_path.is_file():
        raise EvalError(f"{directory}: --fake-quant rebuilds the fake-quant model from the artifact's model "
                        f"file {str(mf_path) or '(none recorded)'}, which is not here; the artifact stores only "
                        f"the INTEGER program (evaluate it without --fake-quant)")
    known = {f.name for f in fields(CompileOptions)}
    opts = options_from({k: v for k, v in manifest.get("flags", {}).items() if k in known})
    log(f"rebuilding the fake-quant model of {directory} from {mf_path}")
    program, mf = export_model_file(mf_path, preset=opts.preset, checkpoint=opts.checkpoint)
    data = Calibration(mf, program, opts, lambda s: None).data   # what compile calibrated on (--calib-data too)
    after = []
    if manifest.get("run"):
        from .qat.rundir import checkpoint as ck
        from .passes import LoadTrainedState

        run_dir = Path(manifest["run"]["dir"])
        after = [LoadTrainedState(ck.load_student(run_dir), f"{run_dir}/{ck.STUDENT}")]
    first, _ = build_passes(opts, data, False, after)
    fq = PassManager(first)(program)
    with torch.no_grad():
        got = flat_tensors(fq.graph_module(**io["inputs"]))
    ref = io.get("fake_quant_outputs", [])
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref)), default=float("nan"))
    return fq, diff
