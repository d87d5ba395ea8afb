"""The analysis and report of ``benchmarks/paper_table.py``: paired per-seed deltas, the verdict, table, plot.

A method *wins* on an architecture when its mean FID is below the reference schedule's by more than
the seed spread: ``mean(Δ) < 0`` and ``|mean(Δ)| > max(std FID of the method, std FID of the
reference)``, Δ the per-seed paired difference (same seed = same data order, calibration and noises).
The default of ``fbqc train`` changes only for a schedule that wins on at least 3 of 4 architectures
(¾ of those run).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def ms(xs, fmt: str = ".2f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{np.mean(xs):{fmt}} ± {np.std(xs):{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"


def _fids(runs) -> list[float]:
    return [r["fid"] for r in runs if r is not None]


def _change_stats(runs) -> dict | None:
    changes = [c for r in runs if r is not None for c in r.get("bit_changes") or []]
    if not changes:
        return None
    spikes = [c["spike"] for c in changes if c.get("spike") is not None]
    rec = [c["recovery_steps"] for c in changes if c.get("recovery_steps") is not None]
    return {"changes": len(changes), "spike_mean": float(np.mean(spikes)) if spikes else None,
            "spike_max": float(np.max(spikes)) if spikes else None,
            "recovery_mean": float(np.mean(rec)) if rec else None, "never_recovered": len(changes) - len(rec)}


def analyse(results: dict, reference: str) -> None:
    """Adds per architecture ``stats`` (mean/std/paired deltas/wins) and the global ``verdict``."""
    archs = results["archs"]
    for res in archs.values():
        ref = _fids(res["runs"].get(reference, []))
        stats = {}
        ref_runs = res["runs"].get(reference, [])
        for m, runs in res["runs"].items():
            f = _fids(runs)
            if not f:
                continue
            st = {"fid_mean": float(np.mean(f)), "fid_std": float(np.std(f)), "bit_changes": _change_stats(runs),
                  "seeds": len(f)}
            pairs = [(r["fid"], q["fid"]) for r, q in zip(runs, ref_runs) if r is not None and q is not None]
            if m != reference and pairs:
                d = [x - y for x, y in pairs]
                spread = max(st["fid_std"], float(np.std(ref)))
                st.update(deltas=d, delta_mean=float(np.mean(d)), delta_std=float(np.std(d)), spread=spread,
                          wins=bool(np.mean(d) < 0 and -np.mean(d) > spread),
                          loses=bool(np.mean(d) > 0 and np.mean(d) > spread))
            stats[m] = st
        res["stats"] = stats
        qat = {m: s for m, s in stats.items() if m != "ptq"}
        res["best"] = min(qat, key=lambda m: qat[m]["fid_mean"]) if qat else None
    need = max(1, math.ceil(0.75 * len(archs)))
    methods = [m for m in results["config"]["methods"] if m not in ("ptq", reference)]
    wins = {m: [k for k, r in archs.items() if r["stats"].get(m, {}).get("wins")] for m in methods}
    def gain(m: str) -> float:
        return -float(np.mean([archs[k]["stats"].get(m, {}).get("delta_mean", 0.0) for k in archs]))

    winner = max(wins, key=lambda m: (len(wins[m]), gain(m)), default=None)
    change = winner is not None and len(wins[winner]) >= need
    results["verdict"] = {"reference": reference, "wins": wins, "needed": need, "architectures": len(archs),
                          "default": winner if change else reference,
                          "text": (f"{winner} beats {reference} by more than the seed spread on "
                                   f"{len(wins[winner])}/{len(archs)} architectures ({', '.join(wins[winner])}): "
                                   f"it should be the default" if change else
                                   f"no schedule beats {reference} by more than the seed spread on ≥ {need} of "
                                   f"{len(archs)} architectures: the default stays {reference}")}


def _changes(bc: dict | None) -> str:
    if not bc or bc["spike_mean"] is None:
        return "—"
    rec = "—" if bc["recovery_mean"] is None else f"{bc['recovery_mean']:.0f}"
    never = f" ({bc['never_recovered']} never)" if bc["never_recovered"] else ""
    return f"{bc['changes']}: ×{bc['spike_mean']:.2f} / ×{bc['spike_max']:.2f}, {rec}{never}"


def table(results: dict, reference: str) -> str:
    a = results["config"]
    lines = [f"W{a['bits']:g}A8 on {a['size']}×{a['size']} digits; {a['qat_steps']} QAT steps × batch {a['batch']} "
             f"(lr {a['qat_lr']:g}); {a['samples']} samples, {a['sample_steps']} Euler steps; {a['seeds']} seeds, "
             f"mean ± std; Δ = FID − FID({reference}) per seed (same data order, calibration, noises); "
             f"**bold**: beats {reference} by more than the seed spread, *italic*: loses by more; "
             f"{results['seconds']:.0f} s in all"]
    for k, res in results["archs"].items():
        t = res["teacher"]
        lines += ["", f"### {t['describe']}",
                  f"teacher {t['source']}, final loss {t['final_loss']:.4f}, FID vs real digits "
                  f"{ms([x['fid'] for x in t['vs_real']])}"
                  + (f"; may vary: {'; '.join(t['nondeterministic'])}" if t.get("nondeterministic") else ""),
                  "", f"| method | FID vs teacher ↓ | Δ vs {reference} per seed | PSNR dB ↑ | SSIM ↑ | label acc ↑ "
                  "| final KD loss | bit changes: mean / max loss spike, mean recovery steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, runs in res["runs"].items():
            runs = [r for r in runs if r is not None]
            if m not in res["stats"]:
                lines.append(f"| {m} | not run (see errors) | | | | | | |")
                continue
            st = res["stats"][m]
            name = f"**{m}**" if st.get("wins") else f"*{m}*" if st.get("loses") else m
            d = (" ".join(f"{x:+.2f}" for x in st["deltas"]) + f" (mean {st['delta_mean']:+.2f})"
                 if "deltas" in st else "—")
            lines.append(f"| {name} | {ms([r['fid'] for r in runs])} | {d} | {ms([r['psnr'] for r in runs])} | "
                         f"{ms([r['ssim'] for r in runs], '.3f')} | {ms([r['label_acc'] for r in runs], '.3f')} | "
                         f"{ms([r['final_kd_loss'] for r in runs], '.2e')} | {_changes(st['bit_changes'])} |")
        lines.append(f"\nbest QAT method here: {res['best']}")
    lines += ["", f"**Verdict**: {results['verdict']['text']}."]
    lines += [f"- failed: {e}" for e in results.get("errors", [])]
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    archs = {k: r for k, r in results["archs"].items() if r["curves"]}
    if not archs:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(archs), figsize=(4.5 * len(archs), 4), dpi=100, squeeze=False)
    for ax, (k, res) in zip(axes[0], archs.items()):
        for m, ys in res["curves"].items():
            w = max(1, len(ys) // 40)
            sm = np.convolve(ys, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w, len(ys) + 1), sm, label=m, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("QAT step")
        ax.set_title(res["teacher"]["describe"].split(" (")[0])
    axes[0][0].set_ylabel("KD loss (moving mean, seed 0)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
