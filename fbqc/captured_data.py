"""Captured teacher trajectories (``fbqc capture``, :mod:`fbqc.trajectories`) as calibration and
training data: ``fbqc compile --calib-data DIR`` and ``fbqc train --data DIR [--teacher-cache]``.

A record holds every argument the transformer received (``encoder_attention_mask``, ``return_dict``,
``added_cond_kwargs`` with ``None`` leaves, …); the exported program takes the keys of the model
file's ``example_inputs()``. :class:`Selector` keeps those keys (nested dicts recursively), checks
each tensor's shape and dtype against the example (a mismatch is a one-line error naming the key,
the capture and the fix), and checks that what it drops is *neutral* — ``None``, ``return_dict``, an
empty dict, a mask of all ones. Anything else dropped changes what the teacher computed: it is warned
about once (the log) and recorded (the manifest / run.json), never silently ignored.

- Calibration (:class:`CapturedSamples`): ``Trajectories.evenly(n)`` records, spread over denoising
  steps, prompts and guidance branches (time-step-aware calibration).
- Training (:class:`CapturedTraining`): every record, in a shuffled order that is fixed by ``--seed``
  and drawn anew for each pass over the capture (epoch ``e`` is the permutation seeded with
  ``sample_seed(seed, e)``); endless and map-style, so sample ``i`` is made without the ones before
  it and each of N processes reads only its own records. With ``targets=True`` a sample also carries
  the recorded teacher output under :data:`TARGET` (``--teacher-cache``: the KD target, no teacher
  forward). Setting ``FBQC_DATA_TRACE=PATH`` appends ``read INDEX RECORD`` per read to ``PATH.RANK``
  (:func:`fbqc.data.trace`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch

from .data import ENDLESS, sample_seed, trace
from .errors import UserError
from .trajectories import Trajectories, describe_value, neutral_argument

#: the key under which a training sample carries its recorded teacher output (``--teacher-cache``)
TARGET = "__fbqc_target__"


class DataError(UserError):
    pass


def open_capture(directory: str | Path, flag: str) -> Trajectories:
    try:
        return Trajectories(directory)
    except UserError as e:
        raise DataError(f"{flag} {directory}: {e}") from e


def manifest_sha256(traj: Trajectories) -> str:
    return hashlib.sha256((traj.dir / "manifest.json").read_bytes()).hexdigest()


def capture_weights_sha256(traj: Trajectories) -> str | None:
    """The teacher weights' hash the capture recorded (``weights_sha256``, top level or under ``model``)."""
    m = traj.manifest
    for d in (m, m.get("model"), m.get("pipeline")):
        if isinstance(d, dict) and isinstance(d.get("weights_sha256"), str):
            return d["weights_sha256"]
    return None


def weights_check(traj: Trajectories, module: torch.nn.Module, flag: str) -> tuple[str | None, str | None]:
    """(the weights' hash, a warning when the capture was made with other weights, else None)."""
    from .capture import weights_sha256

    recorded = capture_weights_sha256(traj)
    if recorded is None:
        return None, f"{flag} {traj.dir}: the capture records no weights hash; cannot check that it was made " \
                     f"with this model's weights"
    ours = weights_sha256(module)
    if ours != recorded:
        return ours, (f"{flag} {traj.dir} was captured with different weights (sha256 {recorded[:12]}…, "
                      f"this model {ours[:12]}…): its inputs and teacher outputs come from another model")
    return ours, None


# ---- records -> program inputs -----------------------------------------------------------------------


class Selector:
    """A record's program inputs (the example's keys), checked; non-neutral dropped keys warned once."""

    def __init__(self, traj: Trajectories, example: dict[str, Any], flag: str,
                 log: Callable[[str], None] = print) -> None:
        self.traj, self.example, self.flag, self.log = traj, example, flag, log
        self.dropped: dict[str, str] = {}          # non-neutral dropped inputs: key -> what it held

    def _fix(self) -> str:
        return (f"capture with the model file's settings (the same model file, --preset and "
                f"--checkpoint): fbqc capture MODEL_FILE ... -o {self.traj.dir}")

    def _select(self, record: dict, example: dict, prefix: str, i: int) -> dict:
        out = {}
        for k, e in example.items():
            path = prefix + k
            if k not in record:
                raise DataError(f"{self.flag} {self.traj.dir}: the captured records have no input {path!r}, "
                                f"which the model's example_inputs() has; {self._fix()}")
            v = record[k]
            if isinstance(e, dict) and isinstance(v, dict):
                out[k] = self._select(v, e, path + ".", i)
                continue
            if isinstance(e, torch.Tensor) and (not isinstance(v, torch.Tensor) or v.shape != e.shape
                                                or v.dtype != e.dtype):
                raise DataError(f"{self.flag} {self.traj.dir}: captured input {path!r} is {describe_value(v)} "
                                f"(record {i}), the exported program expects {describe_value(e)}; {self._fix()}")
            out[k] = v
        for k, v in record.items():
            path = prefix + k
            if k not in example and not neutral_argument(path, v) and path not in self.dropped:
                self.dropped[path] = describe_value(v)
                self.log(f"warning: {self.flag} {self.traj.dir}: captured input {path!r} ({describe_value(v)}, "
                         f"not None / all ones) is dropped: the exported program does not take it, so the "
                         f"model sees other inputs than the teacher did")
        return out

    def __call__(self, i: int) -> dict[str, Any]:
        return self._select(self.traj[i], self.example, "", i)


class CapturedSamples:
    """The records ``indices`` of a capture as program inputs (map-style, finite): calibration data."""

    def __init__(self, selector: Selector, indices: list[int]) -> None:
        self.selector, self.indices = selector, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        return self.selector(self.indices[j])

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class CapturedTraining:
    """Every record, reshuffled each epoch from ``seed``; endless and map-style (training data)."""

    def __init__(self, selector: Selector, seed: int = 0, targets: bool = False) -> None:
        self.selector, self.seed, self.targets = selector, seed, targets
        self.n = len(selector.traj)
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return ENDLESS

    def record_index(self, i: int) -> int:
        epoch, k = divmod(i, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][k]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < ENDLESS:
            raise IndexError(i)
        r = self.record_index(i)
        trace("read", i, r)
        sample = self.selector(r)
        if self.targets:
            sample[TARGET] = self.selector.traj.target(r)
        return sample

    def __iter__(self):
        i = 0
        while True:
            yield self[i]
            i += 1


def without_target(samples):
    """``samples`` without their :data:`TARGET` (e.g. for calibrating static activation ranges)."""
    return ({k: v for k, v in s.items() if k != TARGET} for s in samples)


# ---- what compile and train call --------------------------------------------------------------------


def _capture_record(traj: Trajectories, ix: list[int] | None) -> dict[str, Any]:
    rs = traj.records() if ix is None else [traj.record(i) for i in ix]
    return {"capture": str(traj.dir), "manifest_sha256": manifest_sha256(traj),
            "weights_sha256": capture_weights_sha256(traj), "records": len(rs),
            "prompts": sorted({r.prompt for r in rs}), "steps": sorted({r.step for r in rs}),
            "branches": sorted({r.branch for r in rs})}


class Calibration:
    """Where compile's calibration samples come from and what the manifest says about them."""

    def __init__(self, mf, program, opts, log: Callable[[str], None] = print) -> None:
        from .data import DATA_FREE_NOTE, samples_around

        self.log, self.requested, self.observer = log, opts.calib_samples, opts.observer
        self.planned = self.requested                       # what the log announces (a capture may hold fewer)
        self.selection: dict[str, Any] | None = None
        self.selector: Selector | None = None
        self.warnings: list[str] = []
        calib_data = getattr(opts, "calib_data", None)
        if calib_data is not None:
            traj = open_capture(calib_data, "--calib-data")
            self.selector = Selector(traj, program.example_inputs, "--calib-data", self._warn)
            ix = traj.evenly(self.requested)
            self.selector(ix[0])                              # a shape mismatch fails here, before the passes
            self.data = CapturedSamples(self.selector, ix)
            self.planned = len(ix)
            self.source = f"the capture {calib_data}"
            self.selection = {**_capture_record(traj, ix), "indices": ix}
            _, warning = weights_check(traj, program.graph_module, "--calib-data")
            if warning:
                self._warn(f"warning: {warning}")
            self.note = (f"captured teacher trajectories {calib_data}: {len(ix)} of {len(traj)} records spread "
                         f"evenly over {len(self.selection['steps'])} steps, {len(self.selection['prompts'])} "
                         f"prompts and branches {'/'.join(self.selection['branches'])}")
        elif mf.has("calibration_data"):
            self.data, self.note = mf.call("calibration_data"), "calibration_data() of the model file"
            self.source = "calibration_data()"
        else:
            self.data, self.note = samples_around(program.example_inputs), DATA_FREE_NOTE
            self.source = "the data-free default"

    def _warn(self, message: str) -> None:
        self.warnings.append(message.removeprefix("warning: "))
        self.log(message)

    def entry(self, info: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``calibration``; ``info``: Calibrate's ``program.info["calibration"]``."""
        used = info.get("samples", self.requested)
        if used < self.requested:
            self._warn(f"warning: {self.source} yielded {used} samples, fewer than --calib-samples "
                       f"{self.requested}")
        return {"samples": used, "requested": self.requested, "observer": self.observer, "data": self.note,
                **({"selection": self.selection} if self.selection is not None else {}),
                **({"dropped_inputs": self.selector.dropped} if self.selector and self.selector.dropped else {}),
                **({"warnings": self.warnings} if self.warnings else {})}


def training_data(data_dir: str | Path, example: dict[str, Any], teacher: torch.nn.Module, *, seed: int,
                  teacher_cache: bool, log: Callable[[str], None] = print, check_weights: bool = True,
                  check_first: bool | None = None) -> tuple[CapturedTraining, str, dict[str, Any]]:
    """(the map-style training dataset, its note for the log, its record for run.json);
    ``check_weights``: compare ``teacher``'s weights with the capture's (one process of N does);
    ``check_first``: read the first record now, so that a shape mismatch (or a NaN recorded output)
    fails before training starts (default: as ``check_weights`` — one process of N reads it; the
    others read only their own records, which the same checks guard)."""
    traj = open_capture(data_dir, "--data")
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message.removeprefix("warning: "))
        log(message)

    selector = Selector(traj, example, "--data", warn)
    data = CapturedTraining(selector, seed, targets=teacher_cache)
    if check_weights if check_first is None else check_first:
        selector(data.record_index(0))                   # a shape mismatch fails before training starts
        if teacher_cache:
            t = traj.target(data.record_index(0))
            if not torch.isfinite(t.float()).all():
                raise DataError(f"--data {data_dir}: a recorded teacher output is NaN or Inf")
    _, warning = weights_check(traj, teacher, "--data") if check_weights else (None, None)
    if warning:
        warn(f"warning: {warning}")
    record = {**_capture_record(traj, None), "teacher_cache": teacher_cache, "order": f"shuffled per epoch, seed {seed}",
              **({"dropped_inputs": selector.dropped} if selector.dropped else {}),
              **({"warnings": warnings} if warnings else {})}
    note = (f"captured teacher trajectories {data_dir}: {len(traj)} records ({len(record['prompts'])} prompts, "
            f"{len(record['steps'])} steps, branches {'/'.join(record['branches'])}), shuffled per epoch; "
            f"KD target: {'the recorded teacher outputs (no teacher forward)' if teacher_cache else 'the teacher'}")
    return data, note, record
