"""Run directories: checkpoints (bit-exact resume), the run description and the student's final state.

A run directory holds::

    run.json        what was trained: schedule, steps, training flags, source (model file, compile flags)
    checkpoint.pt   the latest checkpoint: student state, optimizer, schedule position, RNG states,
                    data position (written every N steps and at each bit-width change; atomic)
    log.jsonl       one line per step: step, bits, loss, lr, grad norm, seconds
    loss.png        loss vs step with the bit-width changes marked
    student.pt      the trained student's state (what `fbqc compile RUN_DIR` loads)
    summary.json    the end-of-training summary
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbqc.artifact import read_versioned_json
from fbqc.errors import UserError
from fbqc.outputs import write_replacing

RUN, CKPT, LOG, PLOT, STUDENT, SUMMARY = ("run.json", "checkpoint.pt", "log.jsonl", "loss.png",
                                           "student.pt", "summary.json")
FORMAT = 1


class RunError(UserError):
    pass


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    write_replacing(path, lambda tmp: torch.save(obj, tmp))


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(out: Path, *, done: int, student: dict, optimizer: dict, kind: str, schedule: dict,
                    data_position: int, device: torch.device) -> None:
    """``student`` / ``optimizer``: their state dicts (the module student's are full, FQN-keyed)."""
    _atomic_save({"format": FORMAT, "step": done, "student": student, "student_kind": kind,
                  "optimizer": optimizer, "schedule": schedule,
                  "data_position": data_position, "rng": rng_state(device)}, out / CKPT)


def load_checkpoint(run: Path) -> dict[str, Any]:
    path = Path(run) / CKPT
    if not path.is_file():
        if (Path(run) / RUN).is_file():
            raise RunError(f"{run}: the run stopped before its first checkpoint, so there is nothing to resume; "
                           f"start it again with --force (add --checkpoint-every N to checkpoint sooner)")
        raise RunError(f"{run}: no {CKPT} to resume from (was the run started with -o {run}?)")
    # memory-mapped: a process reads the pages it loads (an FSDP rank: its shards) and every process of
    # the host shares them in the page cache, instead of one full copy each (FLUX: 132.5 GiB per copy)
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if ckpt.get("format") != FORMAT:
        raise RunError(f"{path}: checkpoint format {ckpt.get('format')!r}, this fbqc reads {FORMAT}")
    return ckpt


def write_run(out: Path, run: dict[str, Any]) -> None:
    """``run.json``, written to a temporary file and renamed: a reader never sees half of it."""
    text = json.dumps({"format": FORMAT, **run}, indent=2, default=str) + "\n"
    write_replacing(Path(out) / RUN, lambda tmp: tmp.write_text(text))


def read_run(run: str | Path) -> dict[str, Any]:
    if not Path(run).is_dir():
        raise RunError(f"run directory {run} does not exist")
    return read_versioned_json(Path(run) / RUN, FORMAT, "run", RunError,
                               f"{run} is not an fbqc training run (no {RUN})")


def read_log(run: Path, upto: int | None = None) -> list[dict[str, Any]]:
    path = Path(run) / LOG
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def truncate_log(run: Path, upto: int) -> list[dict[str, Any]]:
    """Keep the log lines of steps ≤ ``upto`` (the resumed checkpoint); later steps are redone."""
    rows = read_log(run, upto)
    (Path(run) / LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def save_student(out: Path, state: dict[str, torch.Tensor]) -> None:
    _atomic_save(state, out / STUDENT)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of a state dict (recorded in a compiled run's manifest)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_student(run: str | Path) -> dict[str, torch.Tensor]:
    path = Path(run) / STUDENT
    if not path.is_file():
        raise RunError(f"{run}: no {STUDENT}; the run has not finished (continue it with "
                       f"`fbqc train --resume {run}`)")
    return torch.load(path, map_location="cpu", weights_only=True)
