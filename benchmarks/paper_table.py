"""A small, real reproduction of FraQAT's table (DESIGN.md §6): PTQ vs direct / integer / fractional QAT.

1. Train a tiny ``SanaTransformer2DModel`` teacher here on scikit-learn's 8×8 digits (class-conditional
   through fixed random "caption" embeddings, rectified-flow objective, timesteps σ·1000).
2. Export it with fbqc, quantize to W4A8 (every linear / 1×1 conv in the blocks) by PTQ (calibration
   only) and by QAT with the ``direct``, ``integer`` and ``fractional`` schedules at equal compute (same
   steps and batch, KD against the teacher, dynamic per-sample INT8 activations while training); then
   static activation calibration (3σ) as for deployment.
3. Sample every model with diffusers' ``FlowMatchEulerDiscreteScheduler`` from the same noises and
   labels as the teacher; score against the teacher's own samples: Fréchet distance on the features of
   a small digit classifier trained here ("FID"), PSNR, and the classifier's label accuracy.
The teacher is trained once (seed 0); each seed changes the QAT data order, the calibration batches and
the sampling noises. Writes results.json, table.md and loss_curves.png to --out.

    python benchmarks/paper_table.py --device cuda        # the README's table (one H200: ~7 min)
    python benchmarks/paper_table.py --seeds 2 --teacher-steps 300 --qat-steps 40 --samples 128 \
        --sample-steps 10 --width 32 --layers 2 --batch 32 --classifier-steps 1000   # reduced CPU run
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fbqc
import fbqc.qat
from fbqc.passes import AnnotateLinears, Calibrate, InsertFakeQuant
from fbqc.qat.students.program import on_device

TOKENS, CAPTION = 4, 16           # "caption": 4 tokens × 16 channels per class (fixed random table)
METHODS = ("ptq", "direct", "integer", "fractional")


def digits(size: int):
    """(images in [-1, 1] as (N, 1, size, size), labels), train/test split 80/20 (fixed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


CAPTIONS = torch.randn(10, TOKENS, CAPTION, generator=torch.Generator().manual_seed(1234))


def make_teacher(a) -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    heads = 2
    return SanaTransformer2DModel(
        in_channels=1, out_channels=1, num_attention_heads=heads, attention_head_dim=a.width // heads,
        num_layers=a.layers, num_cross_attention_heads=heads, cross_attention_head_dim=a.width // heads,
        cross_attention_dim=a.width, caption_channels=CAPTION, sample_size=a.size, patch_size=1,
        interpolation_scale=1)


def noised(x0, labels, g):
    """Rectified flow: x_t = (1-σ)x0 + σε, target v = ε - x0, timestep σ·1000."""
    sigma = torch.rand(len(x0), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    inputs = {"hidden_states": (1 - s) * x0 + s * eps, "encoder_hidden_states": CAPTIONS[labels],
              "timestep": sigma * 1000.0}
    return inputs, eps - x0


def stream(x, y, batch: int, seed: int):
    """Factory of an endless deterministic stream of noised batches (the QAT / calibration data)."""
    def factory():
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(len(x), (batch,), generator=g)
            yield noised(x[idx], y[idx], g)[0]
    return factory


def train_teacher(a, x, y, log):
    model = make_teacher(a).to(a.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(a.teacher_steps):
        idx = torch.randint(len(x), (a.batch,), generator=g)
        inputs, target = noised(x[idx], y[idx], g)
        for grp in opt.param_groups:     # warm-up then cosine decay
            grp["lr"] = a.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / a.teacher_steps))
        pred = model(**{k: v.to(a.device) for k, v in inputs.items()}, return_dict=False)[0]
        loss = F.mse_loss(pred, target.to(a.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, a.teacher_steps // 10) == 0:
            log(f"  teacher step {step + 1}/{a.teacher_steps}: flow-matching loss {float(loss.detach()):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return model.eval().to("cpu")


@torch.no_grad()
def sample(fn, noises, labels, a):
    """Euler flow-matching sampler (diffusers FlowMatchEulerDiscreteScheduler), batch by batch."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = []
    for i in range(0, len(noises), a.batch):
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sch.set_timesteps(a.sample_steps)
        x = noises[i:i + a.batch].to(a.device)
        enc = CAPTIONS[labels[i:i + a.batch]].to(a.device)
        for t in sch.timesteps:
            v = fn(hidden_states=x, encoder_hidden_states=enc, timestep=t.expand(len(x)).to(a.device))[0]
            x = sch.step(v, t, x).prev_sample
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1, 1)


class Classifier(torch.nn.Module):
    """A small digit classifier; its 64-d penultimate layer is the feature space of our "FID"."""

    def __init__(self, size: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(a, train, test, log) -> Classifier:
    torch.manual_seed(0)
    clf = Classifier(a.size)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    x, y = train
    for _ in range(a.classifier_steps):
        idx = torch.randint(len(x), (128,), generator=g)
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)         # a little noise: robust features
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(test[0]).argmax(1) == test[1]).float().mean())
    log(f"  classifier: test accuracy {acc:.3f} on {len(test[0])} held-out digits")
    return clf


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to feature sets (float64, symmetric square roots)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def scores(clf, samples, reference, labels) -> dict[str, float]:
    with torch.no_grad():
        fs, fr = clf.body(samples).double().numpy(), clf.body(reference).double().numpy()
        acc = float((clf(samples).argmax(1) == labels).float().mean())
    mse = ((samples - reference) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return {"fd": frechet(fs, fr), "psnr": float((10 * torch.log10(4.0 / mse)).mean()), "label_acc": acc}


def quantize(teacher, method: str, seed: int, a, x, y, log):
    """W4A8 student of ``teacher`` (EXPORTED program): PTQ or QAT with a schedule, then calibrated."""
    student = fbqc.PassManager([AnnotateLinears(a.bits), InsertFakeQuant()])(teacher)
    rows = []
    if method != "ptq":
        r = fbqc.qat.train(student, teacher, stream(x, y, a.batch, 1000 + seed), schedule=method,
                           steps=a.qat_steps, bits=a.bits, lr=a.qat_lr, warmup=a.qat_steps // 20,
                           device=a.device, seed=seed, checkpoint_every=0, progress=False,
                           log=lambda s: None, report=False, data_note="noised digits")
        rows = r.log
    calib = Calibrate(stream(x, y, a.batch, 2000 + seed)(), a.calib_batches)
    program = fbqc.PassManager([calib])(student)
    return program, rows


def run(a, log=print) -> dict:
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a, log)
    finally:
        torch.set_num_threads(threads)


def _run(a, log) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = digits(a.size)
    log(f"digits: {len(train[0])} train / {len(test[0])} test at {a.size}×{a.size}; device {a.device}")
    clf = train_classifier(a, train, test, log)
    teacher_module = train_teacher(a, *train, log)
    ex = {k: v for k, v in stream(*train, a.batch, 0)().__next__().items()}
    teacher = fbqc.export(teacher_module, ex, source="paper_table teacher")
    n = a.batch * math.ceil(a.samples / a.batch)
    results = {"config": vars(a), "runs": {m: [] for m in a.methods}, "teacher": [], "curves": {}}
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(10_000 + seed)
        noises = torch.randn(n, 1, a.size, a.size, generator=g)
        labels = torch.arange(n) % 10
        ref = sample(on_device(teacher, a.device), noises, labels, a)
        teacher.graph_module.to("cpu")
        real = test[0][torch.randint(len(test[0]), (n,), generator=g)]
        results["teacher"].append(scores(clf, ref, real, labels))       # teacher vs real digits
        for m in a.methods:
            ts = time.perf_counter()
            program, rows = quantize(teacher, m, seed, a, *train, log)
            s = scores(clf, sample(on_device(program, a.device), noises, labels, a), ref, labels)
            program.graph_module.to("cpu")
            s["final_kd_loss"] = float(np.mean([r["loss"] for r in rows[-max(1, len(rows) // 10):]])) if rows else None
            s["seconds"] = round(time.perf_counter() - ts, 1)
            results["runs"][m].append(s)
            if seed == 0 and rows:
                results["curves"][m] = [r["loss"] for r in rows]
            log(f"  seed {seed} {m:<10} FD {s['fd']:8.3f}  PSNR {s['psnr']:6.2f} dB  acc {s['label_acc']:.3f}"
                f"  ({s['seconds']:.0f} s)")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["table"] = table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "table.md").write_text(results["table"] + "\n")
    plot_curves(results["curves"], a, out / "loss_curves.png")
    log(results["table"])
    return results


def _ms(xs, fmt: str = ".3f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{np.mean(xs):{fmt}} ± {np.std(xs):{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"


def table(results) -> str:
    a = results["config"]
    lines = [f"W{a['bits']:g}A8, tiny Sana ({a['layers']} blocks, width {a['width']}) on {a['size']}×{a['size']} "
             f"digits; {a['qat_steps']} QAT steps × batch {a['batch']}; {a['samples']} samples, "
             f"{a['sample_steps']} Euler steps; {a['seeds']} seed(s), mean ± std",
             "", "| method | FD vs teacher ↓ | PSNR vs teacher (dB) ↑ | label acc ↑ | final KD loss |",
             "|---|---|---|---|---|"]
    t = results["teacher"]
    lines.append(f"| float teacher (vs real digits) | {_ms([r['fd'] for r in t])} | — | "
                 f"{_ms([r['label_acc'] for r in t])} | — |")
    for m, runs in results["runs"].items():
        lines.append(f"| {m} | {_ms([r['fd'] for r in runs])} | {_ms([r['psnr'] for r in runs])} | "
                     f"{_ms([r['label_acc'] for r in runs])} | {_ms([r['final_kd_loss'] for r in runs], '.2e')} |")
    return "\n".join(lines)


def plot_curves(curves: dict, a, path: Path) -> None:
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for m, ys in curves.items():
        k = max(1, len(ys) // 40)
        sm = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(ys) + 1), sm, label=m)
    ax.set_yscale("log")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("KD loss (moving mean)")
    ax.set_title("QAT loss at equal compute (seed 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS,
                   help="comma list of ptq and schedules (direct, integer, simple, fractional, custom)")
    p.add_argument("--bits", type=float, default=4.0)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="teacher learning rate")
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--qat-steps", type=int, default=400)
    p.add_argument("--qat-lr", type=float, default=5e-4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/paper_table")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse())
