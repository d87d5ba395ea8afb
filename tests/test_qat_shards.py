"""fbqc.qat.parallel.shards: FSDP2's optimizer step and clipping on the local shards compute what AdamW and
clip_grad_norm_ compute on the DTensors (one in-process rank here; two processes in
test_qat_distributed), and the optimizer state stays DTensors (checkpoints unchanged)."""
from __future__ import annotations

import copy

import pytest
import torch

from fbqc.qat.parallel.shards import LocalShardAdamW, clip_local, local


def sharded_pair():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    for m in (a, b):
        fully_shard(m[0])
        fully_shard(m)
    return a, b


def backward(m, seed):
    g = torch.Generator().manual_seed(seed)
    m(torch.randn(4, 6, generator=g)).square().sum().mul(30).backward()


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_local_step_and_clip_equal_the_dtensor_ones(world, max_norm):
    from torch.distributed.tensor import DTensor

    a, b = sharded_pair()
    assert all(isinstance(p, DTensor) for p in a.parameters())
    opt_a = torch.optim.AdamW(list(a.parameters()), lr=1e-2, weight_decay=0.1)
    opt_b = LocalShardAdamW(list(b.parameters()), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        backward(a, step)
        backward(b, step)
        na = torch.nn.utils.clip_grad_norm_(list(a.parameters()), max_norm)
        nb = clip_local(list(b.parameters()), max_norm)
        assert float(nb) == pytest.approx(float(na.full_tensor()), rel=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(local(q.grad), local(p.grad), rtol=1e-6, atol=0)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(local(q), local(p), rtol=1e-6, atol=1e-9)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k, st in sa["state"].items():
        assert set(st) == set(sb["state"][k]) == {"step", "exp_avg", "exp_avg_sq"}
        assert isinstance(sb["state"][k]["exp_avg"], DTensor)          # the checkpoint format is unchanged
        torch.testing.assert_close(local(sb["state"][k]["exp_avg_sq"]), local(st["exp_avg_sq"]), rtol=1e-6, atol=1e-12)


def test_clip_of_plain_tensors_and_no_gradients():
    w = torch.nn.Parameter(torch.zeros(3))
    assert float(clip_local([w], 1.0)) == 0.0                         # no gradient yet
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(clip_local([w], float("inf"))) == pytest.approx(5.0)  # measured, not clipped
    assert float(clip_local([w], 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=0)
