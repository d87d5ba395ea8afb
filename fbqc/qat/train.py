"""Scheduled fractional-bit QAT with knowledge distillation: ``fbqc.qat.train``.

The student is a FAKE_QUANT program (its graph module trains; the schedule writes its weight-bits
buffers), the teacher the frozen float model (an EXPORTED program, a GraphModule or the eager module).
Loss = MSE(student(x), teacher(x)) on the same batch, averaged over the outputs, plus an optional
task loss. Training runs at the example inputs' batch size: each sample of ``data`` is one batch,
shaped like ``program.example_inputs`` (the exported graph's shapes are static).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fbqc.data import DATA_FREE_NOTE, _check_like, samples_around
from fbqc.frontend import _entry
from fbqc.program import Program

from . import checkpoint as ck
from .plot import plot_loss
from .schedule import Schedule
from .student import (ACT_MODES, BLOCKS, bits_buffers, check_student, default_scheduled, own_parameters,
                      retarget, set_bits, training_view)
from .summary import summarize, summary_text


@dataclass
class TrainConfig:
    schedule: str = "fractional"
    steps: int = 1000
    bits: float | None = None           # target: replaces the final 4 of a named schedule
    lr: float = 1e-5
    warmup: int = 0                     # linear warm-up steps, then constant
    clip: float = 1.0                   # gradient-norm clipping (0: off)
    weight_decay: float = 0.0
    act_quant: str = "dynamic"          # dynamic per-sample | static (calibrated, frozen) | none
    blocks_only: bool = True            # train only the parameters inside *blocks.N.
    checkpoint_every: int = 100
    device: str = "cpu"
    seed: int = 0
    compile: bool = False               # torch.compile the student (one graph for every bit-width)
    autocast: bool | None = None        # bf16 autocast; None: on for CUDA
    task_weight: float = 1.0
    calib_samples: int = 16             # act_quant="static": samples calibrated before training

    def check(self) -> None:
        if self.act_quant not in ACT_MODES:
            raise ValueError(f"--act-quant must be one of {', '.join(ACT_MODES)}, got {self.act_quant!r}")
        for k in ("lr", "clip", "weight_decay"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{k.replace('_', '-')} must be a finite number ≥ 0, got {v}")
        if self.warmup < 0 or self.checkpoint_every < 0:
            raise ValueError("--warmup and --checkpoint-every must be ≥ 0")


@dataclass
class TrainResult:
    program: Program                     # the trained student (FAKE_QUANT, on CPU, final bits)
    schedule: Schedule
    log: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _teacher_fn(teacher, device) -> tuple[Callable, torch.nn.Module | None]:
    if isinstance(teacher, Program):
        view = retarget(teacher.copy(), device).graph_module      # shares the teacher's parameters
        return view, view
    if isinstance(teacher, torch.nn.Module):
        return _entry(teacher), teacher
    if callable(teacher):
        return teacher, None
    raise TypeError(f"teacher must be a Program, an nn.Module or a callable, got {type(teacher).__name__}")


def _flat(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _stream(factory: Callable[[], Iterable], skip: int) -> Iterator[dict]:
    """Cycle through ``factory()`` forever, after skipping ``skip`` items (the resumed position)."""
    seen = 0
    while True:
        empty = True
        for sample in factory():
            empty = False
            if seen >= skip:
                yield sample
            seen += 1
        if empty:
            raise ValueError("training data yielded no samples")


def _to(sample: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


def kd_loss(student_out, teacher_out) -> torch.Tensor:
    s, t = _flat(student_out), _flat(teacher_out)
    if len(s) != len(t) or not s:
        raise ValueError(f"student has {len(s)} tensor outputs, teacher {len(t)}")
    return sum(F.mse_loss(a.float(), b.float()) for a, b in zip(s, t)) / len(s)


def _calibrate_static(program: Program, factory, n: int, bits: float, layers, buffers) -> None:
    from fbqc.passes import Calibrate

    set_bits(buffers, layers, bits)
    calibrated = Calibrate(factory(), n).run(program.copy()).program
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
    """Train the FAKE_QUANT ``program`` in place against ``teacher`` through ``schedule``.

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
    sched = Schedule.parse(cfg.schedule, cfg.steps, cfg.bits)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    log = log or (tqdm.write if progress else (lambda s: None))
    out = Path(out) if out is not None else None
    if data is None:
        factory, note = (lambda: samples_around(program.example_inputs, seed=cfg.seed)), DATA_FREE_NOTE
    else:
        factory, note = (data if callable(data) else (lambda: data)), data_note or "the given data"
    ckpt = _open_run(out, resume, cfg, sched, source, note)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    buffers = bits_buffers(program)
    layers = list(scheduled_layers) if scheduled_layers is not None else default_scheduled(program, sched.final_bits)
    unknown = [x for x in layers if x not in buffers]
    if unknown:
        raise ValueError(f"scheduled layers {unknown} are not quantized layers of the student")
    if cfg.act_quant == "static":
        _calibrate_static(program, factory, cfg.calib_samples, sched.bits_at(0), layers, buffers)
    params = own_parameters(program, device,
                            (lambda n: BLOCKS.search(n) is not None) if cfg.blocks_only else (lambda n: True))
    buffers = bits_buffers(program)              # re-read: own_parameters moved them to the device
    if not params:
        raise ValueError("no trainable parameters (blocks_only found no *blocks.N. parameters)")
    teacher_call, teacher_mod = _teacher_fn(teacher, device)
    teacher_dev = next((p.device for p in teacher_mod.parameters()), None) if teacher_mod is not None else None
    if teacher_mod is not None:
        teacher_mod.to(device)
    view = training_view(program, cfg.act_quant, device)
    student_call = torch.compile(view.graph_module) if cfg.compile else view.graph_module
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    amp = cfg.autocast if cfg.autocast is not None else device.type == "cuda"

    start, position, rows = 0, 0, []
    if ckpt is not None:
        program.graph_module.load_state_dict(ckpt["student"])
        opt.load_state_dict(ckpt["optimizer"])
        start, position = ckpt["step"], ckpt["data_position"]
        ck.set_rng_state(ckpt["rng"], device)
        rows = ck.truncate_log(out, start)
        log(f"resumed {out} at step {start}/{cfg.steps} ({sched.bits_at(start):g} bits)")
    else:
        log(f"QAT: {sched.name} schedule {sched.describe()}; {len(layers)} scheduled layers, "
            f"{sum(p.numel() for _, p in params):,} trainable parameters on {device}; "
            f"activations {cfg.act_quant}; data: {note}")
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    samples = _stream(factory, position)
    log_file = open(out / ck.LOG, "a") if out is not None else None
    bar = tqdm(total=cfg.steps, initial=start, desc="qat", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, current = time.perf_counter(), None
    try:
        for step in range(start, end):
            bits = sched.bits_at(step)
            if bits != current:
                set_bits(buffers, layers, bits)
                current = bits
            sample = next(samples)
            if position == 0:
                _check_like(sample, program.example_inputs, "training data sample 0")
            position += 1
            sample = _to(sample, device)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    target = teacher_call(**sample)
                pred = student_call(**sample)
                kd = kd_loss(pred, target)
                loss = kd + cfg.task_weight * task_loss(sample, pred) if task_loss else kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.clip if cfg.clip else math.inf)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ck.RunError(f"loss is {value} at step {step + 1} ({bits:g} bits); lower --lr")
            row = {"step": step + 1, "bits": bits, "loss": value, "kd": float(kd.detach()), "lr": lr,
                   "grad_norm": float(norm), "seconds": round(time.perf_counter() - t0, 4)}
            rows.append(row)
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            bar.update(1)
            bar.set_postfix(bits=f"{bits:g}", loss=f"{value:.3e}", refresh=False)
            done = step + 1
            if out is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                                    or sched.changes_after(step) or done == end):
                ck.save_checkpoint(out, done=done, student=program.graph_module, optimizer=opt,
                                   schedule=sched.to_dict(), data_position=position, device=device)
    finally:
        bar.close()
        if log_file:
            log_file.close()

    finished = end == cfg.steps
    if finished:
        set_bits(buffers, layers, sched.final_bits)
    program.graph_module.to("cpu")
    if teacher_mod is not None and teacher_dev is not None:
        teacher_mod.to(teacher_dev)
    summary = summarize(rows, sched, cfg, layers, time.perf_counter() - t0, finished, note)
    if out is not None:
        plot_loss(rows, sched.boundaries(), out / ck.PLOT,
                  title=f"{sched.name} schedule: KD loss vs step")
        if finished:
            ck.save_student(out, program.graph_module)
            (out / ck.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if report:
        log(summary_text(summary, out))
    return TrainResult(program, sched, rows, summary, out)


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
        diff = {k: (run["train"].get(k), v) for k, v in asdict(cfg).items()
                if k not in ("steps", "schedule", "bits") and run["train"].get(k) != v}
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
