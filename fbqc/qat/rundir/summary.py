"""The end-of-training summary: per phase (a ramp labelled ``8→4 ramp``), the loss at its start and end
(the means of its first and last 10% of steps); what was written."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence


def mean_or_none(xs: Sequence[float]) -> float | None:
    """The mean of ``xs``; None for none (a phase or window without logged steps)."""
    return sum(xs) / len(xs) if xs else None


def summarize(rows: Sequence[dict], sched, cfg, layers: Sequence[str], seconds: float, finished: bool,
              data_note: str) -> dict[str, Any]:
    phases = []
    for span in sched.boundaries():
        start, end, bits = span
        losses = [r["loss"] for r in rows if start < r["step"] <= end]
        k = max(1, len(losses) // 10)
        ramp = {"from_bits": span.from_bits} if span.ramp else {}     # bits: where a ramp ends
        phases.append({"bits": bits, **ramp, "label": span.label + (" ramp" if span.ramp else ""),
                       "steps": end - start, "first_step": start + 1, "last_step": end,
                       "trained": len(losses), "loss_start": mean_or_none(losses[:k]),
                       "loss_end": mean_or_none(losses[-k:])})
    last = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
    return {"schedule": sched.name, "spec": sched.spec, "steps": sched.steps,
            "completed": rows[-1]["step"] if rows else 0, "finished": finished,
            "final_bits": sched.final_bits, "scheduled_layers": len(layers),
            "final_loss": mean_or_none(last), "seconds_this_session": round(seconds, 2),
            "data": data_note, "phases": phases, "config": asdict(cfg)}


def summary_text(summary: dict[str, Any], out: Path | None) -> str:
    def fmt(v):
        return "—" if v is None else f"{v:.4e}"

    lines = [f"QAT {summary['schedule']} ({summary['spec']}): {summary['completed']}/{summary['steps']} "
             f"steps in {summary['seconds_this_session']:.1f} s this session"
             + ("" if summary["finished"] else " — not finished (resume to continue)"),
             f"  {'bits':>14} {'steps':>7} {'loss at start':>14} {'loss at end':>12}"]
    for p in summary["phases"]:
        label = p.get("label", f"{p['bits']:g}")                     # a summary.json from before labels
        lines.append(f"  {label:>14} {p['steps']:>7} {fmt(p['loss_start']):>14} {fmt(p['loss_end']):>12}")
    lines.append(f"  final loss (mean of the last 10% of steps): {fmt(summary['final_loss'])}; "
                 f"{summary['scheduled_layers']} layers end at {summary['final_bits']:g} bits")
    if out is not None:
        what = "student.pt, " if summary["finished"] else ""
        lines.append(f"  wrote {out}/: {what}checkpoint.pt, log.jsonl, loss.png"
                     + (", summary.json" if summary["finished"] else ""))
        if summary["finished"]:
            lines.append(f"  next: fbqc compile {out} --target cpu")
    return "\n".join(lines)
