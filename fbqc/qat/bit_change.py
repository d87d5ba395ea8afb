"""What happens at a bit change of the QAT schedule: the remedies a run can switch on and the diagnostics.

A *bit change* is the start of a new phase: step ``s > 0`` (0-based) is one iff ``sched.changes_after(s - 1)``
(inside a ramp phase the bits move every step; those steps are not changes). At the top of step ``s``,
once the bits buffers hold the new bits and before the forward, :meth:`BitChanges.at_step`:

- records the AdamW moments as they are (``exp_avg_norm``: the global L2 norm of the first moments;
  ``exp_avg_sq_sqrt_mean``: the mean of sqrt(second moment) over every state element), then
- applies ``--moments``: ``keep`` (nothing), ``reset`` (``exp_avg``, ``exp_avg_sq`` zeroed and the step
  counter set to 0: the next update is a fresh AdamW's), ``momentum`` (only ``exp_avg`` zeroed).

``--rewarm N`` multiplies the lr of the k-th step at the new bits (k = 1 … N) by k / N (:func:`lr_factor`;
on top of ``--warmup``). Both depend on the step only, so a resumed run does the same (the checkpoint at
the end of a phase holds the moments before the remedy; the resumed loop applies it).

Diagnostics: the step row (log.jsonl) of the first step at the new bits gets ``"change": {"from", "to",
"exp_avg_norm", "exp_avg_sq_sqrt_mean"}``; :func:`report` turns the rows into one dict per change (the
loss spike and its recovery) for ``summary["bit_changes"]``. For the program student the codes of the
scheduled layers' weights are also compared over a window around each change (:class:`BitChanges`: four
snapshots per change, no host sync until the report; kept in memory, so not in the rows). A benchmark
calls :func:`weight_codes` and :func:`level_flips` on a student itself.
"""
from __future__ import annotations

import bisect
from typing import Any, Iterable, Sequence

import torch

from fbqc.ops.fake_quant import weight_codes as _codes
from fbqc.program import Program
from fbqc.quant_math import container_for, narrow_levels, wide_levels
from fbqc.spec import LAYER

from .parallel.shards import local
from .rundir.summary import mean_or_none

MOMENTS = ("keep", "reset", "momentum")
WINDOW = 10                     # steps before/after a change that the report and the code snapshots look at


def change_steps(sched) -> list[int]:
    """The 0-based steps that start a new phase (bit changes), in order."""
    return [s for s in range(1, sched.steps) if sched.changes_after(s - 1)]


def lr_factor(step: int, changes: Sequence[int], rewarm: int) -> float:
    """The ``--rewarm`` factor of 0-based ``step``: k / rewarm on the k-th step at a change's new bits
    (k ≤ rewarm), else 1. ``changes``: :func:`change_steps`."""
    i = bisect.bisect_right(changes, step)
    if not rewarm or i == 0:
        return 1.0
    k = step - changes[i - 1] + 1
    return k / rewarm if k < rewarm else 1.0


# --- the optimizer's moments -------------------------------------------------------------------------

def moment_stats(opt: torch.optim.Optimizer) -> dict[str, float | None]:
    """The global L2 norm of AdamW's first moments and the mean of sqrt(second moment) over all state
    elements (one host sync). FSDP2: this process's local shards only (no collective; rank 0's is logged)."""
    avgs = [local(s["exp_avg"]) for s in opt.state.values() if "exp_avg" in s]
    sqs = [local(s["exp_avg_sq"]) for s in opt.state.values() if "exp_avg_sq" in s]
    n = sum(t.numel() for t in sqs)
    if not avgs or not n:
        return {"exp_avg_norm": None, "exp_avg_sq_sqrt_mean": None}
    with torch.no_grad():
        norm = torch.stack([x.double() for x in torch._foreach_norm(avgs)]).norm()
        root = torch.stack([t.float().sqrt().sum(dtype=torch.float64) for t in sqs]).sum() / n  # one at a time
        a, b = torch.stack([norm, root]).tolist()
    return {"exp_avg_norm": a, "exp_avg_sq_sqrt_mean": b}


def apply_moments(opt: torch.optim.Optimizer, mode: str) -> None:
    """``--moments``: ``reset`` zeroes ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) and the step
    counter (a tensor stays a tensor on its device), so bias correction restarts: a fresh AdamW for
    these parameters; ``momentum`` zeroes ``exp_avg`` only; ``keep`` does nothing. In place, on whatever
    state exists (fused/foreach; FSDP2's DTensors through their local shards: each process its own)."""
    if mode not in MOMENTS:
        raise ValueError(f"--moments must be one of {', '.join(MOMENTS)}, got {mode!r}")
    if mode == "keep":
        return
    with torch.no_grad():
        for st in opt.state.values():
            names = ("exp_avg",) if mode == "momentum" else ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
            for k in names:
                if isinstance(st.get(k), torch.Tensor):
                    local(st[k]).zero_()
            step = st.get("step")
            if mode == "reset" and step is not None:
                if isinstance(step, torch.Tensor):
                    local(step).zero_()
                else:
                    st["step"] = type(step)(0)


# --- weight codes ------------------------------------------------------------------------------------

def _program(student) -> Program:
    program = student if isinstance(student, Program) else getattr(student, "program", None)
    if not isinstance(program, Program):
        raise TypeError("weight_codes reads the program student (a FAKE_QUANT Program, its ProgramAdapter "
                        "or fbqc.qat.train's result); the module student is not supported")
    return program


def weight_codes(student, layers: Iterable[str] | None = None, bits: float | None = None
                 ) -> dict[str, torch.Tensor]:
    """``{layer: integer weight codes}`` of a program student's quantized layers (all, or ``layers``),
    computed by :func:`fbqc.ops.fake_quant.weight_codes` (the fake-quant op's own formula) at each layer's
    bits buffer, or at ``bits`` for every layer; on the weights' device, in the smallest integer dtype
    that holds the level set. ``student``: a FAKE_QUANT Program, a ProgramAdapter or a TrainResult."""
    program = _program(student)
    want = None if layers is None else set(layers)
    out = {}
    with torch.no_grad():
        for n in program.graph.nodes:
            if n.op != "call_function" or n.target != torch.ops.fbqc.fake_quant_weight.default:
                continue
            layer = n.meta[LAYER]
            if want is not None and layer not in want:
                continue
            w_node, b_node, axis, scheme = n.args
            w, buf = program.attr(w_node), program.attr(b_node)
            b = float(buf) if bits is None else float(bits)
            bt = torch.full((), b, dtype=torch.float64, device=w.device)    # a fill: no copy, no host sync
            q, _, _ = _codes(w, bt, axis, scheme)
            lo, hi = narrow_levels(b) if scheme == "narrow" else wide_levels(b)
            out[layer] = q.to(container_for(lo, hi).dtype)
    missing = sorted(want - out.keys()) if want is not None else []
    if missing:
        raise ValueError(f"weight_codes: {missing} are not quantized layers of the program")
    return out


def _flip_count(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    if before.keys() != after.keys():
        raise ValueError(f"level_flips: the snapshots hold other layers ({sorted(before.keys() ^ after.keys())})")
    count, n = None, 0
    for k, a in before.items():
        b = after[k].to(a.device)
        if a.shape != b.shape:
            raise ValueError(f"level_flips: layer {k} is {tuple(a.shape)} before and {tuple(b.shape)} after")
        moved = (a != b).sum()
        count, n = moved if count is None else count + moved, n + a.numel()
    return (count if count is not None else torch.zeros((), dtype=torch.int64)), n


def level_flips(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The fraction of weights whose code differs between two :func:`weight_codes` snapshots (take both
    at the same bits: codes at other bits lie on another grid)."""
    count, n = _flip_count(before, after)
    return float(count) / n if n else 0.0


# --- the loop's hooks ----------------------------------------------------------------------------------

class BitChanges:
    """The training loop's view of the bit changes of ``sched``: :meth:`at_step` at the top of every step,
    :meth:`lr_factor` for its lr, :meth:`report` at the end.

    Program student only, and only around changes: snapshots of the scheduled layers' codes (int8 for
    ≤ 8 bits) ``WINDOW`` steps before a change and at it (both at the old bits: ``flips_before_window``),
    at the change and ``WINDOW`` steps later (both at the new bits: ``flips_after_window``). A phase
    shorter than the window shortens it (``*_steps`` says how many updates it spans). They live in
    memory: a change whose window a resume cuts through reports None."""

    def __init__(self, sched, cfg, rt, layers: Sequence[str], window: int = WINDOW):
        self.sched, self.rewarm, self.moments, self.window = sched, cfg.rewarm, cfg.moments, window
        self.changes = change_steps(sched)
        self._set = set(self.changes)
        self.program = rt.program if rt.kind == "program" and self.changes and layers else None
        self.layers = list(layers)
        self.flips: dict[int, dict[str, Any]] = {}      # change step (1-based, as its row) → results
        self._before = None                             # (change, bits, codes, from step)
        self._after = None                              # (change, bits, codes, until step)

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.changes, self.rewarm)

    def _snap(self, bits: float) -> dict[str, torch.Tensor]:
        return weight_codes(self.program, self.layers, bits)

    def _close_after(self, done: int) -> None:
        """The code snapshot ``window`` updates (or until the next change / the end) after a change."""
        if self._after is not None and self._after[3] == done:
            c, bits, snap, _ = self._after
            self.flips[c + 1].update(flips_after_window=_flip_count(snap, self._snap(bits)),
                                     flips_after_steps=done - c)
            self._after = None

    def at_step(self, t: int, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """At the top of 0-based step ``t`` (bits already set): at a change, the moment statistics and the
        remedy; the code snapshots. Returns what the step's row gets (``{}`` on most steps)."""
        row: dict[str, Any] = {}
        if self.program is not None:
            self._close_after(t)
        if t in self._set:
            old, new = self.sched.bits_at(t - 1), self.sched.bits_at(t)
            row["change"] = {"from": old, "to": new, **moment_stats(opt)}
            apply_moments(opt, self.moments)
            if self.program is not None:
                got = self.flips[t + 1] = dict.fromkeys(
                    ("flips_before_window", "flips_before_steps", "flips_after_window", "flips_after_steps"))
                if self._before is not None and self._before[0] == t:
                    _, bits, snap, since = self._before
                    got.update(flips_before_window=_flip_count(snap, self._snap(bits)), flips_before_steps=t - since)
                i = bisect.bisect_right(self.changes, t)
                until = min(t + self.window, self.changes[i] if i < len(self.changes) else self.sched.steps)
                self._after = (t, new, self._snap(new), until)
            self._before = None
        if self.program is not None and self._before is None:
            i = bisect.bisect_right(self.changes, t)
            if i < len(self.changes):
                nxt, start = self.changes[i], self.changes[i - 1] if i else 0
                if t == nxt - self.window or (t == start and nxt - t < self.window):
                    bits = self.sched.bits_at(nxt - 1)
                    same = self._after is not None and self._after[0] == t and self._after[1] == bits
                    self._before = (nxt, bits, self._after[2] if same else self._snap(bits), t)
        return row

    def report(self, rows: Sequence[dict]) -> list[dict[str, Any]]:
        """:func:`report` of ``rows`` with the code flips; call it right after the loop (a window that
        ends with the run is measured on the final weights)."""
        if self.program is not None and rows:
            self._close_after(rows[-1]["step"])
        flips = {}
        for step, got in self.flips.items():
            flips[step] = {k: (float(v[0]) / v[1] if v[1] else 0.0) if isinstance(v, tuple) else v
                           for k, v in got.items()}
        return report(rows, self.window, flips)


def report(rows: Sequence[dict], window: int = WINDOW, flips: dict[int, dict] | None = None) -> list[dict[str, Any]]:
    """One dict per bit change (a row with ``"change"``), from the step rows:

    ``step`` (the 1-based step of the first update at the new bits: its row's), ``from``, ``to``;
    ``loss_before``: the mean loss of the ``window`` steps before it; ``loss_first``: the loss of that first
    step (its forward is the first at the new bits); ``loss_peak``: the max over the ``window`` steps from
    it; ``spike`` = loss_peak / loss_before; ``recovery_steps``: updates at the new bits until a step's loss
    is ≤ 1.1 × loss_before (0: the first step's already is; None: never within the run); the moment
    statistics of the change row; ``flips``: extra fields per change step (:class:`BitChanges`)."""
    by_step = {r["step"]: r for r in rows}
    out = []
    for r in rows:
        ch = r.get("change")
        if not ch:
            continue
        s = r["step"]
        before = mean_or_none([by_step[i]["loss"] for i in range(s - window, s) if i in by_step])
        after = [by_step[i]["loss"] for i in range(s, s + window) if i in by_step]
        peak = max(after) if after else None
        recovery = None
        if before is not None:
            recovery = next((x["step"] - s for x in rows if x["step"] >= s and x["loss"] <= 1.1 * before), None)
        out.append({"step": s, "from": ch["from"], "to": ch["to"], "loss_before": before,
                    "loss_first": r["loss"], "loss_peak": peak,
                    "spike": peak / before if before and peak is not None else None,
                    "recovery_steps": recovery,
                    **{k: v for k, v in ch.items() if k not in ("from", "to")},
                    **(flips or {}).get(s, {})})
    return out
