"""Loss vs step, with the bit-width changes marked (matplotlib, Agg: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_loss(rows: Sequence[dict], boundaries: Sequence[tuple[int, int, float]], path: str | Path,
              title: str = "QAT loss (KD MSE vs the float teacher)") -> Path:
    """Write a PNG of ``rows`` (``{"step", "loss"}``, step 1-based) with one band per schedule phase."""
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
    for i, (start, end, bits) in enumerate(boundaries):
        ax.axvspan(start + 0.5, end + 0.5, color=colours[i % 2], zorder=0)
        if i:
            ax.axvline(start + 0.5, color="tab:red", lw=0.8, ls="--")
        ax.text((start + end) / 2 + 0.5, 1.0, f"{bits:g}b", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, pad=16)
    if boundaries:
        ax.set_xlim(0.5, boundaries[-1][1] + 0.5)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
