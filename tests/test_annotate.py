"""Which layers get quantized, and how (DESIGN.md §2)."""
from __future__ import annotations

import pytest
import torch

import fbqc
from conftest import example
from fbqc.pass_infra import PostconditionError
from fbqc.passes import AnnotateLinears


@pytest.fixture(scope="module")
def sana():
    return fbqc.export_model_file(example("sana"))[0]


def _layers(program):
    return {s.layer: s for s in program.specs().values()}


def test_default_is_linears_and_pointwise_convs_inside_blocks(sana):
    p = AnnotateLinears()(sana).program
    layers = _layers(p)
    assert layers and all(l.startswith("transformer_blocks.") for l in layers)
    assert "proj_out" not in layers and not any("caption_projection" in l or "time_embed" in l for l in layers)
    kinds = {l: s.kind for l, s in layers.items()}
    assert kinds["transformer_blocks.0.ff.conv_inverted"] == "conv1x1"
    assert kinds["transformer_blocks.0.ff.conv_point"] == "conv1x1"
    # the depthwise 3x3 conv stays float, with the reason recorded
    assert "transformer_blocks.0.ff.conv_depth" not in layers
    assert "pointwise" in p.info["skipped_layers"]["transformer_blocks.0.ff.conv_depth"]
    # every aten.linear inside the blocks is annotated
    block_linears = [n for n in p.graph.nodes if n.target == torch.ops.aten.linear.default
                     and n.args[1].target.startswith("transformer_blocks.")]
    assert all("fbqc.quant" in n.meta for n in block_linears) and block_linears


def test_include_exclude_and_overrides(sana):
    p = AnnotateLinears(bits=4, include=[r"blocks\.1\."], exclude=[r"attn2"],
                        layer_bits={"proj_out": 8, r"ff\.conv_point": 5.5})(sana).program
    layers = _layers(p)
    # a layer named by an override is quantized even outside --include (proj_out, block 0's conv_point)
    assert all(l.startswith("transformer_blocks.1.") or l in ("proj_out", "transformer_blocks.0.ff.conv_point")
               for l in layers)
    assert "transformer_blocks.0.ff.conv_point" in layers and "transformer_blocks.0.attn1.to_q" not in layers
    assert not any("attn2" in l for l in layers)
    assert layers["proj_out"].weight.bits == 8
    assert layers["transformer_blocks.1.ff.conv_point"].weight.bits == 5.5
    assert layers["transformer_blocks.1.attn1.to_q"].weight.bits == 4


def test_specs_are_frozen(sana):
    p = AnnotateLinears()(sana).program
    spec = next(iter(p.specs().values()))
    with pytest.raises(Exception):
        spec.weight.bits = 3


@pytest.mark.parametrize("bad", [0.5, 1, 17, "x", float("nan")])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        AnnotateLinears(bits=bad)


def test_bad_pattern_and_no_match(sana):
    with pytest.raises(ValueError, match="--include '\\(' is not a valid regular expression"):
        AnnotateLinears(include=["("])
    with pytest.raises(PostconditionError, match="no linear or 1x1 conv layer matched"):
        AnnotateLinears(include=["nothing_like_this"])(sana)
