"""The ``fbqc`` command line: compile, verify, inspect, list-passes, list-backends."""
from __future__ import annotations

import json
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
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
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
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; just the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def compile(ctx, model_file, target, bits, output, preset, checkpoint, calib_samples, observer, scheme,
            include, exclude, layer_bits, a16, force, dry_run, verify_each, print_after_change, quiet,
            as_json):
    """Compile MODEL_FILE (model()/example_inputs()) to a quantized artifact for --target."""
    from .pipeline import CompileOptions, compile_model
    from .report import compile_summary

    opts = CompileOptions(target=target, bits=bits, scheme=scheme, observer=observer,
                          calib_samples=calib_samples, include=tuple(include) or None,
                          exclude=tuple(exclude), layer_bits=layer_bits, a16=tuple(a16),
                          preset=preset, checkpoint=str(checkpoint) if checkpoint else None,
                          verify_each=verify_each, print_after_change=print_after_change)
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


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all-layers", is_flag=True, help="List every layer, not only the worst.")
@click.pass_context
def verify(ctx, artifact, as_json, all_layers):
    """Re-run ARTIFACT on its backend and compare with the fake-quant model, per layer and end to end."""
    from .report import verify_summary
    from .verification import verify_artifact

    result = verify_artifact(artifact)
    _emit(ctx, result, verify_summary(result, all_layers))
    if not result["summary"]["exact"]:
        ctx.exit(1)


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
