"""benchmarks/paper_archs.py: the four paper-table architectures (Sana, PixArt, SD3, FLUX) behind one interface.

What the benchmark does with each arch: build it, feed it rectified-flow batches through ``inputs``, read the
velocity through ``velocity``, train it, export it with fbqc and quantize it (AnnotateLinears + InsertFakeQuant).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fbqc
from fbqc.blocks import block_of
from fbqc.passes import AnnotateLinears, Calibrate, InsertFakeQuant

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["sana", "pixart", "sd3", "flux"]
SIZE, TOKENS, CAPTION = 8, 4, 16
#: the class "captions" of benchmarks/paper_table.py (same seed and shape)
CAPTIONS = torch.randn(10, TOKENS, CAPTION, generator=torch.Generator().manual_seed(1234))


def _module():
    spec = importlib.util.spec_from_file_location("paper_archs", ROOT / "benchmarks" / "paper_archs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pa = _module()


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # 2 shared cores: one thread is the fastest and steadiest
    yield
    torch.set_num_threads(n)


def _batch(n: int, seed: int = 0):
    """A rectified-flow batch of random 'images' (N, 1, 8, 8), class captions and σ."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1
    labels = torch.randint(10, (n,), generator=g)
    sigma = torch.rand(n, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * torch.randn(x0.shape, generator=g), CAPTIONS[labels], sigma


def _forward(arch, model, x_t, caption, sigma):
    return arch.velocity(model(**arch.inputs(x_t, caption, sigma), return_dict=False), SIZE)


# ---- registry, constructors, inputs ---------------------------------------------------------------------------

#: (class, describe(64, 4)) — the parameter counts of the module docstring's table (diffusers 0.42.1)
EXPECTED = {
    "sana": ("SanaTransformer2DModel", "Sana (4 blocks, width 64, 322,049 params)"),
    "pixart": ("PixArtTransformer2DModel", "PixArt (4 blocks, width 64, 318,145 params)"),
    "sd3": ("SD3Transformer2DModel", "SD3 (2 blocks, width 64, 309,441 params)"),
    "flux": ("FluxTransformer2DModel", "FLUX (1 double + 2 single blocks, width 64, 309,764 params)"),
}


def test_registry_classes_and_parameter_counts():
    assert list(pa.ARCHS) == NAMES
    for name, arch in pa.ARCHS.items():
        cls_name, line = EXPECTED[name]
        assert arch.name == name and arch.cls_name == cls_name
        assert arch.describe(64, 4) == line
        model = arch.make(64, 4, SIZE, CAPTION)
        assert type(model).__name__ == cls_name
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == arch.params(64, 4, SIZE, CAPTION)
    # comparable sizes: every arch within 5% of Sana's parameter count at the table's configuration
    sana = pa.ARCHS["sana"].params(64, 4)
    assert all(abs(a.params(64, 4) / sana - 1) < 0.05 for a in pa.ARCHS.values())


def test_make_is_deterministic_and_sana_is_paper_tables_teacher():
    from diffusers import SanaTransformer2DModel

    for arch in pa.ARCHS.values():
        a, b = arch.make(32, 2, SIZE, CAPTION).state_dict(), arch.make(32, 2, SIZE, CAPTION).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # benchmarks/paper_table.py make_teacher (before the four-arch rewrite), verbatim at width 64, 4 layers
    torch.manual_seed(0)
    heads, width = 2, 64
    teacher = SanaTransformer2DModel(
        in_channels=1, out_channels=1, num_attention_heads=heads, attention_head_dim=width // heads,
        num_layers=4, num_cross_attention_heads=heads, cross_attention_head_dim=width // heads,
        cross_attention_dim=width, caption_channels=CAPTION, sample_size=SIZE, patch_size=1,
        interpolation_scale=1).state_dict()
    ours = pa.ARCHS["sana"].make(64, 4, SIZE, CAPTION)
    assert dict(ours.config) == dict(SanaTransformer2DModel(**pa.ARCHS["sana"].config(64, 4, SIZE, CAPTION)).config)
    ours = ours.state_dict()
    assert ours.keys() == teacher.keys() and all(torch.equal(ours[k], teacher[k]) for k in ours)


def test_inputs_per_arch():
    x_t, caption, sigma = _batch(3)
    for name, arch in pa.ARCHS.items():
        kw = arch.inputs(x_t, caption, sigma)
        assert "return_dict" not in kw and "encoder_attention_mask" not in kw and "added_cond_kwargs" not in kw
        assert torch.equal(kw["encoder_hidden_states"], caption)
        if name == "flux":
            assert set(kw) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                               "img_ids", "txt_ids"}
            assert kw["hidden_states"].shape == (3, 16, 4)
            assert torch.equal(kw["timestep"], sigma)                        # FLUX multiplies by 1000 inside
            assert kw["img_ids"].shape == (16, 3) and kw["txt_ids"].shape == (TOKENS, 3)   # 2-D: no batch dim
            assert kw["img_ids"].dtype == torch.float32 and not kw["txt_ids"].any()
            assert kw["img_ids"][:, 0].eq(0).all()
            assert kw["img_ids"][5].tolist() == [0.0, 1.0, 1.0] and kw["img_ids"][7].tolist() == [0.0, 1.0, 3.0]
        else:
            assert torch.equal(kw["hidden_states"], x_t)
            assert torch.allclose(kw["timestep"], sigma * 1000.0) and kw["timestep"].dtype == torch.float32
            assert ("pooled_projections" in kw) == (name == "sd3")
        if "pooled_projections" in kw:
            assert torch.allclose(kw["pooled_projections"], caption.mean(1))


def test_flux_rope_axes_and_config():
    assert pa.rope_axes(32) == (8, 12, 12) and pa.rope_axes(16) == (4, 6, 6) and pa.rope_axes(64) == (16, 24, 24)
    for hd in range(6, 130, 2):
        axes = pa.rope_axes(hd)
        assert sum(axes) == hd and all(a > 0 and a % 2 == 0 for a in axes)
    cfg = pa.ARCHS["flux"].config(64, 4, SIZE, CAPTION)
    assert cfg["in_channels"] == 4 and cfg["guidance_embeds"] is False and tuple(cfg["axes_dims_rope"]) == (8, 12, 12)
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (1, 2)
    assert pa.ARCHS["sd3"].config(64, 4, SIZE, CAPTION)["num_layers"] == 2


def test_flux_pack_unpack_round_trip_against_an_independent_reshape():
    x = torch.randn(5, 1, SIZE, SIZE)
    tokens = pa.pack(x)
    # independent: token (i, j) of the 4×4 grid holds pixels (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
    ref = torch.empty(5, 16, 4)
    for i in range(SIZE // 2):
        for j in range(SIZE // 2):
            ref[:, i * (SIZE // 2) + j] = torch.stack(
                [x[:, 0, 2 * i, 2 * j], x[:, 0, 2 * i, 2 * j + 1], x[:, 0, 2 * i + 1, 2 * j], x[:, 0, 2 * i + 1, 2 * j + 1]], 1)
    assert torch.equal(tokens, ref)
    assert torch.equal(pa.unpack(tokens, SIZE), x)
    assert torch.equal(pa.unpack(ref, SIZE), x)
    # several channels (diffusers' FluxPipeline layout: channel-major inside a token)
    x3 = torch.randn(2, 3, 6, 6)
    assert torch.equal(pa.unpack(pa.pack(x3), 6, channels=3), x3)
    assert torch.equal(pa.pack(x3)[:, 0, 4:8], x3[:, 1, :2, :2].reshape(2, 4))


# ---- what the benchmark does with each arch ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_conditioning(name):
    arch = pa.ARCHS[name]
    model = arch.make(64, 4, SIZE, CAPTION).eval()
    # diffusers zero-initialises some output layers (adaLN-zero / proj_out): perturb so conditioning shows
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    x_t, caption, sigma = _batch(4)
    with torch.no_grad():
        v = _forward(arch, model, x_t, caption, sigma)
        assert v.shape == (4, 1, SIZE, SIZE) and torch.isfinite(v).all()
        other = CAPTIONS[(torch.arange(4) + 3) % 10]
        assert not torch.equal(caption, other)
        dc = (_forward(arch, model, x_t, other, sigma) - v).abs().amax()
        ds = (_forward(arch, model, x_t, caption, (sigma + 0.3) % 1) - v).abs().amax()
        dx = (_forward(arch, model, x_t.flip(-1), caption, sigma) - v).abs().amax()
    assert dc > 1e-4, f"{name}: the caption does not reach the output"
    assert ds > 1e-4, f"{name}: sigma does not reach the output"
    assert dx > 1e-4, f"{name}: the image does not reach the output"


@pytest.mark.parametrize("name", NAMES)
def test_export_and_fake_quant(name):
    arch = pa.ARCHS[name]
    model = arch.make(64, 4, SIZE, CAPTION).eval()
    x_t, caption, sigma = _batch(64)
    inputs = arch.inputs(x_t, caption, sigma)
    program = fbqc.export(model, inputs, source=f"paper_archs {name}")
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        assert torch.allclose(program(**inputs)[0], ref, atol=1e-5)
    student = fbqc.PassManager([AnnotateLinears(4.0), InsertFakeQuant()])(program)
    specs = student.specs()
    assert specs, f"{name}: nothing quantized"
    blocks = {n for n, _ in model.named_modules() if re.search(r"(^|\.)\w*blocks\.\d+$", n)}
    covered = {block_of(layer) for layer in specs}
    assert covered == blocks, f"{name}: blocks without a quantized linear: {sorted(blocks - covered)}"
    # W16A16 (min-max calibrated on the batch itself): the fake-quant program reproduces the float model
    hi = fbqc.PassManager([AnnotateLinears(16.0, act_bits=16, observer="minmax"), InsertFakeQuant(),
                           Calibrate([inputs], 1)])(program)
    with torch.no_grad():
        out = hi(**inputs)[0]
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 2e-3 * ref.abs().max() + 1e-4, f"{name}: W16A16 differs from float"


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(d.target)


@pytest.mark.parametrize("name", NAMES)
def test_short_training_lowers_flow_matching_loss(name):
    pytest.importorskip("sklearn")
    x, y = _digits()
    arch = pa.ARCHS[name]
    model = arch.make(64, 4, SIZE, CAPTION).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        idx = torch.randint(len(x), (32,), generator=g)
        sigma = torch.rand(32, generator=g)
        eps = torch.randn(32, 1, SIZE, SIZE, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x[idx] + s * eps
        loss = F.mse_loss(_forward(arch, model, x_t, CAPTIONS[y[idx]], sigma), eps - x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


#: aten ops without a deterministic CUDA kernel (or with one only under some conditions)
NONDETERMINISTIC_CUDA = re.compile(
    r"index_add|scatter|index_put|index_reduce|put_|embedding_bag|embedding_dense_backward|histc|bincount|"
    r"upsample|grid_sampler|adaptive_avg_pool|adaptive_max_pool|avg_pool3d|max_pool3d|reflection_pad|"
    r"replication_pad|nll_loss2d|ctc_loss|kthvalue|median|cumsum")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_under_deterministic_algorithms(name):
    arch = pa.ARCHS[name]
    model = arch.make(32, 2, SIZE, CAPTION).train()
    x_t, caption, sigma = _batch(8)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _Ops() as rec:
            loss = _forward(arch, model, x_t, caption, sigma).square().mean()
            loss.backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert sum(p.grad is not None for p in model.parameters()) > 0.9 * len(list(model.parameters()))
    assert torch.isfinite(loss)
    risky = sorted(op for op in rec.ops if NONDETERMINISTIC_CUDA.search(op))
    assert not risky, f"{name}: ops without a deterministic CUDA kernel: {risky}"
