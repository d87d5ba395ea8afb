"""Data-parallel QAT on the GPUs (or CPU processes) of one host: process group, wrapping, full state.

``fbqc train --nproc N`` re-launches itself through ``torchrun`` (:func:`launch`); each process then
trains the module student (:mod:`fbqc.qat.students.modules`) on its slice of every batch, wrapped by
:func:`wrap`:

- ``ddp``: ``DistributedDataParallel`` — parameters and optimizer state replicated, gradients averaged.
- ``fsdp``: FSDP2 ``fully_shard`` per transformer block (``…blocks.N``), then the root; the frozen
  teacher is sharded the same way. Parameters stay fp32 (bf16 autocast computes), so the fake quant
  sees the same weights as on one process.

Rank-0 loading: only rank 0 builds the model with its weights; the other ranks build it on the meta
device (:func:`build_on_meta`) and, once wrapped, receive rank 0's tensors (:func:`load_from_rank0`), so
host RAM holds one loaded copy of the weights (rank 0's), not a model and a teacher copy per process
(:func:`host_report` measures each process).

Checkpoints hold *full* (unsharded, FQN-keyed) model and optimizer state
(``torch.distributed.checkpoint.state_dict``), so a run resumes on any number of processes and
with either strategy. The global batch is the model file's batch: with N processes each takes
batch/N samples of it, and the logged loss is the mean over processes — the same trajectory as one
process (up to the order of float reductions).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fbqc.errors import UserError
from fbqc.memory import process_memory

STRATEGIES = ("auto", "ddp", "fsdp")
GRAD_REDUCE = ("fp32", "bf16")
#: DDP bucket size: a 1.6 B-parameter model's fp32 gradients in 16 all-reduces rather than 256 (25 MB, the
#: default). On 2 H200s (Sana-1600M, CUDA graphs) 400 MB steps in 0.136 s, 100 MB in 0.144 s, 25 MB in
#: 0.159 s: fewer, larger collectives interfere less with the backward kernels they overlap
DDP_BUCKET_MB = 400


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False            # we created the process group (and destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc: int, args: list[str]) -> int:
    """Run ``fbqc <args>`` in ``nproc`` processes through ``torchrun --standalone``; its exit code."""
    if nproc < 2:
        raise UserError("--nproc must be ≥ 2 to launch processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fbqc.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    return subprocess.call(cmd, env=env)


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (torchrun would take ``--nproc`` for its own
    ``--nproc-per-node``; the processes read their number from ``WORLD_SIZE``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def init(nproc: int, device: str) -> tuple[World, torch.device]:
    """Join (or, for one in-process rank, create) the process group; the device of this rank."""
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if under_torchrun():
        size, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
        if size != nproc:
            raise UserError(f"torchrun started {size} processes but --nproc is {nproc}")
        if cuda:
            torch.cuda.set_device(local)
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("nccl" if cuda else "gloo")
        world = World(rank, size, local, owned)
    else:
        if nproc != 1:
            raise UserError(f"--nproc {nproc}: run through `fbqc train --nproc {nproc}` (torchrun), "
                            f"not in-process")
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        world = World(0, 1, 0, owned)
    dev = torch.device(f"cuda:{world.local_rank}") if cuda else torch.device("cpu")
    return world, dev


def shard_batch(sample: dict[str, Any], world: World) -> dict[str, Any]:
    """This rank's slice (along dim 0) of every batched tensor of ``sample``."""
    if world.size == 1:
        return sample
    from fbqc.data import batch_rows, batched

    batch, keys = batch_rows(sample), batched(sample)
    if batch % world.size:
        raise UserError(f"the batch ({batch} samples) does not split over {world.size} processes; "
                        f"use a batch that is a multiple of --nproc")
    per = batch // world.size
    lo = world.rank * per
    return {k: v[lo:lo + per] if k in keys and v.shape[0] == batch else v for k, v in sample.items()}


def check_grad_reduce(grad_reduce: str, device: str) -> None:
    if grad_reduce not in GRAD_REDUCE:
        raise ValueError(f"--grad-reduce must be one of {', '.join(GRAD_REDUCE)}, got {grad_reduce!r}")
    if grad_reduce == "bf16" and not device.startswith("cuda"):
        raise UserError("--grad-reduce bf16 needs --device cuda (NCCL); processes on the CPU (gloo) average "
                        "gradients in fp32")


def wrap(model: torch.nn.Module, blocks: list[torch.nn.Module], strategy: str, device: torch.device, world: World,
         *, trainable: bool = True, param_dtype: torch.dtype | None = None, grad_reduce: str = "fp32",
         keep_params: bool = False, unit: int = 1, bucket_mb: float = DDP_BUCKET_MB,
         fixed_addresses: bool = False) -> torch.nn.Module:
    """``model`` wrapped for ``strategy`` (ddp | fsdp); a frozen model (``trainable=False``) is only
    sharded (fsdp) or left as it is (ddp: a replica per process).

    - ``param_dtype`` (fsdp): the dtype parameters are all-gathered in (the frozen teacher under bf16
      autocast: half the traffic); the inputs stay as they are (autocast casts what it computes in bf16).
    - ``grad_reduce``: ``fp32``, or ``bf16`` — gradients averaged across processes in bf16 (half the
      traffic; each process's own gradient and the optimizer stay fp32).
    - ``keep_params`` (fsdp): keep each block's gathered parameters from forward to backward
      (``reshard_after_forward=False``): no second all-gather in backward, more memory.
    - ``unit`` (fsdp): consecutive blocks per FSDP2 unit (one all-gather and one reduce-scatter each):
      fewer, larger collectives and hooks, coarser overlap.
    - ``bucket_mb`` (ddp): gradient bucket size in MB.
    - ``fixed_addresses`` (fsdp, with ``keep_params``): each unit's gathered parameters keep their memory
      between steps (:func:`keep_gathered_memory`), so CUDA graphs replay on them (``--cuda-graphs``).

    DDP over one process is no wrapper at all (it would only copy gradients into buckets).
    """
    check_grad_reduce(grad_reduce, device.type)
    bf16 = grad_reduce == "bf16" and trainable and world.size > 1
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # cast_forward_inputs=False: FSDP2 would otherwise cast every unit's floating inputs to param_dtype —
        # the teacher's timestep, latents and residual stream rounded to bf16 at each unit, a KD target
        # the replicated teacher (bf16 weights, fp32 inputs, autocast) does not compute
        kw: dict[str, Any] = {"mp_policy": MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.bfloat16 if bf16 else None, cast_forward_inputs=False)}
        if trainable and keep_params:
            kw["reshard_after_forward"] = False
        if unit < 1:
            raise ValueError(f"--fsdp-unit must be ≥ 1, got {unit}")
        if fixed_addresses and not (trainable and keep_params):
            raise ValueError("fixed_addresses keeps the gathered parameters of a trained FSDP2 model that keeps "
                             "them from forward to backward (keep_params=True)")
        units = [blocks[i:i + unit] for i in range(0, len(blocks), unit)]
        for group in units:
            fully_shard(group if len(group) > 1 else group[0], **kw)
        fully_shard(model, **kw)
        for group, after in zip(units, units[1:]):       # gather unit i+1 while unit i computes, also
            group[0].set_modules_to_forward_prefetch([after[0]])   # when the CPU is not far ahead
        if fixed_addresses:
            keep_gathered_memory(model)
        return model
    if strategy == "ddp":
        if not trainable or world.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True,           # gradients live in the buckets: no second copy
                  bucket_cap_mb=bucket_mb,
                  broadcast_buffers=False)    # the bit-width buffers: every process writes the same schedule
        if bf16:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return ddp
    raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")


def keep_gathered_memory(model: torch.nn.Module) -> int:
    """Keep the memory of every FSDP2 parameter's gathered (unsharded) tensor of ``model`` between steps;
    the number of parameters. Each step's all-gather still refreshes the values — it copies them into
    that same memory — but the tensors the compiled blocks read keep their addresses, which is what a
    CUDA graph replay needs (its inputs are baked in by address: FSDP2 frees the gathered memory when it
    reshards and allocates it again at the next all-gather, so every step would re-record the graphs).

    With ``reshard_after_forward=False`` (``--fsdp-keep-params``) the whole gathered model is held during
    backward anyway, so the peak memory does not grow; between steps each GPU holds it as DDP does.
    FSDP2 has no switch for this: ``free_unsharded_param`` is shadowed per parameter (torch's private
    ``FSDPParam``; a torch without it is an error that says so)."""
    from torch.distributed.fsdp import FSDPModule

    kept: dict[int, Any] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)       # torch ≥ 2.12; one group before
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fp in group.fsdp_params:
                if not callable(getattr(fp, "free_unsharded_param", None)):
                    raise RuntimeError(f"torch {torch.__version__}: FSDP2's FSDPParam has no free_unsharded_param; "
                                       f"--cuda-graphs with --strategy fsdp cannot keep the gathered parameters")
                fp.free_unsharded_param = _keep                    # the instance's, not the class's
                kept[id(fp)] = fp
    return len(kept)


def _keep() -> None:
    """In place of ``FSDPParam.free_unsharded_param``: the gathered memory stays (:func:`keep_gathered_memory`)."""


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: torch.nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Unsharded, FQN-keyed (model, optimizer) state on CPU (complete on rank 0; collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_options(cpu_offload=True))
    osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True)) if optimizer else None
    return msd, osd


def load_full_state(model: torch.nn.Module, optimizer, msd: dict, osd: dict | None) -> None:
    """Load a full state (every rank passes the whole dict) into a wrapped model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, msd, options=_options())
    if osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=_options())


# ---- rank-0 loading: only rank 0 holds the weights; the other ranks build on meta and receive them ----


def build_on_meta() -> bool:
    """Whether this process builds the model on the meta device: a rank other than 0 of ``torchrun``
    (``fbqc train --nproc N``): its weights come from rank 0 (:func:`load_from_rank0`)."""
    return under_torchrun() and int(os.environ.get("RANK", "0")) != 0 and int(os.environ["WORLD_SIZE"]) > 1


def on_meta(module: torch.nn.Module) -> bool:
    """Any parameter or buffer of ``module`` on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device``: moved, or — built on meta — storage allocated there (``to_empty``: values
    undefined until :func:`load_from_rank0`). After FSDP2's ``fully_shard`` only the local shards are
    allocated; a real sharded module is left as it is (``fully_shard`` moved its shards)."""
    if on_meta(module):
        return module.to_empty(device=device)
    sharded = any(hasattr(p, "to_local") for p in module.parameters())
    return module if sharded else module.to(device)


def non_persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: buffer}`` of the buffers a state dict leaves out (``persistent=False``: the bit-widths of
    :mod:`fbqc.qat.students.modules`, a model's precomputed tables), in module order."""
    return {f"{prefix}{'.' if prefix else ''}{name}": b for prefix, m in module.named_modules()
            for name, b in m._buffers.items() if b is not None and name in m._non_persistent_buffers_set}


def rank0_source(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What rank 0 hands out (:func:`load_from_rank0`): ``module``'s full state dict and its non-persistent
    buffers, by name — references to its tensors, no copy. Take it before ``fully_shard`` replaces them."""
    return module.state_dict(), non_persistent_buffers(module)


def _pg_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def load_from_rank0(module: torch.nn.Module, source: tuple[dict, dict] | None, world: World) -> None:
    """Collective: every rank's ``module`` (plain, or FSDP2-sharded; materialized, e.g. by
    :func:`materialize` after a meta build) gets rank 0's ``source`` (:func:`rank0_source`; None on the
    other ranks, which need no copy of the weights).

    The state dict goes through ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``:
    one tensor at a time, each rank keeping its FSDP2 shard of it (or the whole tensor when ``module`` is
    not sharded); the non-persistent buffers, which no state dict holds, are broadcast one by one.
    Bit-exact: every rank ends with rank 0's values.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if world.main and source is None:
        raise ValueError("rank 0 must pass the full state it loads the other ranks from")
    state, buffers = source if world.main else ({}, {})
    set_model_state_dict(module, dict(state), options=_options(broadcast_from_rank0=True))   # it fills the dict in
    device = _pg_device()
    for name, b in non_persistent_buffers(module).items():
        t = b if b.device == device else torch.empty_like(b, device=device)
        if world.main:
            src = buffers.get(name)
            if src is None:
                raise KeyError(f"rank 0's source has no buffer {name}")
            if src is not t:
                t.copy_(src)
        if world.size > 1:
            dist.broadcast(t, src=0)
        if t is not b:
            b.copy_(t)


#: this process's resident memory at named moments (bytes): :func:`note_host`, :func:`host_report`
_HOST: dict[str, int] = {}


def note_host(moment: str) -> None:
    """Remember this process's resident memory now as ``moment`` (e.g. before the model is built)."""
    _HOST[moment] = process_memory()["rss"]


def host_report(world: World, **facts: Any) -> list[dict[str, Any]]:
    """Collective: every process's host memory (MiB): resident before and after the model was built (if
    noted: :func:`note_host`), its peak so far and resident now, plus ``facts`` — one row per rank, on
    every rank."""
    mib = lambda b: None if b is None else round(b / 2**20, 1)        # noqa: E731
    now = process_memory()
    row = {"rank": world.rank, "rss_before_model_mib": mib(_HOST.get("before model")),
           "rss_after_model_mib": mib(_HOST.get("after model")), "peak_mib": mib(now["peak"]),
           "rss_mib": mib(now["rss"]), **facts}
    if world.size == 1 or not dist.is_initialized():
        return [row]
    rows: list[Any] = [None] * world.size
    dist.all_gather_object(rows, row)
    return rows


class Pending:
    """A step's (mean loss, mean KD loss, gradient norm), read later without a host sync now: the
    cross-process mean is queued on the device (NCCL) and copied to the host asynchronously, so the
    CPU can queue the next step while the GPU finishes this one."""

    def __init__(self, world: World, loss: torch.Tensor, kd: torch.Tensor, norm: torch.Tensor) -> None:
        norm = norm.detach().float().reshape(1)        # a plain tensor, also under FSDP2 (clip_local)
        means = torch.stack([loss.detach().float(), kd.detach().float()])
        if world.size > 1:
            dist.all_reduce(means, op=dist.ReduceOp.SUM)
            means = means / world.size
        values = torch.cat([means, norm.to(means.device)])
        self.event = None
        if values.is_cuda:
            self.values = values.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values

    def read(self) -> tuple[float, float, float]:
        if self.event is not None:
            self.event.synchronize()
        loss, kd, norm = self.values.tolist()
        return loss, kd, norm
