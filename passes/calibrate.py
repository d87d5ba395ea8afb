"""Calibrate: activation ranges from sample inputs, written into the fake-quant scale buffers."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from fbqc.data import take
from fbqc.hooks import hooked
from fbqc.memory import available_bytes
from fbqc.pass_infra import Pass, PassError, PassResult
from fbqc.program import Program
from fbqc.quant_math import act_qparams
from fbqc.spec import LAYER, QUANT, ROLE
from fbqc.stage import Stage

fbqc = torch.ops.fbqc


class RangeObserver:
    """Running min/max and moments of everything that flows through one activation quantizer."""

    def __init__(self, name: str):
        self.name = name
        self.lo, self.hi = math.inf, -math.inf
        self.total = self.total_sq = 0.0
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise PassError("Calibrate", f"activation {self.name} is NaN or Inf on a calibration sample")
        lo, hi = torch.aminmax(x)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        self.total += float(x.sum(dtype=torch.float64))
        self.total_sq += float((x * x).sum(dtype=torch.float64))
        self.count += x.numel()
        return x

    def range(self, observer: str) -> tuple[float, float]:
        if self.count == 0:
            raise PassError("Calibrate", f"activation {self.name} was never reached by the samples")
        if observer == "minmax":
            return self.lo, self.hi
        mean = self.total / self.count
        std = math.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))
        return max(self.lo, mean - 3 * std), min(self.hi, mean + 3 * std)


def _freeze_weights(program: Program) -> None:
    """Replace each fake_quant_weight by its value, computed once instead of on every sample — where
    memory allows: the values are a second fp32 copy of the quantized weights (SD3.5-Medium: 8.9 GB),
    so beyond a quarter of the available memory each sample computes them again (same numbers)."""
    nodes = [n for n in program.graph.nodes if n.target == fbqc.fake_quant_weight.default]
    need = sum(program.attr(n.args[0]).numel() * 4 for n in nodes)
    avail = available_bytes()
    if avail is not None and need > avail // 4:
        return
    for n in nodes:
        value = n.target(*[program.attr(a) if hasattr(a, "op") else a for a in n.args])
        n.replace_all_uses_with(program.add_constant(f"{n.name}_value", value, before=n))
        program.graph.erase_node(n)
    program.graph.eliminate_dead_code()
    program.graph_module.recompile()


class Calibrate(Pass):
    """Observe activation ranges on N samples (min/max or 3-sigma) and set scales and zero points.

    Runs a shadow copy of the graph in which each fake_quant_act is replaced by an observer
    (pass-through) and each fake-quantized weight by its value, computed once.
    """

    requires = Stage.FAKE_QUANT
    produces = Stage.FAKE_QUANT

    def __init__(self, data: Iterable[dict[str, Any]], num_samples: int = 100, *,
                 observer: str | None = None, progress: bool = False):
        if num_samples < 1:
            raise ValueError(f"--calib-samples must be ≥ 1, got {num_samples}")
        if observer not in (None, "minmax", "3sigma"):
            raise ValueError(f"observer must be 'minmax' or '3sigma', got {observer!r}")
        self.data, self.num_samples, self.observer, self.progress = data, num_samples, observer, progress

    def __repr__(self) -> str:
        return f"Calibrate(num_samples={self.num_samples}, observer={self.observer})"

    def run(self, program: Program) -> PassResult:
        observers = {n.name: RangeObserver(f"{n.meta[LAYER]} ({n.meta[ROLE]})")
                     for n in program.graph.nodes if n.target == fbqc.fake_quant_act.default}
        shadow, _ = hooked(program, lambda n: n.name in observers,
                           lambda name, _target, x, *_: observers[name](x))
        with torch.no_grad():
            _freeze_weights(shadow)
            samples = take(self.data, self.num_samples, program.example_inputs, "calibration data")
            consumed = 0
            for sample in tqdm(samples, total=self.num_samples, desc="calibrate", unit="sample",
                               disable=not self.progress, leave=False):
                shadow(**sample)
                consumed += 1

        by_name = {n.name: n for n in program.graph.nodes}
        used = {}
        for name, obs in observers.items():
            node = by_name[name]
            layer_node = node.args[0] if node.meta[ROLE] == "output" else next(iter(node.users))
            spec = layer_node.meta[QUANT]
            act = spec.output if node.meta[ROLE] == "output" else spec.input
            lo, hi = obs.range(self.observer or act.observer)
            bits = float(program.attr(node.args[3]))     # FAKE_QUANT: the buffer owns the bit-width
            scale, zp = act_qparams(lo, hi, bits)
            for a, v in zip(node.args[1:3], (scale, float(zp))):
                program.graph_module.register_buffer(a.target, torch.tensor(v, dtype=torch.float32))
            used[obs.name] = {"min": obs.lo, "max": obs.hi, "lo": lo, "hi": hi, "scale": scale, "zp": zp}
        program.info["calibration"] = {"samples": consumed, "requested": self.num_samples,   # data may run out
                                       "observer": self.observer or "per spec"}
        program.info["act_ranges"] = used
        return PassResult(program, True)
