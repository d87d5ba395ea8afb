"""Calibration ranges against an independent computation, and bad data/weights."""
from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch

import fbqc
from conftest import example
from fbqc import PassManager
from fbqc.pass_infra import PassError
from fbqc.passes import AnnotateLinears, Calibrate, Fold, InsertFakeQuant

LAYER = "transformer_blocks.0.attn1.to_q"   # its input depends on float ops only (patch embed, norm)


def _module(name):
    spec = importlib.util.spec_from_file_location(name, example(name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected(observer, xs):
    x = np.concatenate([a.reshape(-1) for a in xs]).astype(np.float64)
    lo, hi = x.min(), x.max()
    if observer == "3sigma":
        lo, hi = max(lo, x.mean() - 3 * x.std()), min(hi, x.mean() + 3 * x.std())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zp = int(np.clip(np.rint(-lo / np.float64(scale)), 0, 255))
    return scale, zp


@pytest.mark.parametrize("observer", ["minmax", "3sigma"])
def test_input_ranges_match_eager_model_hooks(observer):
    mod = _module("sana")
    n = 5
    program, _ = fbqc.export_model_file(example("sana"))
    data = list(itertools.islice(mod.calibration_data(), n))
    fq = PassManager([AnnotateLinears(observer=observer), InsertFakeQuant(), Calibrate(data, n)])(program)

    # independent: forward hooks on the eager diffusers module see the same layer input
    eager = mod.model()
    seen = []
    layer = eager.get_submodule(LAYER)
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().numpy()))
    with torch.no_grad():
        for sample in data:
            eager(**sample, return_dict=False)
    handle.remove()
    assert len(seen) == n
    scale, zp = _expected(observer, seen)
    name = "fbqc_" + LAYER.replace(".", "_")
    got_scale = float(getattr(fq.graph_module, f"{name}_in_scale"))
    got_zp = int(getattr(fq.graph_module, f"{name}_in_zero_point"))
    assert got_scale == pytest.approx(float(scale), rel=1e-5)
    assert abs(got_zp - zp) <= 1
    assert fq.info["calibration"]["samples"] == n


def test_calibration_data_with_nan_or_wrong_shape_is_named():
    program, _ = fbqc.export_model_file(example("sana"))
    good = program.example_inputs
    bad = {**good, "hidden_states": good["hidden_states"].clone().fill_(float("nan"))}
    pm = PassManager([AnnotateLinears(), InsertFakeQuant(), Calibrate([bad], 1)])
    with pytest.raises(ValueError, match="calibration data sample 0: input 'hidden_states' contains NaN"):
        pm(program)
    wrong = {**good, "hidden_states": good["hidden_states"][..., :4]}
    with pytest.raises(ValueError, match="shapes are static"):
        PassManager([AnnotateLinears(), InsertFakeQuant(), Calibrate([wrong], 1)])(program)


def test_nan_weight_is_named_by_fold():
    program, _ = fbqc.export_model_file(example("sana"))
    fq = PassManager([AnnotateLinears(), InsertFakeQuant(), Calibrate([program.example_inputs], 1)])(program)
    w = fq.graph_module.get_parameter(f"{LAYER}.weight")
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] = float("inf")
        with pytest.raises(PassError, match=f"parameter {LAYER}.weight of layer {LAYER} contains NaN or Inf"):
            Fold()(fq)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_data_free_default_is_stated_and_shaped_like_examples():
    from fbqc.data import DATA_FREE_NOTE, samples_around

    ex = {"x": torch.randn(2, 8) * 3 + 1, "t": torch.tensor([5.0]), "ids": torch.arange(4)}
    a, b = itertools.islice(samples_around(ex), 2)
    assert a["x"].shape == ex["x"].shape and not torch.equal(a["x"], b["x"])
    assert torch.equal(a["t"], ex["t"]) and torch.equal(a["ids"], ex["ids"])
    assert "data-free" in DATA_FREE_NOTE


def test_weights_not_frozen_when_memory_is_short_give_the_same_ranges(monkeypatch):
    """Calibrate computes the fake-quantized weights once (a second fp32 copy of them) only where a
    quarter of the available memory holds them; otherwise on every sample — with the same result."""
    import fbqc.passes.calibrate as cal

    program, _ = fbqc.export_model_file(example("sana"))
    data = list(itertools.islice(_module("sana").calibration_data(), 3))

    def ranges(avail):
        monkeypatch.setattr(cal, "available_bytes", lambda: avail)
        frozen = []
        real = cal.Program.add_constant
        monkeypatch.setattr(cal.Program, "add_constant",
                            lambda self, name, *a, **k: (frozen.append(name), real(self, name, *a, **k))[1])
        fq = PassManager([AnnotateLinears(), InsertFakeQuant(), Calibrate(data, 3)])(program)
        monkeypatch.undo()
        return fq.info["act_ranges"], [n for n in frozen if n.endswith("_value")]

    plenty, frozen = ranges(1 << 40)
    short, not_frozen = ranges(1024)
    assert len(frozen) == 20 and not_frozen == []
    assert short == plenty
