"""Rank-0 loading (fbqc.qat.parallel.dist.load_from_rank0): under `fbqc train --nproc N` only rank 0 builds the
model with its weights; the other ranks build it on the meta device and receive rank 0's values once sharded
(FSDP2) or placed (DDP), student and teacher alike, the buffers no state dict holds included. Two gloo
processes on the CPU: the same losses and final state as when every rank builds the weights itself; each
rank's host memory (`summary["host_ram"]`) shows rank 1 never holds a copy; the FLUX command's code path
(a diffusers checkpoint, FSDP2, --checkpoint-blocks) on a tiny FLUX."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FLUX = ROOT / "examples" / "flux_schnell.py"
MIB = 2 ** 20

#: a model whose weights are mostly 16 frozen, unquantized tables outside the blocks (16 MiB each: one at a
#: time is what a receiving rank holds whole while it is broadcast), so a copy of the weights is plain in the
#: host memory while a step stays cheap; a non-persistent buffer (no state dict holds it) and a persistent one
BIG = '''
import torch

ROWS, D, T = 4096, 1024, 16
WEIGHT_BYTES = 4 * (T * ROWS * D + 8 * D + D + 2 * (D * 64 + 64 + 64 * D + D) + D * 8 + 8)


class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tables = torch.nn.ModuleList([torch.nn.Embedding(ROWS, D) for _ in range(T)])
        self.embed = torch.nn.Linear(8, D)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(D, 64), torch.nn.GELU(), torch.nn.Linear(64, D)) for _ in range(2)])
        self.proj_out = torch.nn.Linear(D, 8)
        self.register_buffer("gain", torch.rand(D, generator=g) + 0.5, persistent=False)
        self.register_buffer("shift", torch.randn(8, generator=g) * 0.1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)

    def forward(self, x, ids, scale):
        h = (self.embed(x) + sum(t(ids) for t in self.tables)) * self.gain
        for b in self.blocks:
            h = h + b(h)
        return (self.proj_out(h) + self.shift) * scale


def model():
    return Big().eval()


def _sample(g):
    return {"x": torch.randn(4, 8, generator=g), "ids": torch.randint(0, ROWS, (4,), generator=g),
            "scale": torch.rand(4, 1, generator=g) + 0.5}


def example_inputs():
    return _sample(torch.Generator().manual_seed(1))


def training_data():
    g = torch.Generator().manual_seed(2)
    return [_sample(g) for _ in range(4)]
'''
#: the same model from a file that refuses the meta device: rank 1 then builds it with weights (the fallback)
REAL_ONLY = BIG.replace("def model():\n", "def model():\n    if torch.get_default_device().type == 'meta':\n"
                                          "        raise RuntimeError('this file builds with weights only')\n")
#: small, with a non-persistent buffer, for DDP
SMALL = BIG.replace("ROWS, D, T = 4096, 1024, 16", "ROWS, D, T = 16, 32, 2")


def train(*args: str, cwd: Path) -> tuple[dict, str]:
    """`fbqc train …` as a user runs it: (its --json summary, its stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "fbqc.cli", "train", *args, "-q", "--json"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout), p.stderr


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def first_step_loss(model: torch.nn.Module, samples: list[dict], bits: float = 8) -> float:
    """Step 1's logged loss computed here, in one process, from rank 0's weights: the mean over the
    processes (one sample each) of MSE(student at ``bits``, float teacher)."""
    from fbqc.frontend import _entry
    from fbqc.passes import AnnotateLinears
    from fbqc.qat.students.modules import annotate_modules, quantize_modules

    def out(m, x):
        y = _entry(m)(**x)
        return y[0] if isinstance(y, tuple) else y        # diffusers: (sample,)

    teacher = copy.deepcopy(model)
    quantize_modules(model, annotate_modules(model, AnnotateLinears(bits=bits)))
    with torch.no_grad():
        mse = [torch.nn.functional.mse_loss(out(model, x), out(teacher, x)) for x in samples]
    return float(sum(mse) / len(mse))


def test_fsdp_rank1_builds_on_meta_same_run_no_host_copy(tmp_path):
    """FSDP2 over 2 gloo processes: rank 1 builds on meta and receives its shards (and the buffers) from
    rank 0 — losses and the trained state bit-identical to the run whose rank 1 builds the weights itself;
    host memory: rank 1 never holds a copy of the weights, rank 0 holds the one it loaded."""
    (tmp_path / "big.py").write_text(BIG)
    (tmp_path / "big_real.py").write_text(REAL_ONLY)
    weight = _module(tmp_path / "big.py").WEIGHT_BYTES / MIB                      # 256.6 MiB of fp32
    flags = ["--nproc", "2", "--strategy", "fsdp", "--schedule", "4:1", "--steps", "2", "--lr", "1e-4"]
    meta, _ = train("big.py", "-o", "meta", *flags, cwd=tmp_path)
    real, err = train("big_real.py", "-o", "real", *flags, cwd=tmp_path)
    assert "model() failed on the meta device" in err and "rank 1 builds it with weights" in err

    assert losses(tmp_path / "meta") == losses(tmp_path / "real")                   # bit-identical
    a, b = (torch.load(tmp_path / r / "student.pt") for r in ("meta", "real"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["built_on_meta"] for r in meta["host_ram"]] == [False, True]
    assert [r["built_on_meta"] for r in real["host_ram"]] == [False, False]

    def grew(row, at):                                    # MiB since just before the model was built
        return row[at] - row["rss_before_model_mib"]

    r0, r1 = meta["host_ram"]
    print(f"\nweights {weight:.1f} MiB; host RAM growth (MiB) model built / set-up peak / run peak: "
          + "; ".join(f"{name} rank {r['rank']}: {grew(r, 'rss_after_model_mib'):.0f} / {grew(r, 'peak_mib'):.0f}"
                      f" / {grew(r, 'run_peak_mib'):.0f}" for name, run in (("meta", meta), ("real", real))
                      for r in run["host_ram"]))
    # built: rank 0 its copy of the weights; rank 1 nothing but torch's meta-device code (~75 MiB of modules)
    assert grew(r0, "rss_after_model_mib") >= 0.95 * weight
    assert grew(r1, "rss_after_model_mib") <= 0.4 * weight
    assert grew(real["host_ram"][1], "rss_after_model_mib") >= 0.95 * weight     # the fallback: a copy
    # set up (student and teacher sharded, loaded), on top of what was built: both ranks their halves of
    # student and teacher (one weight's worth) — rank 1 receives no full copy, one 16 MiB tensor at a time
    setup0, setup1 = (r["peak_mib"] - r["rss_after_model_mib"] for r in (r0, r1))
    assert setup0 >= 0.95 * weight and setup1 >= 0.95 * weight
    assert setup1 <= setup0 + 0.25 * weight
    assert grew(r0, "peak_mib") - grew(r1, "peak_mib") >= 0.6 * weight       # rank 0: the loaded copy besides
