"""Map-style sample streams (fbqc.data.SamplesAround, the examples' SeededSamples) and the per-process
shares the training loop takes of them (also fbqc.data)."""
from __future__ import annotations

import itertools

import pytest
import torch

from fbqc import data as S
from fbqc.data import ENDLESS, SamplesAround, samples_around, sample_seed
from fbqc.frontend import load_model_file

EXAMPLE = {"x": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 4 + 1,
           "t": torch.tensor([5]), "one": torch.tensor([2.0])}


def test_samples_around_is_map_style_and_order_free():
    s = SamplesAround(EXAMPLE, seed=3)
    assert S.indexed(s) and len(s) == ENDLESS
    first = list(itertools.islice(samples_around(EXAMPLE, seed=3), 4))
    for i in (3, 0, 2, 1):                                   # any order, same samples
        assert torch.equal(s[i]["x"], first[i]["x"])
    assert not torch.equal(first[0]["x"], first[1]["x"])
    assert not torch.equal(SamplesAround(EXAMPLE, seed=4)[0]["x"], first[0]["x"])
    g = torch.Generator().manual_seed(sample_seed(3, 2))   # sample i: Normal(mean, std) from its own seed
    x = EXAMPLE["x"]
    assert torch.equal(s[2]["x"], torch.randn(2, 3, generator=g) * x.std() + x.mean())
    assert s[1]["t"] is EXAMPLE["t"] and s[1]["one"] is EXAMPLE["one"]      # kept as given
    with pytest.raises(IndexError):
        s[-1]


def test_shares_split_each_batch_like_one_process():
    data = list(range(7))                                    # finite: cycles
    one = S.batches(S.cycle(lambda: data, 3), 4)
    ranks = [S.shares(data, 3, 4, lo, lo + 2) for lo in (0, 2)]
    for _ in range(5):
        assert next(one) == next(ranks[0]) + next(ranks[1])
    assert not S.indexed({"a": 1}) and not S.indexed(iter(data)) and S.indexed(data)
    with pytest.raises(ValueError, match="no samples"):
        next(S.shares([], 0, 2, 0, 1))


def test_example_streams_are_map_style():
    from pathlib import Path

    mf = load_model_file(Path(__file__).resolve().parents[1] / "examples" / "sana.py")
    data = mf.call("training_data")
    assert S.indexed(data)
    it = list(itertools.islice(iter(data), 3))
    assert all(torch.equal(it[i]["encoder_hidden_states"], data[i]["encoder_hidden_states"]) for i in range(3))
    ex = mf.call("example_inputs")
    assert set(ex) == set(data[0]) and all(ex[k].shape == data[0][k].shape for k in ex)
