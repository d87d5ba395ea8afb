"""Model-file level QAT: ``fbqc train MODEL_FILE -o RUN`` and ``fbqc compile RUN``.

``train_model_file`` exports the model file (the teacher), annotates + inserts fake quant with the
compile flags (the student), and trains; the run directory records the model file, its options and
the flags. ``compile_run`` re-exports from the run's model file, annotates with the run's flags (its
bits = the schedule's final bits), loads the trained student (:class:`LoadTrainedState`), calibrates,
folds, lowers and hands the program to the backend; the manifest records the run.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from fbqc.errors import UserError
from fbqc.frontend import export_model_file, load_model_file
from fbqc.pass_infra import PassManager
from fbqc.passes import LoadTrainedState
from fbqc.pipeline import CompileOptions, build_passes, compile_model

from .config import EXECUTION, TrainConfig
from .parallel import dist as D
from .rundir import checkpoint as ck
from .schedule import Schedule
from .train import TrainResult, train, train_modules

#: CompileOptions fields a run fixes (the student's annotation); the rest may differ at compile time
RUN_FLAGS = ("bits", "scheme", "include", "exclude", "layer_bits", "a16", "preset", "checkpoint")


def prepare(model_file: str | Path, opts: CompileOptions):
    """(teacher: EXPORTED program, student: FAKE_QUANT program, model file, scheduled layers)."""
    from fbqc.passes import InsertFakeQuant

    teacher, mf = export_model_file(model_file, preset=opts.preset, checkpoint=opts.checkpoint)
    if teacher.info.get("meta_weights"):
        raise UserError(f"{model_file}: the model's weights are on the meta device; it cannot be trained here")
    annotate = build_passes(opts, data=(), progress=False)[0][0]
    student = PassManager([annotate, InsertFakeQuant()])(teacher)
    return teacher, student, mf, *_split(student.specs(), annotate)


def _split(specs: dict, annotate) -> tuple[list[str], dict[str, float]]:
    """(layers the schedule drives, {layer: bits} of those --layer-bits fixes)."""
    fixed = {layer: spec.weight.bits for layer, spec in specs.items()
             if any(p.search(layer) for p, _ in annotate._wb)}
    return [layer for layer in specs if layer not in fixed], fixed


def prepare_modules(model_file: str | Path, opts: CompileOptions):
    """(eager float model, {layer: QuantSpec}, model file, example inputs, scheduled layers, fixed layers)
    for the module student: the same annotation rule, applied to the model's modules (no export)."""
    from .students.modules import annotate_modules

    mf = load_model_file(model_file, preset=opts.preset, checkpoint=opts.checkpoint)
    D.note_host("before model")
    model, meta = _build(mf)
    D.note_host("after model")
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{mf.path}: model() returned {type(model).__name__}, not a torch.nn.Module")
    if not meta and any(p.is_meta for p in model.parameters()):
        raise UserError(f"{model_file}: the model's weights are on the meta device; it cannot be trained here")
    annotate = build_passes(opts, data=(), progress=False)[0][0]
    try:
        specs = annotate_modules(model, annotate)
    except ValueError as e:
        raise UserError(f"{model_file}: {e}") from e
    return model, specs, mf, mf.call("example_inputs"), *_split(specs, annotate)


def _build(mf) -> tuple[Any, bool]:
    """(``model()``, whether it was built on the meta device). Rank-0 loading: under ``fbqc train --nproc N``
    the ranks other than 0 call ``model()`` under ``torch.device("meta")`` — no weights in host RAM; they
    receive rank 0's once sharded (:func:`fbqc.qat.parallel.dist.load_from_rank0`). A model file that
    loads weights may check ``torch.get_default_device()`` and skip the loading there (the examples do);
    one that cannot be built on meta is built as usual on that rank (a warning; the values still come
    from rank 0)."""
    if not D.build_on_meta():
        return mf.call("model"), False
    try:
        with torch.device("meta"):
            return mf.call("model"), True
    except Exception as e:  # noqa: BLE001 - user code; building it for real is the fallback
        warnings.warn(f"{mf.path}: model() failed on the meta device ({type(e).__name__}: {e}); rank "
                      f"{os.environ.get('RANK')} builds it with weights instead (a copy in host RAM)", stacklevel=2)
        return mf.call("model"), False


def train_model_file(model_file: str | Path | None, out: str | Path, opts: CompileOptions | None = None, *,
                     schedule: str | None = None, steps: int | None = None, bits: float | None = None,
                     resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
                     stop_after: int | None = None, **train_kw: Any) -> TrainResult:
    """Train MODEL_FILE's student into run directory ``out`` (or continue the run in ``out``).

    ``bits``: the target (replaces the final 4 of a named schedule); ``opts``: the annotation flags
    (their ``bits`` is ignored: the student is annotated at the schedule's final bits). With
    ``nproc`` > 1 or a ``strategy`` (ddp, fsdp) the module student trains (:func:`train_modules`);
    on resume those (and the other :data:`EXECUTION` settings) may differ from the run's.
    """
    out = Path(out)
    if resume:
        run = ck.read_run(out)
        src = run["source"]
        if model_file is not None and Path(model_file).resolve() != Path(src["model_file_resolved"]):
            raise ck.RunError(f"{out} was trained from {src['model_file']}, not {model_file}")
        model_file, opts = src["model_file_resolved"], options_from(src["flags"])
        saved = dict(run["train"])
        schedule = schedule if schedule is not None else saved["schedule"]
        steps = steps if steps is not None else saved["steps"]
        bits = saved.pop("bits")
        given = train_kw.get("data_dir")
        if given is not None and saved.get("data_dir") != str(Path(given).resolve()):
            raise ck.RunError(f"{out} was trained on --data {saved.get('data_dir')}; resuming it on "
                              f"--data {given} is not allowed")
        train_kw = {**{k: v for k, v in saved.items() if k not in ("schedule", "steps")},
                    **{k: v for k, v in train_kw.items() if k in EXECUTION or k == "report"}}
    elif model_file is None:
        raise UserError("fbqc train needs a MODEL_FILE (or --resume RUN_DIR)")
    opts = opts or CompileOptions()
    schedule = schedule or "fractional"
    steps = steps or 1000
    opts = replace(opts, bits=Schedule.parse(schedule, steps, bits).final_bits)
    if TrainConfig(**{k: v for k, v in train_kw.items() if k in TrainConfig.__dataclass_fields__}).module_student:
        model, specs, mf, example, scheduled, fixed = prepare_modules(model_file, opts)
        data, note = ((lambda: mf.call("training_data")), "training_data() of the model file") \
            if mf.has("training_data") else (None, None)
        source = _source(model_file, model, mf, opts, scheduled, fixed)
        data, note = _captured(train_kw, example, model, source, out, resume, log, data, note)
        return train_modules(model, specs, example, data, schedule=schedule, steps=steps, bits=bits, out=out,
                             resume=resume, scheduled_layers=scheduled, data_note=note, source=source,
                             stop_after=stop_after, progress=progress, log=log, **train_kw)
    teacher, student, mf, scheduled, fixed = prepare(model_file, opts)
    if mf.has("training_data"):
        data, note = (lambda: mf.call("training_data")), "training_data() of the model file"
    else:
        data, note = None, None
    source = _source(model_file, teacher.info["module"], mf, opts, scheduled, fixed)
    data, note = _captured(train_kw, teacher.example_inputs, teacher.graph_module, source, out, resume, log,
                           data, note)
    return train(student, teacher, data, schedule=schedule, steps=steps, bits=bits, out=out, resume=resume,
                 scheduled_layers=scheduled, data_note=note, source=source, stop_after=stop_after,
                 progress=progress, log=log, **train_kw)


def _captured(train_kw, example, teacher, source, out, resume, log, data, note):
    """``--data DIR``: the capture's records as the training data (:mod:`fbqc.captured_data`), recorded
    in ``source["capture"]``; a resumed run checks that the capture still holds the same records."""
    import os

    from fbqc.captured_data import training_data

    if not train_kw.get("data_dir"):
        return data, note
    data, note, record = training_data(train_kw["data_dir"], example, teacher, seed=train_kw.get("seed", 0),
                                       teacher_cache=bool(train_kw.get("teacher_cache")),
                                       log=log if log is not None else print,
                                       check_weights=os.environ.get("RANK", "0") == "0")
    if resume:
        was = ck.read_run(out)["source"].get("capture", {})
        if was.get("records") != record["records"] or was.get("prompts") != record["prompts"]:
            raise ck.RunError(f"{out}: the capture {train_kw['data_dir']} changed since the run started "
                              f"({record['records']} records, was {was.get('records')}): its order, hence "
                              f"the resumed position, would differ")
    source["capture"] = record
    return data, note


def _source(model_file, module, mf, opts: CompileOptions, scheduled, fixed) -> dict[str, Any]:
    if isinstance(module, torch.nn.Module):
        module = f"{type(module).__module__}.{type(module).__name__}"
    return {"model_file": str(model_file), "model_file_resolved": str(Path(model_file).resolve()),
            "module": module, "opts": {k: str(v) for k, v in mf.opts.items()},
            "flags": {k: v for k, v in opts.flags().items() if k in RUN_FLAGS},
            "scheduled_layers": scheduled, "fixed_layers": fixed}


def options_from(flags: dict[str, Any], **over: Any) -> CompileOptions:
    d = dict(flags)
    d["include"] = tuple(d["include"]) if d.get("include") is not None else None
    d["exclude"] = tuple(d.get("exclude") or ())
    d["a16"] = tuple(d.get("a16") or ())
    d["layer_bits"] = dict(d.get("layer_bits") or {})
    return CompileOptions(**d, **over)


def run_model_file(run_dir: Path, run: dict[str, Any]) -> Path:
    """The model file a run was trained from: the path as the user gave it when it still names the
    same file from here (manifests record what the user typed), else the resolved path."""
    src = run["source"]
    given, resolved = Path(src["model_file"]), Path(src["model_file_resolved"])
    if given.is_file() and (given.resolve() == resolved or not resolved.is_file()):
        return given
    if resolved.is_file():
        return resolved
    raise ck.RunError(f"{run_dir}: its model file {src['model_file']} is gone")


def compile_run(run_dir: str | Path, out: str | Path | None, *, force: bool = False, progress: bool = True,
                log: Callable[[str], None] = print, **compile_kw: Any) -> dict[str, Any]:
    """Compile a finished training run; ``compile_kw``: CompileOptions fields a run does not fix."""
    run_dir = Path(run_dir)
    run = ck.read_run(run_dir)
    fixed = [k for k in compile_kw if k in RUN_FLAGS]
    if fixed:
        raise UserError(f"{run_dir} is a training run: {', '.join('--' + k.replace('_', '-') for k in fixed)} "
                        f"come(s) from the run and cannot be given")
    state = ck.load_student(run_dir)
    src = run["source"]
    model_file = run_model_file(run_dir, run)
    opts = options_from(src["flags"], **compile_kw)
    out = Path(out) if out is not None else Path("out") / run_dir.name
    record = {"dir": str(run_dir), "schedule": run["schedule"]["spec"], "schedule_name": run["schedule"]["name"],
              "steps": run["schedule"]["steps"], "train": run["train"], "data": run.get("data"),
              "student_sha256": ck.state_digest(state)}
    return compile_model(model_file, out, opts, force=force, progress=progress, log=log,
                         after_insert=[LoadTrainedState(state, f"{run_dir}/{ck.STUDENT}")], run=record)
