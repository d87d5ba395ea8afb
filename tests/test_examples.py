"""The example model files (examples/*.py): contract, determinism, export fidelity, checkpoints.

Loads the files by path (no dependency on the fbqc package). Full presets are ``slow`` (conftest skips them
unless FBQC_FULL=1): Sana-600M / PixArt-Sigma build real weights, run a forward and export (minutes on 2 CPU
cores); SD3.5-Medium builds 9 GB of real weights and exports; FLUX.1-schnell exports on the meta device.
"""
from __future__ import annotations

import gc
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARCHS = ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"]
CONFIGS = ["sana_600m.json", "sana_1600m.json", "pixart_sigma.json", "sd35_medium.json", "flux_schnell.json"]
BLOCK_WEIGHT = re.compile(r"(^|\.)\w*blocks\.\d+\..*weight$")
LINEAR, CONV2D = torch.ops.aten.linear.default, torch.ops.aten.conv2d.default

_modules: dict = {}
_exported: dict = {}


def load(arch: str):
    if arch not in _modules:
        if str(EXAMPLES) not in sys.path:   # as fbqc's frontend and `python x.py` do: the files import _common
            sys.path.insert(0, str(EXAMPLES))
        spec = importlib.util.spec_from_file_location(f"example_{arch}", EXAMPLES / f"{arch}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[arch] = module
    return _modules[arch]


def exported(arch: str):
    """(eager model, example inputs, ExportedProgram) of the tiny preset, cached per session."""
    if arch not in _exported:
        mf = load(arch)
        m, inputs = mf.model(), mf.example_inputs()
        ep = torch.export.export(m, (), {**inputs, "return_dict": False}, strict=False)
        _exported[arch] = (m, inputs, ep)
    return _exported[arch]


def run(m, inputs):
    with torch.no_grad():
        return m(**inputs, return_dict=False)[0]


def shapes(d: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in d.items()}


def weight_names(gm: torch.fx.GraphModule, op) -> list[str]:
    return [n.args[1].target for n in gm.graph.nodes
            if n.op == "call_function" and n.target == op and n.args[1].op == "get_attr"]


def test_configs_are_in_the_repo():
    for name in CONFIGS:
        assert (EXAMPLES / "configs" / name).is_file(), name


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_builds_deterministic(arch):
    mf = load(arch)
    m = mf.model()
    assert isinstance(m, torch.nn.Module) and not m.training
    params = list(m.parameters())
    assert all(p.dtype == torch.float32 and not p.is_meta for p in params)
    assert sum(p.numel() for p in params) == mf.TINY_PARAMS
    assert isinstance(mf.FULL_PARAMS, int) and mf.FULL_PARAMS > 100 * mf.TINY_PARAMS
    assert not [n for n, p in m.named_parameters() if not p.any()], "an all-zero parameter"
    assert set(inspect.signature(mf.model).parameters) == {"preset", "checkpoint"}
    m2 = mf.model()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert mf.__doc__ and "tiny" in mf.__doc__ and "full" in mf.__doc__


@pytest.mark.parametrize("arch", ARCHS)
def test_example_inputs_match_forward(arch):
    mf = load(arch)
    m, inputs = mf.model(), mf.example_inputs()
    params = inspect.signature(m.forward).parameters
    assert "return_dict" not in inputs
    assert set(inputs) <= set(params), set(inputs) - set(params)
    required = {n for n, p in params.items() if p.default is p.empty and n != "self"}
    assert required <= set(inputs)
    assert all(isinstance(v, torch.Tensor) for v in inputs.values())
    assert inputs["hidden_states"].shape[0] == 1 and inputs["encoder_hidden_states"].shape[0] == 1
    again = mf.example_inputs()
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_eager(arch):
    m, inputs, ep = exported(arch)
    out = run(m, inputs)
    assert torch.isfinite(out).all() and out.std() > 1e-3
    moved = dict(inputs, hidden_states=inputs["hidden_states"] + 0.5 * torch.randn_like(inputs["hidden_states"]))
    assert (run(m, moved) - out).abs().max() > 1e-3, "output does not depend on the latent"
    with torch.no_grad():
        got = ep.module()(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_has_block_linears(arch):
    _, _, ep = exported(arch)
    gm = ep.module()
    linears = [w for w in weight_names(gm, LINEAR) if BLOCK_WEIGHT.search(w)]
    assert any(w.startswith("transformer_blocks.0.") for w in linears)
    assert any(w.startswith("transformer_blocks.1." if arch != "flux_schnell" else "single_transformer_blocks.0.")
               for w in linears)
    assert len(linears) >= 12
    if arch == "sana":                                # Mix-FFN: 1x1 convs inside the blocks
        pointwise = [w for w in weight_names(gm, CONV2D)
                     if ".ff." in w and BLOCK_WEIGHT.search(w) and gm.get_parameter(w).shape[-2:] == (1, 1)]
        assert {w.split(".ff.")[1] for w in pointwise} == {"conv_inverted.weight", "conv_point.weight"}


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_data_stream(arch):
    mf = load(arch)
    example = mf.example_inputs()
    it = mf.calibration_data()
    items = [next(it) for _ in range(6)]
    assert all(shapes(s) == shapes(example) for s in items)
    for key in ("hidden_states", "encoder_hidden_states", "timestep"):
        assert len({s[key].flatten()[:8].tolist().__repr__() for s in items}) == len(items), key
    ts = torch.cat([s["timestep"].double() for s in items])
    hi = 1.0 if arch == "flux_schnell" else 1000.0
    assert (ts >= 0).all() and (ts <= hi).all() and ts.max() > 0.05 * hi
    first = next(mf.calibration_data())
    assert all(torch.equal(first[k], items[0][k]) for k in first), "not deterministic"
    train = next(iter(mf.training_data()))
    assert shapes(train) == shapes(example) and not torch.equal(train["hidden_states"], first["hidden_states"])
    if arch != "flux_schnell":                        # a noised structured latent, roughly unit variance
        assert 0.5 < float(torch.stack([s["hidden_states"].std() for s in items]).mean()) < 2.0


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_preset(arch):
    mf = load(arch)
    for fn in (mf.model, mf.example_inputs, mf.calibration_data):
        with pytest.raises(ValueError, match=r"'nope'.*tiny"):
            fn(preset="nope")


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_checkpoint(arch, tmp_path):
    mf = load(arch)
    missing = tmp_path / "no_such_checkpoint"
    for fn in (mf.model, mf.example_inputs):
        with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
            fn(checkpoint=missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        mf.model(checkpoint=tmp_path)                 # exists, but holds no diffusers config


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(arch, tmp_path):
    mf = load(arch)
    m = mf.model()
    m.save_pretrained(tmp_path / "transformer")
    loaded = mf.model(checkpoint=tmp_path)
    assert type(loaded) is type(m) and not loaded.training
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    inputs = mf.example_inputs(checkpoint=tmp_path)
    assert shapes(inputs) == shapes(mf.example_inputs())
    assert shapes(next(mf.calibration_data(checkpoint=tmp_path))) == shapes(inputs)
    # same weights; loaded (safetensors) buffers may take other SIMD paths: agreement to float rounding
    torch.testing.assert_close(run(loaded, inputs), run(m, inputs), rtol=1e-5, atol=1e-5)
    flat = mf.model(checkpoint=tmp_path / "transformer")   # a transformer folder itself works too
    assert torch.equal(next(iter(flat.state_dict().values())), next(iter(sd.values())))


@pytest.mark.parametrize("arch,preset", [("flux_schnell", "full"), ("sd35_medium", "full-meta")])
def test_meta_preset_is_cheap(arch, preset):
    """Meta presets build in well under a second and give meta example inputs (meta weights need them)."""
    mf = load(arch)
    m = mf.model(preset=preset)
    assert all(p.is_meta for p in m.parameters()) and sum(p.numel() for p in m.parameters()) == mf.FULL_PARAMS
    inputs = mf.example_inputs(preset=preset)
    assert all(v.is_meta for v in inputs.values())
    assert set(inputs) <= set(inspect.signature(m.forward).parameters)
    real = next(mf.calibration_data(preset=preset))
    assert shapes(real) == shapes(inputs) and not any(v.is_meta for v in real.values())


# ---- full presets (slow) -------------------------------------------------------------------------
FULL = [("sana", "full", True), ("sana", "1600m", False), ("pixart_sigma", "full", True),
        ("sd35_medium", "full", False), ("sd35_medium", "full-meta", False), ("flux_schnell", "full", False)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,preset,forward", FULL, ids=[f"{a}-{p}" for a, p, _ in FULL])
def test_full_preset_exports(arch, preset, forward):
    mf = load(arch)
    m = mf.model(preset=preset)
    n = sum(p.numel() for p in m.parameters())
    if preset == "full" or preset == "full-meta":
        assert n == mf.FULL_PARAMS
    on_meta = any(p.is_meta for p in m.parameters())
    assert on_meta == (preset == "full-meta" or arch == "flux_schnell")
    inputs = mf.example_inputs(preset=preset)
    assert shapes(next(mf.calibration_data(preset=preset))) == shapes(inputs)
    tokens = {"sana": 1024, "pixart_sigma": 1024, "sd35_medium": 1024, "flux_schnell": 1024}[arch]
    hs = inputs["hidden_states"]
    assert (hs.shape[1] if hs.ndim == 3 else hs.shape[-1] * hs.shape[-2] // m.config.patch_size ** 2) == tokens
    assert all(v.is_meta == on_meta for v in inputs.values())   # meta weights export only with meta inputs
    ep = torch.export.export(m, (), {**inputs, "return_dict": False}, strict=False)
    gm = ep.module()
    assert len([w for w in weight_names(gm, LINEAR) if BLOCK_WEIGHT.search(w)]) > 100
    if forward:
        out = run(m, inputs)
        assert torch.isfinite(out).all() and out.std() > 1e-3
        with torch.no_grad():
            torch.testing.assert_close(gm(**inputs, return_dict=False)[0], out, rtol=1e-4, atol=1e-4)
    del m, ep, gm
    gc.collect()
