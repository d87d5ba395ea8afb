"""Scheduled fractional-bit QAT with knowledge distillation: ``fbqc.qat.train`` / ``train_modules``.

Two students, one loop (:func:`_run`, over a :mod:`fbqc.qat.students.adapters`):

- :func:`train`: the FAKE_QUANT program in one process (its graph module trains; the schedule writes
  its weight-bits buffers); each sample of ``data`` is one batch shaped like the exported example
  inputs (the graph's shapes are static).
- :func:`train_modules`: the module student (:mod:`fbqc.qat.students.modules`) over ``nproc`` processes with
  DDP or FSDP2 (:mod:`fbqc.qat.parallel.dist`); ``batch`` samples make one global batch, split over them.

The teacher is the frozen float model. Loss = MSE(student(x), teacher(x)) on the same batch,
averaged over the outputs, plus an optional task loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fbqc import data as S
from fbqc.data import _check_like
from fbqc.fx_utils import flat_tensors
from fbqc.passes.insert_fake_quant import bits_buffers
from fbqc.program import Program
from fbqc.spec import QuantSpec

from . import bit_change
from .config import EXECUTION, TrainConfig
from .parallel import dist as D
from .rundir import checkpoint as ck
from .rundir.plot import plot_loss
from .rundir.profile import StepProfiler
from .rundir.summary import summarize, summary_text
from .schedule import Schedule
from .students.adapters import ModuleAdapter, ProgramAdapter, describe
from .students.program import check_student, default_scheduled, set_bits
from fbqc.signals import Stop, StopAtStepEnd


@dataclass
class TrainResult:
    program: Program                     # the trained student (FAKE_QUANT, on CPU, final bits)
    schedule: Schedule
    log: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def kd_loss(student_out, teacher_out) -> torch.Tensor:
    s, t = flat_tensors(student_out, detach=False), flat_tensors(teacher_out, detach=False)
    if len(s) != len(t) or not s:
        raise ValueError(f"student has {len(s)} tensor outputs, teacher {len(t)}")
    for a, b in zip(s, t):
        if a.shape != b.shape:
            raise ValueError(f"the student's output is {tuple(a.shape)}, the KD target {tuple(b.shape)}")
    return sum(F.mse_loss(a.float(), b.float()) for a, b in zip(s, t)) / len(s)


def _calibrate_static(program: Program, factory, n: int, bits: float, layers, buffers) -> None:
    from fbqc.passes import Calibrate

    set_bits(buffers, layers, bits)
    calibrated = Calibrate(S.inputs_only(factory()), n).run(program.copy()).program
    with torch.no_grad():
        for node in program.graph.nodes:
            if node.target == torch.ops.fbqc.fake_quant_act.default:
                for a in node.args[1:3]:
                    program.attr(a).copy_(calibrated.attr(a))


def train(program: Program, teacher, data: Iterable[dict] | Callable[[], Iterable[dict]] | None = None, *,
          schedule: str = "fractional", steps: int = 1000, out: str | Path | None = None,
          resume: bool = False, scheduled_layers: list[str] | None = None,
          task_loss: Callable[[dict, Any], torch.Tensor] | None = None, data_note: str | None = None,
          source: dict[str, Any] | None = None, stop_after: int | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None, report: bool = True, **config: Any) -> TrainResult:
    """Train the FAKE_QUANT ``program`` in place against ``teacher`` through ``schedule`` (one process).

    ``data``: an iterable of input dicts (cycled), a zero-argument callable returning one (needed for
    a bit-exact resume of a one-shot stream), or None for the data-free default around the example
    inputs. ``out``: run directory (checkpoints, log.jsonl, loss.png, student.pt, summary.json);
    ``resume=True`` continues the run in ``out``. ``stop_after``: stop after this many completed steps
    (an interruption, for tests); ``report``: log the summary at the end. Other keywords are
    :class:`TrainConfig` fields.
    """
    check_student(program)
    cfg = TrainConfig(schedule=schedule, steps=steps, **config)
    cfg.check()
    if cfg.strategy != "auto" or cfg.nproc != 1:
        raise ValueError("train() trains the program student in one process; use train_modules() for "
                         "--nproc / --strategy")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    sched = Schedule.parse(cfg.schedule, cfg.steps, cfg.bits)
    layers = (list(scheduled_layers) if scheduled_layers is not None
              else default_scheduled(program, sched.final_bits))

    def adapter():
        buffers = bits_buffers(program)
        if cfg.act_quant == "static":
            _calibrate_static(program, factory, cfg.calib_samples, sched.bits_at(0), layers, buffers)
        return ProgramAdapter(program, None if cfg.teacher_cache else teacher, device, act_quant=cfg.act_quant,
                              blocks_only=cfg.blocks_only, compile=cfg.compile)

    factory, note = S.source(data, data_note, program.example_inputs, cfg.seed)
    result = _run(adapter, D.World(), cfg, sched, layers, factory, note, program.example_inputs, out=out,
                  resume=resume, task_loss=task_loss, source=source, stop_after=stop_after,
                  progress=progress, log=log, report=report)
    result.program = program
    return result


def train_modules(model: torch.nn.Module, specs: dict[str, QuantSpec], example_inputs: dict[str, Any],
                  data: Iterable[dict] | Callable[[], Iterable[dict]] | None = None, *,
                  schedule: str = "fractional", steps: int = 1000, out: str | Path | None = None,
                  resume: bool = False, scheduled_layers: list[str] | None = None,
                  task_loss: Callable[[dict, Any], torch.Tensor] | None = None, data_note: str | None = None,
                  source: dict[str, Any] | None = None, stop_after: int | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None, report: bool = True, **config: Any) -> TrainResult:
    """Train the eager ``model`` with ``specs`` applied (the module student, :mod:`fbqc.qat.students.modules`)
    data-parallel over ``nproc`` processes (``strategy`` ddp or fsdp; under torchrun for nproc > 1).

    The teacher is a frozen float copy of ``model`` made before the specs are applied. Each batch of
    ``data`` (shaped like ``example_inputs``) is the global batch: each process takes its slice.
    Rank-0 loading: with nproc > 1 every process's student and teacher start from rank 0's ``model``
    (broadcast once placed or sharded), so only rank 0's needs weights; the others may pass it built
    under ``torch.device("meta")`` (``fbqc train`` does: no copy of the weights in their host RAM).
    The result's ``program`` is None; ``extra["state"]`` (rank 0) is the trained full state dict;
    ``summary["host_ram"]`` each process's host memory.
    """
    if config.get("strategy", "auto") == "auto":
        config["strategy"] = "ddp"                  # recorded: a resume on one process stays a module run
    cfg = TrainConfig(schedule=schedule, steps=steps, **config)
    cfg.check()
    if cfg.act_quant == "static":
        raise ValueError("--act-quant static needs the program student (--nproc 1, no --strategy)")
    sched = Schedule.parse(cfg.schedule, cfg.steps, cfg.bits)
    layers = (list(scheduled_layers) if scheduled_layers is not None
              else [k for k, s in specs.items() if s.weight.bits == sched.final_bits])
    world, device = D.init(cfg.nproc, cfg.device)
    torch.manual_seed(cfg.seed)     # the same RNG on every process (the weights come from rank 0)

    def adapter():
        return ModuleAdapter(model, specs, world, device, cfg)

    factory, note = S.source(data, data_note, example_inputs, cfg.seed)
    try:
        return _run(adapter, world, cfg, sched, layers, factory, note, example_inputs, out=out, resume=resume,
                    task_loss=task_loss, source=source, stop_after=stop_after,
                    progress=progress and world.main, log=log if world.main else (lambda s: None),
                    report=report and world.main)
    finally:
        world.close()


def _run(make_adapter, world: D.World, cfg: TrainConfig, sched: Schedule, layers: list[str], factory, note: str,
         example: dict, *, out, resume, task_loss, source, stop_after, progress, log, report) -> TrainResult:
    log = log or (tqdm.write if progress else (lambda s: None))
    out = Path(out) if out is not None else None
    ckpt = None
    if world.main:
        ckpt = _open_run(out, resume, cfg, sched, source, note)
    world.barrier()
    if not world.main and resume:
        ckpt = ck.load_checkpoint(out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    rt = make_adapter()
    if not rt.params:
        raise ValueError("no trainable parameters (blocks_only found no *blocks.N. parameters)")
    unknown = [x for x in layers if x not in rt.bits]
    if unknown:
        raise ValueError(f"scheduled layers {unknown} are not quantized layers of the student")
    device = rt.device
    opt = rt.optimizer(cfg.lr, cfg.weight_decay)
    changes = bit_change.BitChanges(sched, cfg, rt, layers)    # remedies and diagnostics at each bit change
    amp = cfg.autocast if cfg.autocast is not None else device.type == "cuda"

    start, position, rows = 0, 0, []
    if ckpt is not None:
        rt.load(ckpt, opt)
        start, position = ckpt["step"], ckpt["data_position"]
        ck.set_rng_state(ckpt["rng"], device)
        rows = ck.truncate_log(out, start) if world.main else []
        log(f"resumed {out} at step {start}/{cfg.steps} ({sched.bits_at(start):g} bits) "
            f"with {world.size} process(es)")
    else:
        log(f"QAT: {sched.name} schedule {sched.describe()}; {len(layers)} scheduled layers, "
            f"{sum(p.numel() for p in rt.params):,} trainable parameters on {device}"
            f"{f' × {world.size} processes ({cfg.strategy})' if world.size > 1 else ''}; "
            f"activations {cfg.act_quant}; data: {note}")
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    data, fresh = factory(), position == 0
    # each process takes only its own part of every global batch (S.Share): map-style data makes or
    # reads only those samples; a stream is read in order by every process, which collates, checks and
    # stages only its own (a --batch that --nproc does not divide splits the batch's rows instead)
    map_style = S.indexed(data)
    share = S.Share.of(cfg.batch, world.size, world.rank, S.batch_rows(example))
    parts = (S.shares(data, position, cfg.batch, share.first, share.stop) if map_style else
             S.stream_shares(factory, position, cfg.batch, share.first, share.stop, first=data))
    split = share.describe(map_style)
    if world.size > 1:
        log(f"data: {split}")
    if world.main and out is not None:                     # run.json: how each (re)start split the data
        run = ck.read_run(out)
        run.setdefault("data_split", []).append(
            {"from_step": start, "processes": world.size, "map_style": map_style,
             "per_process": "samples" if share.whole else "rows", "note": split})
        ck.write_run(out, run)
    tracing, at = S.tracing(), position

    def staged():
        for i, part in enumerate(parts):
            base = at + i * cfg.batch + share.first         # the stream index of part[0]
            if i == 0 and fresh:
                for j, x in enumerate(part):
                    _check_like(S.inputs_only([x])[0], example, f"training data sample {base + j}")
            if tracing:
                for j, x in enumerate(part):
                    S.trace("keep", base + j, S.digest(x))
            yield cfg.batch, rt.stage(share.take(S.collate(part)), shard=False)

    batches = S.prefetch(staged()) if rt.kind == "module" else staged()    # module: made while the GPU works
    log_file = open(out / ck.LOG, "a") if out is not None and world.main else None
    bar = tqdm(total=cfg.steps, initial=start, desc="qat", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, current, pending = time.perf_counter(), None, None
    prof = None
    if cfg.profile:
        if out is None:
            raise ValueError("profile=True needs the run directory (out=) to write the profile to")
        prof = StepProfiler(out / "profile", world.rank, device, end - start, log)

    def record(item) -> None:
        if item is None:
            return
        row, values, seconds = item
        row["loss"], row["kd"], row["grad_norm"] = values.read()
        if not math.isfinite(row["loss"]):
            raise ck.RunError(f"loss is {row['loss']} at step {row['step']} ({row['bits']:g} bits); lower --lr")
        row["seconds"] = seconds
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        rows.append(row)
        if log_file:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        bar.update(1)
        bar.set_postfix(bits=f"{row['bits']:g}", loss=f"{row['loss']:.3e}", refresh=False)

    stop = StopAtStepEnd(log) if world.size == 1 else contextlib.nullcontext()   # one process: no collective
    try:
        with stop:
            for step in range(start, end):
                bits = sched.bits_at(step)
                if bits != current:
                    set_bits(rt.bits, layers, bits)
                    current = bits
                at_change = changes.at_step(step, opt)                # {} except at a bit change
                n, sample = next(batches)
                position += n
                if cfg.cuda_graphs:                                 # last step's graph outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                sample, cached = S.split_target(rt.prepare(sample))     # cached: --teacher-cache's KD target
                lr = (cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr) * changes.lr_factor(step)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    if cached is None:
                        with torch.no_grad():
                            target = rt.teacher(**sample)
                    else:
                        target = cached
                    pred = rt.student(**sample)
                    kd = kd_loss(pred, target)
                    loss = kd + cfg.task_weight * task_loss(sample, pred) if task_loss else kd
                loss.backward()
                norm = rt.clip(cfg.clip)                            # a tensor: read when recorded
                opt.step()
                opt.zero_grad(set_to_none=True)                     # freed before the next forward
                # the values are read one step later (no host sync between steps: the CPU queues step
                # N+1 while the GPU runs step N); a non-finite loss still stops the run, a step late
                row = {"step": step + 1, "bits": bits, "lr": lr, **at_change}
                record(pending)                                    # waits for the previous step only
                pending = (row, D.Pending(world, loss, kd, norm), round(time.perf_counter() - t0, 4))
                if prof is not None:
                    prof.step()
                done = step + 1
                interrupted = getattr(stop, "signum", None) is not None
                if out is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                                        or sched.changes_after(step) or done == end or interrupted):
                    record(pending)
                    pending = None
                    student_state, optim_state = rt.state(opt)      # collective for the module student
                    if world.main:
                        ck.save_checkpoint(out, done=done, student=student_state, optimizer=optim_state,
                                           kind=rt.kind, schedule=sched.to_dict(), data_position=position,
                                           device=device)
                    world.barrier()
                if interrupted:
                    raise Stop(f"checkpoint saved at step {done}/{cfg.steps}; continue with "
                                      f"fbqc train --resume {out}" if out is not None else f"at step {done}")
            record(pending)
    finally:
        batches.close()                                  # stops the prefetching thread (module student)
        if prof is not None:
            prof.stop()
        bar.close()
        if log_file:
            log_file.close()

    finished = end == cfg.steps
    if finished:
        set_bits(rt.bits, layers, sched.final_bits)
    final = rt.final_state() if finished and out is not None or rt.kind == "module" else None
    rt.close()
    summary = summarize(rows, sched, cfg, layers, time.perf_counter() - t0, finished, note)
    summary.update(describe(rt))
    summary["bit_changes"] = changes.report(rows)
    if out is not None and world.main:
        plot_loss(rows, sched.boundaries(), out / ck.PLOT,
                  title=f"{sched.name} schedule: KD loss vs step")
        if finished:
            ck.save_student(out, final)
            (out / ck.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    world.barrier()
    if report:
        log(summary_text(summary, out))
    return TrainResult(None, sched, rows, summary, out, extra={"state": final} if rt.kind == "module" else {})

def _open_run(out: Path | None, resume: bool, cfg: TrainConfig, sched: Schedule, source, note):
    if out is None:
        if resume:
            raise ValueError("resume=True needs the run directory (out=)")
        return None
    if resume:
        run = ck.read_run(out)
        saved = run["schedule"]
        if saved["spec"] != sched.spec or saved["name"] != sched.name:
            raise ck.RunError(f"{out}: the run was trained with schedule {saved['name']} ({saved['spec']}); "
                              f"resuming with {sched.name} ({sched.spec}) is not allowed")
        if saved["steps"] != sched.steps:
            raise ck.RunError(f"{out}: the run has --steps {saved['steps']}; resuming with --steps "
                              f"{sched.steps} is not allowed")
        saved_module = TrainConfig(**{k: v for k, v in run["train"].items()
                                      if k in TrainConfig.__dataclass_fields__}).module_student
        if saved_module != cfg.module_student:
            raise ck.RunError(f"{out}: the run trained the {'module' if saved_module else 'program'} student "
                              f"({'--strategy ddp|fsdp' if saved_module else '--nproc 1, no --strategy'}); "
                              f"resume it the same way")
        was = {**asdict(TrainConfig()), **run["train"]}         # a run from before a setting existed: its default
        diff = {k: (was.get(k), v) for k, v in asdict(cfg).items()
                if k not in ("steps", "schedule", "bits", *EXECUTION) and was.get(k) != v}
        if diff:
            raise ck.RunError(f"{out}: resume with the run's own settings; changed: "
                              + ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in diff.items()))
        return ck.load_checkpoint(out)
    if (out / ck.CKPT).exists() or (out / ck.RUN).exists():
        raise ck.RunError(f"run directory {out} already holds a run; resume it or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    ck.write_run(out, {"schedule": sched.to_dict(), "train": asdict(cfg), "data": note,
                       "source": source or {}})
    return None
