"""``fbqc train``: scheduled fractional-bit QAT of a model file (its own module: the command has many
flags, and the CLI module stays small)."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .cli_options import _bits, _emit, _pairs, _progress
from .errors import UserError


@click.command()
@click.argument("model_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--schedule", default=None, help="fractional | integer | simple | direct | continuous (8→4 ramp, then 4), "
              "NAME@SHARE (the final bits' share of the steps, e.g. fractional@0.3), or phases BITS:PARTS / "
              "FROM..TO:PARTS (a linear ramp), e.g. '8:1,5.5:1,4:3' or '8..4:11,4:14'  [default: fractional]")
@click.option("--bits", type=str, default=None, callback=_bits,
              help="Target weight bits: replaces the final 4 of a named schedule  [default: 4]")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps  [default: 1000]")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: runs/<model file stem>].")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue the run in this directory (bit-exact), with its own settings.")
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
@click.option("--lr", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="AdamW learning rate.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--rewarm", type=click.IntRange(min=0), default=0, show_default=True,
              help="At each bit change of the schedule, ramp the lr up again: the k-th step at the new bits "
              "trains at lr × k/N for k ≤ N (on top of --warmup; 0: off).")
@click.option("--moments", type=click.Choice(["keep", "reset", "momentum"]), default="keep", show_default=True,
              help="At each bit change of the schedule, AdamW's moments: keep them, reset them (both moments "
              "and the step count: a fresh AdamW) or zero only the first moment (momentum).")
@click.option("--clip", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Gradient-norm clipping (0: off).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="AdamW weight decay.")
@click.option("--act-quant", type=click.Choice(["dynamic", "static", "none"]), default="dynamic",
              show_default=True, help="Activations while training: per-sample dynamic INT8 (the paper's "
              "GPU setting), static calibrated scales, or float.")
@click.option("--all-params", is_flag=True, help="Train every parameter, not only the transformer blocks'.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Checkpoint every N steps (also at each bit-width change and at the end).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (bf16 autocast, fused AdamW).")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Train on captured teacher trajectories (a directory `fbqc capture` wrote): every "
                   "record, reshuffled each epoch from --seed; each of --nproc processes reads only its "
                   "own records [default: the model file's training_data(), else data-free samples].")
@click.option("--teacher-cache", is_flag=True, help="With --data: the KD target is the teacher output "
              "recorded in the capture; no teacher is built or run (less memory, a faster step).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the data order, data-free samples and RNG (same seed: same run).")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the student (one graph for "
              "every bit-width).")
@click.option("--preset", default=None, help="Passed to the model file as preset=NAME.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local diffusers checkpoint, passed to the model file as checkpoint=DIR.")
@click.option("--scheme", type=click.Choice(["narrow", "wide"]), default="narrow", show_default=True)
@click.option("--include", multiple=True, help="Regex on module paths to quantize (repeatable).")
@click.option("--exclude", multiple=True, help="Regex on module paths to keep float (repeatable).")
@click.option("--layer-bits", multiple=True, callback=_pairs,
              help="PATTERN=BITS: layers that keep these bits instead of following the schedule.")
@click.option("--a16", multiple=True, help="Regex of layers kept at 16-bit activations.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes (one per GPU with --device cuda), launched through torchrun; > 1 trains "
              "the module student data-parallel (global batch = the model file's batch).")
@click.option("--strategy", type=click.Choice(["auto", "ddp", "fsdp"]), default="auto", show_default=True,
              help="ddp: replicate; fsdp: FSDP2 fully_shard per transformer block (teacher too). auto: "
              "ddp when --nproc > 1, else the one-process program student.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples of the model file's data per step (the global batch; module student), split "
              "over the --nproc processes.")
@click.option("--checkpoint-blocks", is_flag=True, help="Activation checkpointing per transformer block "
              "(module student: --strategy ddp|fsdp).")
@click.option("--grad-reduce", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Average gradients across processes in fp32 or bf16 (half the traffic; the optimizer "
              "stays fp32). CUDA only.")
@click.option("--fsdp-keep-params", is_flag=True, help="FSDP2: keep each block's gathered parameters "
              "from forward to backward (no second all-gather; more memory: the whole fp32 student).")
@click.option("--fsdp-replicate-teacher", is_flag=True, help="FSDP2: a whole frozen teacher (bf16 on CUDA) "
              "in each process instead of a sharded one (no teacher all-gathers; more memory).")
@click.option("--fsdp-unit", type=click.IntRange(min=1), default=1, show_default=True,
              help="FSDP2: consecutive transformer blocks per unit (fewer, larger collectives and hooks).")
@click.option("--ddp-bucket-mb", type=click.FloatRange(min=0, min_open=True), default=400, show_default=True,
              help="DDP: size of the gradient buckets all-reduced while backward runs (smaller: an earlier "
              "start and a shorter tail; larger: fewer collectives).")
@click.option("--cuda-graphs", is_flag=True, help="With --compile on CUDA: replay the compiled graphs as "
              "CUDA graphs (no CPU launch cost per kernel; more memory). With --strategy fsdp it needs "
              "--fsdp-keep-params: each GPU's gathered parameters then keep their memory between steps.")
@click.option("--profile", "use_profile", is_flag=True, help="Profile steps 6–8 (PyTorch profiler) into "
              "RUN/profile/: per process, a table of the slowest ops/kernels and a Chrome trace.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; just the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def train(ctx, model_file, schedule, bits, steps, output, resume, force, lr, warmup, rewarm, moments, clip,
          weight_decay, act_quant, all_params, checkpoint_every, device, seed, use_compile, preset, checkpoint, scheme,
          include, exclude, layer_bits, a16, nproc, strategy, batch, checkpoint_blocks, grad_reduce,
          fsdp_keep_params, fsdp_replicate_teacher, fsdp_unit, ddp_bucket_mb, cuda_graphs, use_profile, stop_after, quiet, as_json,
          data=None, teacher_cache=False):
    """Scheduled fractional-bit QAT of MODEL_FILE, distilled from its float model (resumable).

    With --nproc N (N > 1) fbqc re-launches itself in N processes through torchrun.
    """
    import contextlib

    from .outputs import check_writable, output_lock, remove_own
    from .pipeline import CompileOptions
    from .qat.parallel import dist
    from .qat.config import EXECUTION, TrainConfig
    from .qat.preflight import check_train_command

    child = dist.under_torchrun()                 # one of the processes `--nproc N` launched
    if child:
        nproc = int(os.environ["WORLD_SIZE"])
    quiet = quiet or as_json or (child and os.environ["RANK"] != "0")
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    if resume is not None:
        keep = {"model_file", "resume", "steps", "schedule", "quiet", "as_json", "stop_after", "output",
                "use_profile", *EXECUTION}
        given = [k for k in ctx.params if k not in keep
                 and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
        changed = _differing(given, ctx.params, resume) if given else []
        if changed:
            raise UserError(f"--resume continues with the run's own settings; drop "
                            f"{', '.join('--' + k.replace('_', '-') for k in changed)} (the run has "
                            f"other values)")
        if output is not None and output.resolve() != resume.resolve():
            raise UserError(f"--resume {resume} writes into that run; drop -o {output}")
        out, kw, replace = resume, {}, False
    else:
        if model_file is None:
            raise UserError("fbqc train needs a MODEL_FILE (or --resume RUN_DIR)")
        out = output or Path("runs") / model_file.stem
        replace = not child and out.exists() and any(out.iterdir())   # the launcher checks for its children
        if replace and not force:
            if not (out / "checkpoint.pt").is_file():
                raise UserError(f"run directory {out} exists but holds no checkpoint (stopped before its "
                                f"first one); pass --force to start it again")
            raise UserError(f"run directory {out} exists; pass --resume {out} to continue it or "
                            f"--force to replace it")
        if not child:
            check_writable(out, True, "run")        # --force replaces only an fbqc run; nothing deleted yet
        opts = CompileOptions(scheme=scheme, include=tuple(include) or None, exclude=tuple(exclude),
                              layer_bits=layer_bits, a16=tuple(a16), preset=preset,
                              checkpoint=str(checkpoint) if checkpoint else None)
        kw = dict(opts=opts, bits=bits, lr=lr, warmup=warmup, rewarm=rewarm, moments=moments, clip=clip,
                  weight_decay=weight_decay, act_quant=act_quant, blocks_only=not all_params,
                  checkpoint_every=checkpoint_every, device=device, seed=seed, compile=use_compile, batch=batch,
                  data_dir=str(data.resolve()) if data is not None else None, teacher_cache=teacher_cache)
    execution = {**{k: ctx.params[k] for k in EXECUTION if k in ctx.params}, "nproc": nproc}   # not compile
    if resume is None:                            # the settings, checked before any process starts
        TrainConfig(**{k: v for k, v in {**kw, **execution}.items() if k in TrainConfig.__dataclass_fields__}).check()
        if not child:
            check_train_command(model_file, opts, schedule, steps, bits)
    with contextlib.nullcontext() if child else output_lock(out):
        if resume is None and replace:            # every check passed: only now the old run goes
            remove_own(out, "run")
        if nproc > 1 and not child:               # everything is checked: run N processes of this command
            argv = dist.strip_option(ctx.find_root().meta.get("fbqc.argv"), "--nproc")
            ctx.exit(dist.launch(nproc, [a for a in argv if a != "--force"]))
        _train(ctx, model_file, out, schedule, steps, resume, stop_after, quiet, log, kw, execution, use_profile)


def _train(ctx, model_file, out, schedule, steps, resume, stop_after, quiet, log, kw, execution, use_profile):
    from .qat.model_file import train_model_file
    from .qat.rundir.summary import summary_text

    kw.update({k: v for k, v in execution.items() if resume is None
               or ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE})
    kw["profile"] = use_profile                   # this command's, also on --resume
    result = train_model_file(model_file, out, schedule=schedule, steps=steps, resume=resume is not None,
                              progress=_progress(quiet), log=log, stop_after=stop_after, report=False, **kw)
    if os.environ.get("RANK", "0") == "0":
        _emit(ctx, result.summary, summary_text(result.summary, out))


#: train options whose run.json name differs (value maps included)
_RUN_NAMES = {"all_params": ("blocks_only", lambda v: not v), "use_compile": ("compile", bool),
              "data": ("data_dir", lambda v: str(Path(v).resolve()) if v is not None else None)}
_SOURCE_FLAGS = ("scheme", "include", "exclude", "layer_bits", "a16", "preset", "checkpoint")


def _differing(given: list[str], params: dict, run_dir: Path) -> list[str]:
    """The given options whose value is not the run's own (repeating the run's own flags is fine)."""
    from dataclasses import asdict

    from .qat.config import TrainConfig
    from .qat.rundir import checkpoint as ck

    run = ck.read_run(run_dir)
    train, flags = run.get("train", {}), run.get("source", {}).get("flags", {})
    defaults = asdict(TrainConfig())

    def norm(v):
        if isinstance(v, (tuple, list)):
            return [norm(x) for x in v] or None
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()} or None
        if isinstance(v, Path):
            return str(v)
        return v

    out = []
    for k in given:
        v = params[k]
        if k == "bits":
            ours = train.get("bits") if train.get("bits") is not None else flags.get("bits")
        elif k in _SOURCE_FLAGS:
            ours = flags.get(k)
        elif k in _RUN_NAMES:
            name, conv = _RUN_NAMES[k]
            ours, v = train.get(name), conv(v)
        else:                             # a run from before a setting existed: its default
            ours = train.get(k, defaults.get(k, object()))
        if norm(v) != norm(ours):
            out.append(k)
    return out
