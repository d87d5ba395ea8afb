"""The ``fbqc`` command line: compile, train, export-diffusers, verify, inspect, list-passes, list-backends."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from .errors import UserError


def _fail(ctx: click.Context, e: BaseException) -> None:
    if ctx.find_root().params.get("debug"):
        traceback.print_exc()
    click.echo(f"error: {e}", err=True)
    ctx.exit(2 if isinstance(e, (UserError, click.UsageError)) else 1)


class _Group(click.Group):
    def parse_args(self, ctx, args):
        ctx.meta["fbqc.argv"] = list(args)          # what `fbqc train --nproc N` re-launches
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # noqa: BLE001 - one clean line, traceback with --debug
            _fail(ctx, _user_error(e))


def _user_error(e: Exception) -> Exception:
    """Errors a user can act on keep their message; a few well-known ones are rephrased."""
    from .pass_infra import PassError
    from .verifier import VerificationError

    if isinstance(e, (UserError, PassError, VerificationError, ValueError, OSError)):
        return UserError(str(e))
    if isinstance(e, MemoryError):
        return UserError("out of memory; try a smaller preset or fewer --calib-samples")
    return e


def _bits(ctx, param, value):
    if value is None:
        return None
    from .quant_math import check_bits
    try:
        return check_bits(value, "--bits")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _pairs(ctx, param, values) -> dict[str, float]:
    out = {}
    from .quant_math import check_bits
    for v in values:
        pattern, sep, bits = v.rpartition("=")
        if not sep or not pattern:
            raise click.BadParameter(f"{v!r}: expected PATTERN=BITS, e.g. 'proj_out=8'")
        try:
            out[pattern] = check_bits(bits, f"bits for {pattern!r}")
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return out


def _emit(ctx: click.Context, data: Any, text: str) -> None:
    if ctx.find_root().params.get("as_json") or ctx.params.get("as_json"):
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="fbqc")
def main(debug: bool) -> None:
    """fbqc — fractional-bit quantization compiler for diffusion transformers (FraQAT)."""


@main.command()
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="Backend (see `fbqc list-backends`).")
@click.option("--bits", type=str, default="4", callback=_bits, show_default=True,
              help="Weight bits, fractional allowed, in (1, 16].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact directory [default: out/<model file stem>].")
@click.option("--preset", default=None, help="Passed to the model file as preset=NAME (e.g. tiny, full).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local diffusers checkpoint, passed to the model file as checkpoint=DIR.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Calibration samples (the paper uses 100).")
@click.option("--observer", type=click.Choice(["3sigma", "minmax"]), default="3sigma", show_default=True,
              help="Activation range: mean±3σ clipped to min/max, or min/max.")
@click.option("--scheme", type=click.Choice(["narrow", "wide"]), default="narrow", show_default=True,
              help="Weight range: symmetric narrow or asymmetric wide.")
@click.option("--include", multiple=True, help="Regex on module paths to quantize (repeatable) "
              "[default: every linear / 1x1 conv inside *blocks.N.].")
@click.option("--exclude", multiple=True, help="Regex on module paths to keep float (repeatable).")
@click.option("--layer-bits", multiple=True, callback=_pairs,
              help="PATTERN=BITS per-layer weight bits, e.g. 'proj_out=8' (repeatable; quantizes the "
                   "named layers even outside --include).")
@click.option("--a16", multiple=True, help="Regex of layers kept at 16-bit activations (W?A16).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--dry-run", is_flag=True, help="Export and annotate only: list layers and bits and the "
              "memory a full compile needs (works for models built on the meta device); writes nothing.")
@click.option("--verify-each", is_flag=True, help="Run the stage verifier after every pass.")
@click.option("--print-after-change", is_flag=True, help="Print the graph after every pass that changed it.")
@click.option("--emit-c", is_flag=True, help="cpu: also write standalone C99 reference code (c/*.c, "
              "weights.bin, inputs.bin, README.md) that builds with any C compiler; fbqc verify runs it.")
@click.option("--c-flags", default=None, help="C compiler flags recorded for --emit-c (README, fbqc verify) "
              "[default: -O2 -std=c99 -ffp-contract=off].")
@click.option("--soc", default=None, help="htp: target Snapdragon SoC, SM8750 (8 Elite, v79; default), "
              "SM8650 (v75) or SM8550 (v73).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; just the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def compile(ctx, model_file, target, bits, output, preset, checkpoint, calib_samples, observer, scheme,
            include, exclude, layer_bits, a16, force, dry_run, verify_each, print_after_change, quiet,
            as_json, emit_c=False, c_flags=None, soc=None):
    """Compile MODEL_FILE (model()/example_inputs()) to a quantized artifact for --target.

    MODEL_FILE may also be a training run directory (`fbqc train -o RUN`): the model file, bits and
    layer flags come from the run, -o defaults to out/<run name>."""
    from .pipeline import CompileOptions, compile_model
    from .report import compile_summary

    if model_file.is_dir():                      # a training run (fbqc train): fbqc.qat.run.compile_run
        from .qat.run import RUN_FLAGS, compile_run

        if dry_run:
            raise UserError("--dry-run takes a model file, not a training run directory")
        given = {k: ctx.params[k] for k in RUN_FLAGS
                 if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        log = (lambda s: None) if (quiet or as_json) else (lambda s: click.echo(s, err=True))
        result = compile_run(model_file, output or Path("out") / model_file.resolve().name, force=force,
                             progress=not (quiet or as_json), log=log, target=target,
                             calib_samples=calib_samples, observer=observer, verify_each=verify_each,
                             print_after_change=print_after_change, emit_c=emit_c, c_flags=c_flags,
                             soc=soc, **given)
        _emit(ctx, result, compile_summary(result))
        return

    opts = CompileOptions(target=target, bits=bits, scheme=scheme, observer=observer,
                          calib_samples=calib_samples, include=tuple(include) or None,
                          exclude=tuple(exclude), layer_bits=layer_bits, a16=tuple(a16),
                          preset=preset, checkpoint=str(checkpoint) if checkpoint else None,
                          verify_each=verify_each, print_after_change=print_after_change,
                          emit_c=emit_c, c_flags=c_flags, soc=soc)
    if (emit_c or c_flags) and target != "cpu":
        raise UserError(f"--emit-c/--c-flags are options of the cpu backend, not of --target {target}")
    if soc and target != "htp":
        raise UserError(f"--soc is an option of the htp backend, not of --target {target}")
    quiet = quiet or as_json
    if dry_run:
        from .pipeline import plan
        from .report import plan_summary

        result = plan(model_file, opts)
        _emit(ctx, result, plan_summary(result))
        return
    out = output or Path("out") / model_file.stem
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    result = compile_model(model_file, out, opts, force=force, progress=not quiet, log=log)
    _emit(ctx, result, compile_summary(result))
    if emit_c:
        from fbqc.backends.cpu.c_emit import build_command, normalize_cflags

        log(f"C reference: {build_command(normalize_cflags(c_flags), str(out))} && "
            f"{out}/run {out}/inputs.bin {out}/outputs.bin   (see {out}/README.md)")


@main.command()
@click.argument("model_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--schedule", default=None, help="fractional | integer | simple | direct, or BITS:PARTS,… "
              "e.g. '8:1,5.5:1,4:3'  [default: fractional]")
@click.option("--bits", type=str, default=None, callback=_bits,
              help="Target weight bits: replaces the final 4 of a named schedule  [default: 4]")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps  [default: 1000]")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: runs/<model file stem>].")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue the run in this directory (bit-exact), with its own settings.")
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
@click.option("--lr", type=click.FloatRange(min=0), default=1e-5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--clip", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Gradient-norm clipping (0: off).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--act-quant", type=click.Choice(["dynamic", "static", "none"]), default="dynamic",
              show_default=True, help="Activations while training: per-sample dynamic INT8 (the paper's "
              "GPU setting), static calibrated scales, or float.")
@click.option("--all-params", is_flag=True, help="Train every parameter, not only the transformer blocks'.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Checkpoint every N steps (also at each bit-width change and at the end).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (bf16 autocast, fused AdamW).")
@click.option("--seed", type=int, default=0, show_default=True)
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
              "CUDA graphs (no CPU launch cost per kernel; more memory).")
@click.option("--profile", "use_profile", is_flag=True, help="Profile steps 6–8 (PyTorch profiler) into "
              "RUN/profile/: per process, a table of the slowest ops/kernels and a Chrome trace.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; just the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def train(ctx, model_file, schedule, bits, steps, output, resume, force, lr, warmup, clip, weight_decay,
          act_quant, all_params, checkpoint_every, device, seed, use_compile, preset, checkpoint, scheme,
          include, exclude, layer_bits, a16, nproc, strategy, batch, checkpoint_blocks, grad_reduce,
          fsdp_keep_params, fsdp_replicate_teacher, fsdp_unit, ddp_bucket_mb, cuda_graphs, use_profile, stop_after, quiet, as_json):
    """Scheduled fractional-bit QAT of MODEL_FILE, distilled from its float model (resumable).

    With --nproc N (N > 1) fbqc re-launches itself in N processes through torchrun.
    """
    import shutil

    from .pipeline import CompileOptions
    from .qat import dist
    from .qat.run import train_model_file
    from .qat.config import EXECUTION, TrainConfig
    from .qat.summary import summary_text

    child = dist.under_torchrun()                 # one of the processes `--nproc N` launched
    if child:
        nproc = int(os.environ["WORLD_SIZE"])
    quiet = quiet or as_json or (child and os.environ["RANK"] != "0")
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    if resume is not None:
        keep = {"model_file", "resume", "steps", "schedule", "quiet", "as_json", "stop_after", "output",
                "use_profile", *EXECUTION}
        changed = [k for k in ctx.params if k not in keep
                   and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
        if changed:
            raise UserError(f"--resume continues with the run's own settings; drop "
                            f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
        if output is not None and output.resolve() != resume.resolve():
            raise UserError(f"--resume {resume} writes into that run; drop -o {output}")
        out = resume
        kw = {}
    else:
        if model_file is None:
            raise UserError("fbqc train needs a MODEL_FILE (or --resume RUN_DIR)")
        out = output or Path("runs") / model_file.stem
        if not child and out.exists() and any(out.iterdir()):     # the launcher checked it for its children
            if not force:
                raise UserError(f"run directory {out} exists; pass --resume {out} to continue it or "
                                f"--force to replace it")
            shutil.rmtree(out)
        opts = CompileOptions(scheme=scheme, include=tuple(include) or None, exclude=tuple(exclude),
                              layer_bits=layer_bits, a16=tuple(a16), preset=preset,
                              checkpoint=str(checkpoint) if checkpoint else None)
        kw = dict(opts=opts, bits=bits, lr=lr, warmup=warmup, clip=clip, weight_decay=weight_decay,
                  act_quant=act_quant, blocks_only=not all_params, checkpoint_every=checkpoint_every,
                  device=device, seed=seed, compile=use_compile, batch=batch)
    execution = {**{k: ctx.params[k] for k in EXECUTION if k in ctx.params}, "nproc": nproc}   # not compile
    if resume is None:                            # the settings, checked before any process starts
        TrainConfig(**{k: v for k, v in {**kw, **execution}.items() if k in TrainConfig.__dataclass_fields__}).check()
    if nproc > 1 and not child:                   # everything is checked: run N processes of this command
        argv = dist.strip_option(ctx.find_root().meta.get("fbqc.argv"), "--nproc")
        ctx.exit(dist.launch(nproc, [a for a in argv if a != "--force"]))
    kw.update({k: v for k, v in execution.items() if resume is None
               or ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE})
    kw["profile"] = use_profile                   # this command's, also on --resume
    result = train_model_file(model_file, out, schedule=schedule, steps=steps, resume=resume is not None,
                              progress=not quiet, log=log, stop_after=stop_after, report=False, **kw)
    if os.environ.get("RANK", "0") == "0":
        _emit(ctx, result.summary, summary_text(result.summary, out))


@main.command("export-diffusers")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def export_diffusers(ctx, run_dir, out, force, as_json):
    """Write the trained student of RUN_DIR to OUT as a diffusers checkpoint (save_pretrained).

    Quantized layers hold their fake-quantized weights (on the W-bit grid, stored fp32); activations
    stay float. OUT/fbqc_quant.json lists the layers and their specs.
    """
    from .qat.export import export_diffusers as export

    summary = export(run_dir, out, force=force)
    _emit(ctx, summary, f"wrote {summary['out']}: {summary['model']}, {summary['layers']} layers at "
                        f"{'/'.join(f'{b:g}' for b in summary['bits'])} bits (weights fake-quantized, "
                        f"activations float); load it with {summary['model']}.from_pretrained")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all-layers", is_flag=True, help="List every layer, not only the worst.")
@click.pass_context
def verify(ctx, artifact, as_json, all_layers):
    """Re-run ARTIFACT on its backend and compare with the fake-quant model, per layer and end to end."""
    from .verification import summary_text
    from .verification import verify_artifact

    result = verify_artifact(artifact)
    text = summary_text(result, all_layers)          # a backend may format its own report (htp)
    if "emitted_c" in result:                   # cpu artifacts compiled with --emit-c
        from fbqc.backends.cpu.c_emit.check import describe

        text += "\n" + describe(result["emitted_c"])
    _emit(ctx, result, text)
    if not result["summary"]["exact"] or result.get("emitted_c", {}).get("exact") is False:
        ctx.exit(1)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also keep the raw profile CSV (QNN EP profiling_level=detailed) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@click.pass_context
def profile(ctx, artifact, csv_path, as_json):
    """Simulated cost of ARTIFACT: HTP cycles per op type and in total, on its example inputs (htp)."""
    from .verification import profile_artifact

    result, text = profile_artifact(artifact, csv_path)
    _emit(ctx, result, text)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def inspect(ctx, artifact, as_json):
    """Show an artifact's layers, bits, sizes and stage history."""
    from .artifact import read_manifest
    from .report import inspect_summary

    manifest = read_manifest(artifact)
    _emit(ctx, manifest, inspect_summary(manifest))


@main.command("list-passes")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_passes(ctx, as_json):
    """The passes of the default pipeline, in order, with the stages they require and produce."""
    from fbqc.passes import PASSES

    rows = [{"name": p.__name__, "requires": "/".join(str(s) for s in
             (p.requires if isinstance(p.requires, tuple) else (p.requires,))),
             "produces": str(p.produces), "in_place": p.in_place, "summary": p.summary()} for p in PASSES]
    text = "\n".join(f"{r['name']:<16} {r['requires']:>20} → {r['produces']:<10}  {r['summary']}"
                     for r in rows)
    _emit(ctx, rows, text)


@main.command("list-backends")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_backends(ctx, as_json):
    """Installed backends (entry-point group fbqc.backends) with their versions."""
    from fbqc.backends import describe_all

    rows = describe_all()
    text = "\n".join(f"{r['name']:<8} {r['version']:<36} {r['entry_point']:<32} {r['description']}"
                     for r in rows) or "no backends installed"
    _emit(ctx, rows, text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
