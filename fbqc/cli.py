"""The ``fbqc`` command line: compile, train, export-diffusers, verify, inspect, list-passes, list-backends."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from .errors import UserError


def _fail(ctx: click.Context, e: BaseException) -> None:
    if ctx.find_root().params.get("debug"):
        traceback.print_exc()
    if sys.stderr.isatty():                      # start a fresh line after any progress bar
        click.echo("\r\033[K", nl=False, err=True)
    click.echo(f"error: {e}", err=True)
    ctx.exit(2 if isinstance(e, (UserError, click.UsageError)) else 1)


class _Group(click.Group):
    def parse_args(self, ctx, args):
        ctx.meta["fbqc.argv"] = list(args)          # what `fbqc train --nproc N` re-launches
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from . import signals

        signals.install()                          # SIGTERM ends a command as Ctrl-C does
        try:
            result = super().invoke(ctx)
            if signals.received is not None:       # a library swallowed the interrupt: still say so
                click.echo("\ninterrupted (the command had finished: what it wrote is complete)", err=True)
                ctx.exit(signals.exit_code())
            return result
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (KeyboardInterrupt, signals.Stop) as e:
            click.echo(f"\ninterrupted{': ' + str(e) if str(e) else ''}", err=True)
            ctx.exit(signals.exit_code())
        except Exception as e:  # noqa: BLE001 - one clean line, traceback with --debug
            if signals.received is not None:     # a library wrapped the Ctrl-C in an error of its own
                click.echo("\ninterrupted", err=True)
                ctx.exit(signals.exit_code())
            _fail(ctx, _user_error(e))


def _user_error(e: Exception) -> Exception:
    """Errors a user can act on keep their message; a few well-known ones are rephrased."""
    from .pass_infra import PassError
    from .stage_contract import VerificationError

    if isinstance(e, (UserError, PassError, VerificationError, ValueError, OSError)):
        return UserError(str(e))
    if isinstance(e, MemoryError):
        return UserError("out of memory; try a smaller preset or fewer --calib-samples")
    return e


from .cli_options import _bits, _emit, _pairs, _progress, backend_flags  # noqa: E402 - shared by the commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="fbqc")
def main(debug: bool) -> None:
    """fbqc — fractional-bit quantization compiler for diffusion transformers (FraQAT)."""


@main.command()
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="Backend (see `fbqc list-backends`).")
@click.option("--bits", type=str, default="4", callback=_bits, show_default=True,
              help="Weight bits, fractional allowed, in [2, 16].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact directory [default: out/<model file stem>].")
@click.option("--preset", default=None, help="Passed to the model file as preset=NAME (e.g. tiny, full).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local diffusers checkpoint, passed to the model file as checkpoint=DIR.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Calibration samples (the paper uses 100).")
@click.option("--calib-data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Calibrate on captured teacher trajectories (a directory `fbqc capture` wrote): "
                   "--calib-samples records spread evenly over denoising steps, prompts and guidance "
                   "branches; the manifest records which.")
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
@backend_flags("compile")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; just the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def compile(ctx, model_file, target, bits, output, preset, checkpoint, calib_samples, observer, scheme,
            include, exclude, layer_bits, a16, force, dry_run, verify_each, print_after_change, quiet,
            as_json, calib_data=None, **backend_kw):
    """Compile MODEL_FILE (model()/example_inputs()) to a quantized artifact for --target.

    MODEL_FILE may also be a training run directory (`fbqc train -o RUN`): the model file, bits and
    layer flags come from the run, -o defaults to out/<run name>."""
    from .pipeline import CompileOptions, compile_model
    from .plugins import split_flags
    from .summaries import compile_summary

    target_options = split_flags("compile", target, backend_kw, "")   # --soc for --target cpu: an error
    if model_file.is_dir():                      # a training run (fbqc train): fbqc.qat.model_file.compile_run
        from .qat.model_file import RUN_FLAGS, compile_run

        if dry_run:
            raise UserError("--dry-run takes a model file, not a training run directory")
        given = {k: ctx.params[k] for k in RUN_FLAGS
                 if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        log = (lambda s: None) if (quiet or as_json) else (lambda s: click.echo(s, err=True))
        result = compile_run(model_file, output or Path("out") / model_file.resolve().name, force=force,
                             progress=_progress(quiet or as_json), log=log, target=target,
                             calib_samples=calib_samples, observer=observer, verify_each=verify_each,
                             print_after_change=print_after_change, target_options=target_options,
                             calib_data=str(calib_data) if calib_data else None, **given)
        _emit(ctx, result, compile_summary(result))
        return

    opts = CompileOptions(target=target, bits=bits, scheme=scheme, observer=observer,
                          calib_samples=calib_samples, include=tuple(include) or None,
                          exclude=tuple(exclude), layer_bits=layer_bits, a16=tuple(a16),
                          preset=preset, checkpoint=str(checkpoint) if checkpoint else None,
                          verify_each=verify_each, print_after_change=print_after_change,
                          target_options=target_options, calib_data=str(calib_data) if calib_data else None)
    quiet = quiet or as_json
    if dry_run:
        from .pipeline import plan
        from .summaries import plan_summary

        result = plan(model_file, opts)
        _emit(ctx, result, plan_summary(result))
        return
    out = output or Path("out") / model_file.stem
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    result = compile_model(model_file, out, opts, force=force, progress=_progress(quiet), log=log)
    _emit(ctx, result, compile_summary(result))


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
    from .qat.rundir.export import export_diffusers as export

    summary = export(run_dir, out, force=force)
    _emit(ctx, summary, f"wrote {summary['out']}: {summary['model']}, {summary['layers']} layers at "
                        f"{'/'.join(f'{b:g}' for b in summary['bits'])} bits (weights fake-quantized, "
                        f"activations float); load it with {summary['model']}.from_pretrained")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all-layers", is_flag=True, help="List every layer, not only the worst.")
@backend_flags("verify")
@click.pass_context
def verify(ctx, artifact, as_json, all_layers, **backend_kw):
    """Re-run ARTIFACT on its backend and compare with the fake-quant model, per layer and end to end.

    htp artifacts: every layer is checked teacher-forced on the HTP simulator; the whole model (end to
    end, free-running) too when that is estimated short, else sampled transformer blocks (each compiled
    on its own). The plan and its time estimate are printed (stderr) before the simulator starts."""
    from .artifact_verify import agrees, summary_text, verify_artifact

    log = None if as_json else (lambda s: click.echo(s, err=True))
    result = verify_artifact(artifact, log=log, **backend_kw)
    _emit(ctx, result, summary_text(result, all_layers))     # the backend's own report where it has one
    if not agrees(result):
        ctx.exit(1)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also keep the backend's raw profile CSV here (htp: QNN EP profiling_level=detailed; with "
                   "--blocks one per block, named CSV_STEM.<block>.csv).")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@backend_flags("profile")
@click.pass_context
def profile(ctx, artifact, csv_path, as_json, **backend_kw):
    """Simulated cost of ARTIFACT on its target: cycles per op type and in total, on its example inputs
    (backends with a profile: htp).

    htp: without --blocks/--sample the whole context binary is profiled (a full-size model takes long);
    with them, sampled transformer blocks, and the whole model's block cycles are estimated from them."""
    from .artifact_verify import profile_artifact

    log = None if as_json else (lambda s: click.echo(s, err=True))
    result, text = profile_artifact(artifact, csv_path, log=log, **backend_kw)
    _emit(ctx, result, text)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def inspect(ctx, artifact, as_json):
    """Show an artifact's layers, bits, sizes and stage history."""
    from .artifact import read_manifest
    from .summaries import inspect_summary

    from .artifact import check_hashes

    manifest = read_manifest(artifact)
    bad = check_hashes(artifact, manifest)
    text = inspect_summary(manifest)
    if bad:
        text += f"\nDAMAGED: {', '.join(bad)} missing or changed since compile (see the manifest's hashes)"
    _emit(ctx, {**manifest, "damaged_files": bad}, text)
    if bad:
        ctx.exit(1)


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
    from .plugins import describe_all

    rows = describe_all()
    text = "\n".join(f"{r['name']:<8} {r['version']:<36} {r['entry_point']:<32} {r['description']}"
                     for r in rows) or "no backends installed"
    _emit(ctx, rows, text)


# ---- commands defined in their own modules (each adds itself here with main.add_command) ----------
from .cli_train import train as _train; main.add_command(_train)  # noqa: E402,E702
from .cli_eval import eval_cmd as _eval; main.add_command(_eval, "eval")  # noqa: E402,E702
from .cli_capture import capture as _capture; main.add_command(_capture)  # noqa: E402,E702


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
