"""Loss vs step with the schedule's bits per step (a ramp is a slope) and its phases marked
(matplotlib, Agg: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fbqc.outputs import write_replacing


def _bits_line(boundaries: Sequence[tuple[int, int, float]]) -> tuple[list[float], list[float]]:
    """``(x, bits)`` points of the trained bits as a step line (``steps-post``): 1-based step ``k`` spans
    ``k ± 0.5``. A constant phase needs one point, a ramp (a :class:`~fbqc.qat.schedule.Span` with
    ``bits_at``) one per step; plain ``(start, end, bits)`` tuples are constant phases."""
    xs, ys = [], []
    for span in boundaries:
        start, end, bits = span
        at = getattr(span, "bits_at", None) if getattr(span, "ramp", False) else None
        for s in (range(start, end) if at else (start,)):
            xs.append(s + 0.5)
            ys.append(at(s) if at else bits)
    if boundaries:
        xs.append(boundaries[-1][1] + 0.5)
        ys.append(ys[-1])
    return xs, ys


def plot_loss(rows: Sequence[dict], boundaries: Sequence[tuple[int, int, float]], path: str | Path,
              title: str = "QAT loss (KD MSE vs the float teacher)") -> Path:
    """Write a PNG of ``rows`` (``{"step", "loss"}``, step 1-based) with one band per schedule phase
    (``Schedule.boundaries()``) and the bits per step on a second axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    steps = [r["step"] for r in rows]
    loss = [max(r["loss"], 1e-12) for r in rows]
    if steps:
        k = max(1, len(loss) // 50)
        ax.plot(steps, loss, lw=0.8, alpha=0.45 if k > 1 else 1.0, color="tab:blue", label="loss")
        if k > 1:
            smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1])
                      for i in range(len(loss))]
            ax.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"mean of {k}")
        ax.set_yscale("log")
    colours = ["#f2f2f2", "#e0e8f5"]
    for i, span in enumerate(boundaries):
        start, end, bits = span
        ax.axvspan(start + 0.5, end + 0.5, color=colours[i % 2], zorder=0)
        if i:
            ax.axvline(start + 0.5, color="tab:red", lw=0.8, ls="--")
        label = getattr(span, "label", f"{bits:g}")
        ax.text((start + end) / 2 + 0.5, 1.0, f"{label}b", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, pad=16)
    handles, labels = ax.get_legend_handles_labels()
    if boundaries:
        ax.set_xlim(0.5, boundaries[-1][1] + 0.5)
        bx = ax.twinx()
        xs, ys = _bits_line(boundaries)
        bx.plot(xs, ys, drawstyle="steps-post", lw=1.2, color="tab:red", alpha=0.8, label="weight bits")
        lo, hi = min(ys), max(ys)
        bx.set_ylim(lo - 0.5, hi + 0.5)
        bx.set_ylabel("weight bits", color="tab:red")
        bx.tick_params(axis="y", colors="tab:red")
        h, lab = bx.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    write_replacing(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
