"""What the training loop trains: an adapter per student — :class:`ProgramAdapter` (the program
student, :mod:`.program`, one process) or :class:`ModuleAdapter` (the module student, :mod:`.modules`,
DDP/FSDP2).

Both expose the same small surface to :func:`fbqc.qat.train._run`: ``bits`` (layer → bits buffer),
``student(sample)`` / ``teacher(sample)``, ``params``, ``optimizer()``, ``clip()``, ``stage(sample)`` /
``prepare(staged)``, checkpoint state and ``close()``.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable

import torch

from fbqc.blocks import IN_BLOCK as BLOCKS
from fbqc.frontend import _entry
from fbqc.ops.fused import compile_options
from fbqc.passes.insert_fake_quant import bits_buffers
from fbqc.program import Program
from fbqc.spec import QuantSpec

from ..parallel import dist as D
from ..parallel.shards import LocalShardAdamW, clip_local
from ..rundir import checkpoint as ck
from .modules import block_modules, module_bits, quantize_modules
from .program import own_parameters, retarget, training_view


def _to(sample: dict, device: torch.device) -> dict:
    """On ``device``; from pinned memory the copy is asynchronous (no wait for the GPU's queue)."""
    return {k: v.to(device, non_blocking=v.is_pinned()) if isinstance(v, torch.Tensor) else v
            for k, v in sample.items()}


def _trainable(blocks_only: bool) -> Callable[[str], bool]:
    return (lambda n: BLOCKS.search(n) is not None) if blocks_only else (lambda n: True)


class _Adapter:
    kind = ""
    world = D.World()
    device: torch.device
    params: list[torch.nn.Parameter]

    sharded = False                  # FSDP2: the update and the clipping run on the local shards

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        adamw = LocalShardAdamW if self.sharded else torch.optim.AdamW
        return adamw(self.params, lr=lr, weight_decay=weight_decay,
                     **({"fused": True} if self.device.type == "cuda" else {}))

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients' total norm; returns it (a tensor)."""
        clip = clip_local if self.sharded else torch.nn.utils.clip_grad_norm_
        return clip(self.params, max_norm if max_norm else math.inf)

    def stage(self, sample: dict, shard: bool = True) -> dict:
        """This process's slice of a global batch (``shard=False``: ``sample`` is already its own
        share), on the host (pinned for a CUDA device): the work the data thread does ahead of the step."""
        if shard:
            sample = D.shard_batch(sample, self.world)
        if self.device.type == "cuda":
            sample = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
        return sample

    def prepare(self, staged: dict) -> dict:
        """A staged sample on the device (the step's inputs)."""
        return _to(staged, self.device)


class ProgramAdapter(_Adapter):
    """The FAKE_QUANT program trains in place (its own parameter copies on ``device``)."""

    kind = "program"

    def __init__(self, program: Program, teacher, device: torch.device, *, act_quant: str, blocks_only: bool,
                 compile: bool):
        self.program, self.device = program, device
        self.params = [p for _, p in own_parameters(program, device, _trainable(blocks_only))]
        self.bits = bits_buffers(program)               # after own_parameters moved them
        self.teacher, self._teacher_mod = _teacher_fn(teacher, device)
        self._teacher_dev = (next((p.device for p in self._teacher_mod.parameters()), None)
                             if self._teacher_mod is not None else None)
        if self._teacher_mod is not None:
            self._teacher_mod.to(device)
        view = training_view(program, act_quant, device)
        gm = view.graph_module
        self.student = torch.compile(gm, options=compile_options()) if compile else gm

    def state(self, optimizer) -> tuple[dict, dict]:
        return ck.cpu_state(self.program.graph_module), optimizer.state_dict()

    def load(self, ckpt: dict, optimizer) -> None:
        if ckpt.get("student_kind", self.kind) != self.kind:
            raise ck.RunError("the checkpoint was written by the module student (--strategy ddp|fsdp); "
                              "resume it with --strategy ddp or fsdp")
        self.program.graph_module.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])

    def final_state(self) -> dict:
        return ck.cpu_state(self.program.graph_module)

    def close(self) -> None:
        self.program.graph_module.to("cpu")
        if self._teacher_mod is not None and self._teacher_dev is not None:
            self._teacher_mod.to(self._teacher_dev)


class ModuleAdapter(_Adapter):
    """The eager model with the specs applied (:mod:`fbqc.qat.students.modules`), wrapped for DDP or FSDP2;
    each process trains on its slice of the batch. The teacher is a frozen float copy."""

    kind = "module"

    def __init__(self, model: torch.nn.Module, specs: dict[str, QuantSpec], world: D.World, device: torch.device,
                 cfg: Any):
        """``cfg``: the run's :class:`~fbqc.qat.config.TrainConfig` (strategy, act_quant, blocks_only,
        compile, cuda_graphs, checkpoint_blocks, grad_reduce, fsdp_keep_params, fsdp_replicate_teacher,
        fsdp_unit, ddp_bucket_mb)."""
        strategy = cfg.strategy
        self.world, self.device, self.strategy = world, device, strategy
        self.sharded = strategy == "fsdp"
        model.eval()
        # rank-0 loading: with N > 1 processes only rank 0 holds the weights as loaded; the other ranks'
        # models may be built on the meta device (fbqc train builds them so: no host copy), and every
        # rank's student and teacher get rank 0's values once sharded/placed (D.load_from_rank0)
        share = world.size > 1
        if share and world.main and D.on_meta(model):
            raise ValueError("rank 0's model has weights on the meta device: the other processes load "
                             "theirs from rank 0, which must hold real ones")
        built_on_meta = D.on_meta(model)
        cached = getattr(cfg, "teacher_cache", False)   # --teacher-cache: no teacher at all
        teacher = None if cached else (_meta_copy(model) if share else copy.deepcopy(model)).requires_grad_(False)
        quantize_modules(model, specs, cfg.act_quant)
        source = D.rank0_source(model) if share and world.main else None    # references: no copy
        trainable = _trainable(cfg.blocks_only)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
        self.kwargs = {"return_dict": False} if "return_dict" in inspect.signature(model.forward).parameters else {}
        bf16 = torch.bfloat16 if device.type == "cuda" else None        # the teacher's computing dtype
        shard_teacher = self.sharded and not cfg.fsdp_replicate_teacher
        if self.sharded and not shard_teacher and bf16 and teacher is not None:
            for p in teacher.parameters():   # what FSDP's bf16 all-gather would hand it, held whole
                p.data = p.data.to(bf16)
        for m, sharded in ((model, self.sharded), (teacher, shard_teacher))[:1 if cached else 2]:
            if not sharded:
                D.materialize(m, device)   # fsdp: fully_shard moves each shard, never the whole model
            blocks = [b for _, b in block_modules(m)]
            if cfg.checkpoint_blocks:
                from torch.distributed._composable import checkpoint

                for b in blocks:
                    checkpoint(b)
            if cfg.compile:      # a sharded teacher gathers into new memory every step: no CUDA graphs
                graphs = cfg.cuda_graphs and (m is model or not sharded)
                for b in blocks:
                    b.compile(options=compile_options(graphs))
        self.model = model
        self.wrapped = D.wrap(model, [b for _, b in block_modules(model)], strategy, device, world,
                              grad_reduce=cfg.grad_reduce, keep_params=cfg.fsdp_keep_params, unit=cfg.fsdp_unit,
                              bucket_mb=cfg.ddp_bucket_mb, fixed_addresses=self.sharded and cfg.cuda_graphs)
        self._teacher = (D.wrap(teacher, [b for _, b in block_modules(teacher)], strategy, device, world,
                                trainable=False, param_dtype=bf16, unit=cfg.fsdp_unit)
                         if shard_teacher and teacher is not None else teacher)
        if share:
            for m, sharded in ((model, self.sharded), (teacher, shard_teacher))[:1 if cached else 2]:
                if sharded:
                    D.materialize(m, device)   # meta shards: allocated on the device, filled next
                D.load_from_rank0(m, source, world)
        del source                             # rank 0: its loaded copy goes
        self.bits = module_bits(model)          # after wrapping: fully_shard moves the buffers
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        #: host memory per process after set-up (MiB; rank 0 holds the loaded copy, the others their shards)
        self.host = D.host_report(world, built_on_meta=built_on_meta)

    def student(self, **sample):
        return self.wrapped(**sample, **self.kwargs)

    def teacher(self, **sample):
        if self._teacher is None:
            raise RuntimeError("--teacher-cache: no teacher was built; the KD target comes with the data")
        return self._teacher(**sample, **self.kwargs)

    def state(self, optimizer) -> tuple[dict, dict]:
        return D.full_state(self.wrapped, optimizer)

    def load(self, ckpt: dict, optimizer) -> None:
        if ckpt.get("student_kind") != self.kind:
            raise ck.RunError("the checkpoint was written by the one-process program student; resume it "
                              "with --nproc 1 and no --strategy")
        D.load_full_state(self.wrapped, optimizer, ckpt["student"], ckpt["optimizer"])

    def final_state(self) -> dict:
        return D.full_state(self.wrapped)[0]

    def close(self) -> None:
        peaks = D.host_report(self.world)              # collective: every process's peak over the run
        for row, end in zip(self.host, peaks):
            row["run_peak_mib"] = end["peak_mib"]
        self.world.barrier()


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no memory): the
    teacher of a multi-process run, filled from rank 0's weights once placed."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _teacher_fn(teacher, device) -> tuple[Callable | None, torch.nn.Module | None]:
    if teacher is None:                       # --teacher-cache: the KD target comes with the data
        return None, None
    if isinstance(teacher, Program):
        view = retarget(teacher.copy(), device).graph_module      # shares the teacher's parameters
        return view, view
    if isinstance(teacher, torch.nn.Module):
        return _entry(teacher), teacher
    if callable(teacher):
        return teacher, None
    raise TypeError(f"teacher must be a Program, an nn.Module or a callable, got {type(teacher).__name__}")


def describe(rt: _Adapter) -> dict[str, Any]:
    return {"student": rt.kind, "processes": rt.world.size,
            **({"strategy": rt.strategy, "host_ram": rt.host} if isinstance(rt, ModuleAdapter) else {})}
