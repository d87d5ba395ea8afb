"""benchmarks/flux_fsdp_plan.py on the tiny FLUX config: FSDP2 shards (fake process group, meta device)
against an independent count of FSDP2's Shard(0) split, and the activation terms."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WORLDS = (2, 4, 8)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def planner():
    return _load("flux_fsdp_plan", ROOT / "benchmarks" / "flux_fsdp_plan.py")


@pytest.fixture(scope="module")
def flux():
    return _load("flux_schnell_example", ROOT / "examples" / "flux_schnell.py")


@pytest.fixture(scope="module")
def plan(planner):
    p = planner.plan("tiny", WORLDS)
    assert not dist.is_initialized()                  # the fake process group is gone
    return p


@pytest.fixture(scope="module")
def shapes(flux):
    """Parameter shapes of the tiny FLUX, built straight from diffusers (not through the planner)."""
    cfg, _ = flux._config("tiny")
    with torch.device("meta"):
        m = flux.Cls(**cfg)
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


def _rank0(shape: tuple, world: int) -> int:
    """Elements of rank 0's FSDP2 shard (Shard(0), torch.chunk split: ceil(dim0 / world) rows)."""
    rows = math.ceil(shape[0] / world) if shape else 1
    return rows * math.prod(shape[1:])


def test_counts(plan, flux, shapes):
    assert plan["params"] == flux.TINY_PARAMS == sum(math.prod(s) for s in shapes.values())
    trainable = sum(math.prod(s) for n, s in shapes.items() if re.search(r"blocks\.\d+\.", n))
    assert plan["trainable"] == trainable and plan["root_params"] == plan["params"] - trainable
    assert plan["blocks"] == 2 and plan["quantized_layers"] > 0
    assert plan["block_params"]["transformer_blocks"] > plan["block_params"]["single_transformer_blocks"] > 0


@pytest.mark.parametrize("world", (2, 4))
def test_shards_match_independent_split(plan, shapes, world):
    row = next(r for r in plan["rows"] if r["world"] == world)
    expect = sum(_rank0(s, world) for s in shapes.values())
    assert row["shards"]["student"] == row["shards"]["teacher"] == expect
    assert row["shards"]["trainable"] == sum(_rank0(s, world) for n, s in shapes.items()
                                             if re.search(r"blocks\.\d+\.", n))
    total, pad = plan["params"] * 4, sum(math.prod(s[1:]) for s in shapes.values()) * 4 * world
    assert total <= row["params"] * world <= total + pad
    assert row["grads"] == row["shards"]["trainable"] * 4 and row["adamw"] == 2 * row["grads"]
    assert row["teacher"] == row["params"]


@pytest.mark.parametrize("world", (2, 4))
def test_shards_over_ranks_sum_to_totals(planner, plan, world):
    student, teacher, *_ = planner.build("tiny")
    shards = [planner.shard(student, teacher, world, rank) for rank in range(world)]
    assert not dist.is_initialized()
    assert sum(s["student"] for s in shards) == sum(s["teacher"] for s in shards) == plan["params"]
    assert sum(s["trainable"] for s in shards) == plan["trainable"]


def test_state_halves_with_twice_the_gpus(plan):
    state = {r["world"]: sum(r[k] for k in ("params", "grads", "adamw", "teacher")) for r in plan["rows"]}
    for w in (2, 4):
        assert state[2 * w] / state[w] == pytest.approx(0.5, rel=0.05)
    assert len({r["working"] for r in plan["rows"]}) == len({r["activations"] for r in plan["rows"]}) == 1


def test_activations(plan, flux):
    cfg, _ = flux._config("tiny")
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    img, txt = plan["image_tokens"], plan["text_tokens"]
    shared = d * 2 + 2 * (img + txt) * cfg["attention_head_dim"] * 4          # temb bf16 + RoPE cos/sin fp32
    assert plan["ckpt_inputs"] == plan["blocks"] * (img + txt) * d * 2 + shared
    assert plan["recompute_fp32"] > plan["recompute_bf16"] > 0
    assert plan["recompute_fp32"] == max(plan["recompute_by_kind"].values())
    row = plan["rows"][0]
    assert row["activations"] == plan["ckpt_inputs"] + plan["recompute_bf16"]
    assert row["total"] == sum(row[k] for k in ("params", "grads", "adamw", "teacher", "working", "activations"))


def test_flash_sdpa_restores_torch(planner):
    before = F.scaled_dot_product_attention
    with planner.flash_sdpa():
        assert F.scaled_dot_product_attention is not before
    assert F.scaled_dot_product_attention is before


def test_host_ram_per_process(plan):
    """Rank-0 loading: rank 0 holds the fp32 model once, the others none (measured on the CPU:
    tests/test_rank0_loading.py); rank 0 gathers the full student + AdamW state at a checkpoint."""
    h = plan["host"]
    assert h["rank0_load"] == plan["params"] * 4 and h["other_load"] == 0
    assert h["before"] == 2 * h["rank0_load"]                         # the fp32 model + its teacher copy
    assert h["rank0_checkpoint"] == (plan["params"] + 2 * plan["trainable"]) * 4


def test_other_ranks_build_flux_on_meta(monkeypatch, tmp_path, flux):
    """What the plan's 0 GiB rests on: a rank other than 0 of `fbqc train --nproc 2` builds the FLUX model file
    on the meta device — from a preset, and from `--checkpoint DIR` without reading its weights."""
    from fbqc.frontend import load_model_file
    from fbqc.qat.model_file import _build

    flux.model("tiny").save_pretrained(tmp_path / "transformer")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")   # unreadable now
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for rank, meta in (("1", True), ("0", False)):
        monkeypatch.setenv("RANK", rank)
        for opts in ({"preset": "tiny"},) + (({"checkpoint": str(tmp_path)},) if meta else ()):
            model, built_on_meta = _build(load_model_file(ROOT / "examples" / "flux_schnell.py", **opts))
            assert built_on_meta is meta and all(p.is_meta is meta for p in model.parameters()), (rank, opts)
            assert sum(p.numel() for p in model.parameters()) == flux.TINY_PARAMS


def test_report_and_json(planner, plan):
    text = planner.report(plan)
    assert "H100 80" in text and "--nproc 4" in text and "--checkpoint DIR" in text
    assert "host RAM per process" in text and "every other rank 0.0 GiB" in text
    assert len([ln for ln in text.splitlines() if re.match(r"\s+[248]\s+\d+\.\d\d ", ln)]) == len(WORLDS)
    assert json.loads(json.dumps(plan)) == plan                     # what --json writes


@pytest.mark.slow
def test_full_config(planner, flux):
    p = planner.plan("full", (4, 8))
    assert p["params"] == flux.FULL_PARAMS and p["blocks"] == 57
    r4, r8 = p["rows"]
    assert r8["params"] * 2 == pytest.approx(r4["params"], rel=1e-3)
    assert p["host"]["rank0_load"] / 2**30 == pytest.approx(44.3, abs=0.05)      # was 88.6 on every process
