"""The optimizer step and gradient clipping of an FSDP2 student on each process's local shards.

FSDP2's parameters and gradients are ``DTensor``s. ``torch.optim.AdamW`` and
``torch.nn.utils.clip_grad_norm_`` accept them, but every tensor op then goes through DTensor's
Python dispatch (sharding propagation per op, per list): for Sana-1600M's 396 parameter tensors that
costs more CPU time per step than the kernels take. Both computations are elementwise per shard
(AdamW) or a sum over shards (the gradient norm), so they run here on the plain local tensors:

- :class:`LocalShardAdamW` *is* ``torch.optim.AdamW`` over the DTensor parameters (its state holds
  DTensors, so ``state_dict`` and the full-state checkpoints are unchanged); only the lists handed to
  the update kernel are the local shards. Same kernel, same values.
- :func:`clip_local` sums the squared local norms, all-reduces the sum once, and scales the local
  gradients: the same total norm as ``clip_grad_norm_`` (up to the order of the float sums).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["LocalShardAdamW", "clip_local", "local"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain local tensor of a DTensor (it shares the storage); any other tensor as it is."""
    return getattr(t, "_local_tensor", t)


class LocalShardAdamW(torch.optim.AdamW):
    """``AdamW`` whose update runs on the local shards of DTensor parameters, gradients and state."""

    def _init_group(self, group, *lists):
        has_complex = super()._init_group(group, *lists)
        for found in lists[:-1]:            # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
            found[:] = [local(t) for t in found]
        return has_complex                  # the last list (step counts) holds plain tensors already


def clip_local(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' total 2-norm to ``max_norm`` (inf: only measure it); the norm (a tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    shards = [local(g) for g in grads]
    square = torch.stack([n.float() for n in torch._foreach_norm(shards)]).square().sum()
    mesh = getattr(grads[0], "device_mesh", None)
    if mesh is not None and dist.is_initialized():
        dist.all_reduce(square, group=mesh.get_group())
    total = square.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(shards, coef.to(shards[0].dtype))
    return total
