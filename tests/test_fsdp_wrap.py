"""fbqc.qat.parallel.dist.wrap for FSDP2 (one in-process gloo rank): ``fixed_addresses`` keeps each gathered
parameter's memory between steps — the address a CUDA graph replays on — while every step still trains on
the freshly gathered values; a frozen bf16 teacher gets its inputs as they are, not cast to bf16."""
from __future__ import annotations

import copy

import pytest
import torch

from fbqc.qat.parallel import dist as D


class Block(torch.nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        self.seen.append(x.dtype)
        return x + torch.nn.functional.gelu(self.lin(x.to(self.lin.weight.dtype))).to(x.dtype)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def trained(fixed: bool, steps: int = 4):
    """(losses, the first block's gathered weight address per forward, its storage bytes after each step)."""
    torch.manual_seed(0)
    net = Net()
    D.wrap(net, list(net.blocks), "fsdp", torch.device("cpu"), D.World(), keep_params=True, unit=2,
           fixed_addresses=fixed)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    losses, addresses, kept = [], [], []
    for step in range(steps):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        loss = net(x).square().mean()
        addresses.append(net.blocks[0].lin.weight.data_ptr())     # the gathered (unsharded) parameter now
        gathered = net.blocks[0].lin.weight
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        kept.append(gathered.untyped_storage().nbytes())
    return losses, addresses, kept


def test_fixed_addresses_keep_the_gathered_memory_and_train_the_same(world):
    free_losses, _, free_kept = trained(False)
    fixed_losses, fixed_addresses, fixed_kept = trained(True)
    assert free_losses == fixed_losses                  # re-gathered every step: never a stale weight
    assert len(set(free_losses)) == 4                   # (the weights do move)
    assert len(set(fixed_addresses)) == 1               # what a CUDA graph replay needs
    assert fixed_kept == [6 * 6 * 4] * 4                # the fp32 gathered weight stays allocated
    assert free_kept == [0] * 4                         # FSDP2's own behaviour: freed at each reshard


def test_fixed_addresses_need_a_trained_model_that_keeps_its_parameters(world):
    with pytest.raises(ValueError, match="keep_params=True"):
        D.wrap(Net(), [], "fsdp", torch.device("cpu"), D.World(), fixed_addresses=True)
    with pytest.raises(ValueError, match="keep_params=True"):
        D.wrap(Net(), [], "fsdp", torch.device("cpu"), D.World(), trainable=False, keep_params=True,
               fixed_addresses=True)


def test_bf16_teacher_gets_its_inputs_uncast(world):
    """FSDP2's mixed precision would round every unit's inputs (the timestep, the residual stream) to
    bf16; the replicated teacher (bf16 weights, fp32 inputs) does not, and the sharded one must match it."""
    torch.manual_seed(1)
    net = Net().requires_grad_(False)
    replica = copy.deepcopy(net)
    for p in replica.parameters():
        p.data = p.data.to(torch.bfloat16)
    replica.head.to(torch.float32)
    D.wrap(net, list(net.blocks), "fsdp", torch.device("cpu"), D.World(), trainable=False,
           param_dtype=torch.bfloat16)
    x = torch.randn(3, 6) * 100
    with torch.no_grad():
        sharded = net.blocks[2](net.blocks[1](net.blocks[0](x)))
        whole = replica.blocks[2](replica.blocks[1](replica.blocks[0](x)))
    assert [b.seen for b in net.blocks] == [[torch.float32]] * 3
    assert torch.equal(sharded, whole)
