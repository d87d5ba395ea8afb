"""The data, teacher training, sampler and feature network of ``benchmarks/paper_table.py``.

- **Data**: scikit-learn's 8×8 digits in [-1, 1], class-conditional through a fixed random "caption"
  table (10 classes × :data:`TOKENS` tokens × :data:`CAPTION` channels); rectified flow: x_t = (1-σ)x0 + σε,
  target v = ε - x0. Each architecture of :mod:`paper_archs` maps (x_t, caption, σ) to its own inputs.
- **Teacher**: trained here with AdamW, warm-up then cosine decay, a fixed data order; on the GPU with
  deterministic algorithms (:func:`deterministic`), so the same seed gives the same teacher.
- **Sampler**: diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 1).
- **Features**: a small digit classifier trained here; its 64-d penultimate layer on uint8 RGB images
  (what ``fbqc eval``'s FID hands a feature network) is the feature space of the table's FID.
"""
from __future__ import annotations

import math
import os
import time
import warnings

import torch
import torch.nn.functional as F

TOKENS, CAPTION = 4, 16
CAPTIONS = torch.randn(10, TOKENS, CAPTION, generator=torch.Generator().manual_seed(1234))


def deterministic(device: str) -> list[str]:
    """Deterministic algorithms as far as torch allows; returns what still may vary (stated in the results)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call
    torch.use_deterministic_algorithms(True, warn_only=True)      # an op without one warns (recorded)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_cudnn_sdp(False)      # cuDNN attention's backward has no deterministic mode
    varies = []
    if device.startswith("cuda") and os.environ["CUBLAS_WORKSPACE_CONFIG"] not in (":4096:8", ":16:8"):
        varies.append(f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']} (cuBLAS may not be "
                      f"deterministic)")
    return varies


def nondeterministic_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The distinct 'does not have a deterministic implementation' warnings among ``caught``."""
    return sorted({str(w.message).split("\n")[0] for w in caught if "deterministic" in str(w.message)})


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


def noised(arch, x0, labels, g):
    """Rectified flow: (the architecture's inputs at x_t = (1-σ)x0 + σε, target v = ε - x0)."""
    sigma = torch.rand(len(x0), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    return arch.inputs((1 - s) * x0 + s * eps, CAPTIONS[labels], sigma), eps - x0


def stream(arch, x, y, batch: int, seed: int):
    """Factory of an endless deterministic stream of noised batches (the QAT / calibration data)."""
    def factory():
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(len(x), (batch,), generator=g)
            yield noised(arch, x[idx], y[idx], g)[0]
    return factory


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def train_teacher(arch, a, x, y, log) -> tuple[torch.nn.Module, list[float]]:
    """(the trained float teacher on CPU in eval mode, its loss per step)."""
    model = arch.make(a.width, a.layers, a.size, CAPTION).to(a.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0, losses = time.perf_counter(), []
    for step in range(a.teacher_steps):
        idx = torch.randint(len(x), (a.batch,), generator=g)
        inputs, target = noised(arch, x[idx], y[idx], g)
        for grp in opt.param_groups:     # warm-up then cosine decay
            grp["lr"] = a.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / a.teacher_steps))
        pred = arch.velocity(model(**_to(inputs, a.device), return_dict=False)[0], a.size)
        loss = F.mse_loss(pred, target.to(a.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        if (step + 1) % max(1, a.teacher_steps // 5) == 0:
            log(f"  {arch.name} teacher step {step + 1}/{a.teacher_steps}: flow-matching loss "
                f"{float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval().to("cpu"), [float(v) for v in torch.stack(losses).cpu()] if losses else []


@torch.no_grad()
def sample(fn, arch, noises, labels, a) -> torch.Tensor:
    """Euler flow-matching sampler (diffusers FlowMatchEulerDiscreteScheduler), batch by batch, in [-1, 1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = []
    for i in range(0, len(noises), a.batch):
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sch.set_timesteps(a.sample_steps)
        x = noises[i:i + a.batch].to(a.device)
        enc = CAPTIONS[labels[i:i + a.batch]].to(a.device)
        for t in sch.timesteps:
            sigma = (t / 1000.0).to(torch.float32).expand(len(x)).to(a.device)
            v = arch.velocity(fn(**arch.inputs(x, enc, sigma))[0], a.size)
            x = sch.step(v, t, x).prev_sample
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] → (N, 3, H, W) uint8, what a PNG of the sample holds (``fbqc eval``'s input)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


class Classifier(torch.nn.Module):
    """A small digit classifier; its 64-d penultimate layer is the feature space of the table's FID."""

    def __init__(self, size: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


class DigitFeatures(torch.nn.Module):
    """uint8 RGB images (N, 3, H, W) → the classifier's 64-d features: a feature network for
    ``fbqc.image_metrics`` FID (torchmetrics hands it uint8 images)."""

    def __init__(self, clf: Classifier):
        super().__init__()
        self.clf = clf

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        gray = imgs[:, :1].to(torch.float32) / 127.5 - 1.0
        return self.clf.body(gray).double()


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
    log(f"classifier: test accuracy {acc:.3f} on {len(test[0])} held-out digits")
    return clf
