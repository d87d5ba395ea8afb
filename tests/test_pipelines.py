"""``pipeline()`` / ``generation_defaults()`` of the example model files: offline, deterministic, and at every
denoising step the transformer receives (per classifier-free-guidance half) exactly the keys, shapes and dtypes
of the file's ``example_inputs``, so captured data can calibrate / train the exported program."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from fbqc.frontend import load_model_file

from conftest import ARCHS, example

PROMPT = "A small red fox sitting in the snow under a bright moon"
_files: dict = {}


def mf(arch: str):
    if arch not in _files:
        _files[arch] = load_model_file(example(arch)).module
    return _files[arch]


def run(pipe, defaults, *, seed=0, output_type="np"):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type=output_type, **defaults).images


def record_calls(pipe) -> list[dict]:
    """Every transformer call's arguments, positional ones bound by name (as ``fbqc capture`` does)."""
    calls = []
    sig = inspect.signature(pipe.transformer.forward)

    def hook(module, args, kwargs, out):
        calls.append(dict(sig.bind(*args, **kwargs).arguments))
    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def halves(call: dict, example: dict, branches: int) -> list[dict]:
    """The call split into its guidance branches: tensors with a batch dimension in ``example`` are chunked."""
    out = [{} for _ in range(branches)]
    for k, ref in example.items():
        v = call[k]
        batched = ref.dim() > 0 and ref.shape[0] == 1 and (k != "timestep" or v.shape[0] == branches)
        parts = v.chunk(branches) if batched and branches > 1 else [v] * branches
        for h, p in zip(out, parts):
            h[k] = p
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_pipeline(arch):
    m = mf(arch)
    pipe = m.pipeline()
    ref = m.model()
    sd, sd2 = ref.state_dict(), pipe.transformer.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for name, comp in pipe.components.items():
        assert not isinstance(comp, torch.nn.Module) or not comp.training, name
    defaults = m.generation_defaults()
    assert {"height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"} <= set(defaults)

    calls, handle = record_calls(pipe)
    img = run(pipe, defaults)
    handle.remove()
    branches = calls[0]["hidden_states"].shape[0]                      # one prompt: the batch is the CFG branches
    assert branches == (1 if arch == "flux_schnell" else 2)            # CFG exercised where the real model uses it
    assert len(calls) == defaults["num_inference_steps"]
    example = m.example_inputs()
    seen_t = []
    for call in calls:
        for branch in halves(call, example, branches):
            assert {k: (tuple(v.shape), v.dtype) for k, v in branch.items()} == \
                   {k: (tuple(v.shape), v.dtype) for k, v in example.items()}
        seen_t.append(float(call["timestep"].flatten()[0]))
        if branches == 2:                                                # same latent and step in both halves
            assert torch.equal(*call["hidden_states"].chunk(2)) and torch.equal(*call["timestep"].chunk(2))
    assert seen_t == sorted(seen_t, reverse=True) and len(set(seen_t)) == len(seen_t)   # a real schedule
    assert img.shape == (1, defaults["height"], defaults["width"], 3) and np.isfinite(img).all()
    assert img.std() > 0

    again = m.pipeline()                               # rebuilt: same components, same image, bit for bit
    assert np.array_equal(run(again, defaults), img)
    assert not np.array_equal(run(again, defaults, seed=1), img)


@pytest.mark.parametrize("arch", ["pixart_sigma", "flux_schnell"])      # one CFG + one guidance-distilled arch
def test_checkpoint_round_trip(arch, tmp_path):
    m = mf(arch)
    pipe = m.pipeline()
    defaults = m.generation_defaults()
    pipe.save_pretrained(tmp_path)
    loaded = m.pipeline(checkpoint=tmp_path)
    assert type(loaded) is type(pipe)
    assert m.generation_defaults(checkpoint=tmp_path) == defaults
    ref = m.model(checkpoint=tmp_path)
    sd, sd2 = ref.state_dict(), loaded.transformer.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            other = getattr(loaded, name)
            assert not other.training, name
            a, b = comp.state_dict(), other.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    img = run(loaded, defaults)
    assert np.array_equal(run(loaded, defaults), img)
    # same weights; safetensors-loaded tensors may take other SIMD paths: agreement to float rounding
    np.testing.assert_allclose(img, run(pipe, defaults), atol=1e-4, rtol=0)


def test_checkpoint_errors(tmp_path):
    m = mf("sana")
    m.model().save_pretrained(tmp_path / "transformer")               # a transformer only: model() loads it ...
    assert isinstance(m.model(checkpoint=tmp_path), torch.nn.Module)
    with pytest.raises(ValueError, match="model_index.json is missing"):   # ... pipeline() says what is missing
        m.pipeline(checkpoint=tmp_path)
    with pytest.raises(ValueError, match="meta device.*--checkpoint"):
        mf("flux_schnell").pipeline("full")


def test_tokenizers_offline_and_pooled_eos():
    m = mf("sd35_medium")
    pipe = m.pipeline()
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = tok("red zorblax", padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id and ids[0, 2] == tok.unk_token_id and ids[0, 3] == tok.eos_token_id
    assert enc.config.eos_token_id == tok.eos_token_id
    early = ids.clone()
    early[0, 1:] = tok.eos_token_id                                       # EOS (= pad) right after BOS
    with torch.no_grad():
        for seq, pos in ((ids, 3), (early, 1)):                          # pooled = projection at the first EOS
            out = enc(seq)
            torch.testing.assert_close(out.text_embeds[0], enc.text_projection(out.last_hidden_state[0, pos]))
        assert not torch.allclose(enc(ids).text_embeds, enc(early).text_embeds)


@pytest.mark.parametrize("arch,steps", [("sana", 20), ("pixart_sigma", 20), ("sd35_medium", 28), ("flux_schnell", 4)])
def test_full_generation_defaults(arch, steps):
    m = mf(arch)
    d, ex = m.generation_defaults("full"), m.example_inputs("full")
    assert d["num_inference_steps"] == steps
    if arch == "flux_schnell":                                  # packed 2x2 tokens of the latent
        side = math.isqrt(ex["hidden_states"].shape[1]) * 2 * m.VAE_SCALE
    else:
        side = ex["hidden_states"].shape[-1] * m.VAE_SCALE
    assert d["height"] == d["width"] == side
    clip_tokens = m.CLIP_TOKENS["full"] if arch == "sd35_medium" else 0
    assert d["max_sequence_length"] + clip_tokens == ex["encoder_hidden_states"].shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sana", "pixart_sigma"])
def test_full_pipeline_one_step(arch):
    """Full transformer + stand-in encoders/VAE: one denoising step gives the full example_inputs' shapes."""
    m = mf(arch)
    pipe = m.pipeline("full")
    calls, _ = record_calls(pipe)
    run(pipe, {**m.generation_defaults("full"), "num_inference_steps": 1}, output_type="latent")
    ex = m.example_inputs("full")
    assert len(calls) == 1
    for branch in halves(calls[0], ex, 2):
        assert {k: (tuple(v.shape), v.dtype) for k, v in branch.items()} == \
               {k: (tuple(v.shape), v.dtype) for k, v in ex.items()}
