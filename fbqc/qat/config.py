"""``TrainConfig``: the settings of one QAT run (``fbqc train``'s flags), and their checks.

:data:`EXECUTION` lists the settings that say where and how a run executes rather than what it
computes; a resumed run may change those (another process count, strategy, CUDA graphs, profiling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .bit_change import MOMENTS
from .parallel import dist as D
from .students.program import ACT_MODES


#: settings a resumed run may change (where and how it runs, not what it computes)
EXECUTION = ("nproc", "strategy", "checkpoint_blocks", "compile", "profile", "grad_reduce", "fsdp_keep_params",
             "fsdp_replicate_teacher", "fsdp_unit", "ddp_bucket_mb", "cuda_graphs")


@dataclass
class TrainConfig:
    schedule: str = "fractional"
    steps: int = 1000
    bits: float | None = None           # target: replaces the final 4 of a named schedule
    lr: float = 1e-5
    warmup: int = 0                     # linear warm-up steps, then constant
    rewarm: int = 0                     # at each bit change: lr × k/rewarm on the k-th step at the new bits
    moments: str = "keep"               # at each bit change, AdamW's moments: keep | reset | momentum (bit_change.py)
    clip: float = 1.0                   # gradient-norm clipping (0: off)
    weight_decay: float = 0.0
    act_quant: str = "dynamic"          # dynamic per-sample | static (calibrated, frozen) | none
    blocks_only: bool = True            # train only the parameters inside *blocks.N.
    checkpoint_every: int = 100
    device: str = "cpu"
    seed: int = 0
    compile: bool = False               # torch.compile the student (one graph for every bit-width)
    autocast: bool | None = None        # bf16 autocast; None: on for CUDA
    task_weight: float = 1.0
    calib_samples: int = 16             # act_quant="static": samples calibrated before training
    nproc: int = 1                      # processes (torchrun); > 1 or a strategy: the module student
    strategy: str = "auto"              # auto (nproc 1: program student; else ddp) | ddp | fsdp
    checkpoint_blocks: bool = False     # module student: activation checkpointing per block
    batch: int = 1                      # module student: data samples concatenated into one global batch
    profile: bool = False               # profiler over steps 6–8, written to RUN/profile/
    grad_reduce: str = "fp32"           # module student, > 1 process: gradients averaged in fp32 | bf16
    fsdp_keep_params: bool = False      # fsdp: gathered parameters kept from forward to backward
    fsdp_replicate_teacher: bool = False  # fsdp: a whole (bf16 on CUDA) teacher per process, not sharded
    fsdp_unit: int = 1                  # fsdp: consecutive transformer blocks per FSDP2 unit
    ddp_bucket_mb: float = D.DDP_BUCKET_MB  # ddp: gradients all-reduced in buckets of this size
    cuda_graphs: bool = False           # compile: replay the compiled graphs as CUDA graphs
    data_dir: str | None = None         # --data: a capture directory (fbqc.captured_data), resolved
    teacher_cache: bool = False         # --teacher-cache: KD target = the recorded teacher output

    def check(self) -> None:
        if self.act_quant not in ACT_MODES:
            raise ValueError(f"--act-quant must be one of {', '.join(ACT_MODES)}, got {self.act_quant!r}")
        for k in ("lr", "clip", "weight_decay"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{k.replace('_', '-')} must be a finite number ≥ 0, got {v}")
        if self.warmup < 0 or self.checkpoint_every < 0:
            raise ValueError("--warmup and --checkpoint-every must be ≥ 0")
        if not isinstance(self.rewarm, int) or self.rewarm < 0:
            raise ValueError(f"--rewarm must be an integer ≥ 0 (steps), got {self.rewarm!r}")
        if self.moments not in MOMENTS:
            raise ValueError(f"--moments must be one of {', '.join(MOMENTS)}, got {self.moments!r}")
        D.check_grad_reduce(self.grad_reduce, self.device)
        if self.fsdp_unit < 1:
            raise ValueError(f"--fsdp-unit must be ≥ 1, got {self.fsdp_unit}")
        if not (math.isfinite(self.ddp_bucket_mb) and self.ddp_bucket_mb > 0):
            raise ValueError(f"--ddp-bucket-mb must be a number > 0, got {self.ddp_bucket_mb}")
        if self.ddp_bucket_mb != D.DDP_BUCKET_MB and (self.strategy == "fsdp" or not self.module_student):
            raise ValueError("--ddp-bucket-mb sizes DistributedDataParallel's gradient buckets: it needs "
                             "--strategy ddp (or --nproc > 1 with no --strategy)")
        for flag, on in (("fsdp-keep-params", self.fsdp_keep_params),
                         ("fsdp-replicate-teacher", self.fsdp_replicate_teacher), ("fsdp-unit", self.fsdp_unit != 1)):
            if on and self.strategy != "fsdp":
                raise ValueError(f"--{flag} needs --strategy fsdp")
        if self.cuda_graphs and not (self.compile and self.device.startswith("cuda")):
            raise ValueError("--cuda-graphs replays the compiled graphs on the GPU: it needs --compile and "
                             "--device cuda")
        if self.cuda_graphs and self.strategy == "fsdp" and not self.fsdp_keep_params:
            raise ValueError("--cuda-graphs with --strategy fsdp needs --fsdp-keep-params: the graphs replay on "
                             "each GPU's gathered parameters, which then keep their memory between steps "
                             "(without it FSDP2 frees them after each forward and the graphs re-record every step)")
        if self.cuda_graphs and not self.module_student:
            raise ValueError("--cuda-graphs trains the module student: add --strategy ddp (one process is "
                             "then the plain model, no wrapper)")
        if self.strategy not in D.STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(D.STRATEGIES)}, got {self.strategy!r}")
        if self.teacher_cache and not self.data_dir:
            raise ValueError("--teacher-cache takes the KD target from the teacher outputs a capture "
                             "recorded: it needs --data DIR")
        if self.nproc < 1 or self.batch < 1:
            raise ValueError(f"--nproc and --batch must be ≥ 1, got {self.nproc} and {self.batch}")
        if self.batch > 1 and not self.module_student:
            raise ValueError("--batch > 1 needs the module student (--strategy ddp|fsdp): the program "
                             "student trains at the exported batch")

    @property
    def module_student(self) -> bool:
        return self.strategy != "auto" or self.nproc > 1
