"""``fbqc capture``: the command line of :func:`fbqc.capture.capture` (imports torch only when run)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_options import _progress


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _text(r: dict) -> str:
    if r["status"] == "dry-run":
        return "\n".join([
            f"dry run (nothing written): 1 prompt run at {r['probe_steps']} step(s), extrapolated to {r['steps']}",
            f"  records per prompt   {r['records_per_prompt']}  ({r['steps']} steps x {len(r['branches'])} "
            f"branch(es): {', '.join(r['branches'])})",
            f"  stored once a prompt {', '.join(r['per_prompt_keys']) or '-'} + final latents",
            f"  bytes per prompt     {_size(r['bytes_per_prompt'])}  ({_size(r['bytes_per_step'])} per step, "
            f"image {_size(r['image_bytes'])})",
            f"  total for {r['prompts']} prompts {_size(r['bytes_total'])}  ({r['records']} records)",
            f"  time                 {r['seconds_per_transformer_call']:.3f} s per transformer call, "
            f"~{r['seconds_per_prompt']:.1f} s per prompt, ~{r['seconds_total']:.0f} s in all"])
    done = "complete" if r["complete"] else f"incomplete ({r['prompts']} of {r['requested']}; rerun to continue)"
    head = "already complete, nothing to do" if r["status"] == "complete" else f"captured {r['prompts_this_run']} prompt(s)"
    per = f"{r['seconds_per_prompt']:.2f} s per prompt" if r["seconds_per_prompt"] else "-"
    return "\n".join([
        f"{head}: {r['directory']}",
        f"  prompts   {r['prompts']} of {r['requested']}, {done}",
        f"  records   {r['records']}  ({r['steps']} steps x {len(r['branches'] or [])} branch(es): "
        f"{', '.join(r['branches'] or [])})",
        f"  size      {_size(r['bytes'])}",
        f"  time      {r['seconds']:.1f} s  ({per})"])


@click.command("capture")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Prompt file, one prompt a line (# comments) [default: prompts/calib.txt next to MODEL_FILE].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Capture directory [default: data/<model file stem>]; an existing capture is resumed.")
@click.option("--preset", default=None, help="Passed to the model file as preset=NAME (e.g. tiny, full).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local diffusers pipeline directory, passed to the model file as checkpoint=DIR.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Denoising steps [default: the model file's generation_defaults(), else the pipeline's].")
@click.option("--guidance", type=float, default=None, help="Guidance scale (> 1: classifier-free guidance).")
@click.option("--resolution", default=None, help="Image size HxW or N (e.g. 512x512).")
@click.option("--seed-offset", type=int, default=0, show_default=True,
              help="Added to each prompt's seed (sha256 of index and prompt).")
@click.option("--dry-run", is_flag=True, help="Run one prompt at 2 steps and print bytes and time "
              "per prompt and in all; writes nothing.")
@click.option("--force", is_flag=True, help="Replace the output directory if it is an fbqc capture.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def capture(model_file, prompts, output, preset, checkpoint, num_prompts, steps, guidance, resolution,
            seed_offset, dry_run, force, quiet, as_json):
    """Run MODEL_FILE's float pipeline() on prompts; record every transformer call (inputs and output,
    split into cond/uncond), the final latents and the images into a resumable capture directory."""
    from .capture import capture as run

    out = output or Path("data") / (Path(model_file).stem + (f"-{preset}" if preset else ""))
    result = run(model_file, prompts, None if dry_run else out, preset=preset, checkpoint=checkpoint,
                 num_prompts=num_prompts, steps=steps, guidance=guidance, resolution=resolution,
                 seed_offset=seed_offset, dry_run=dry_run, force=force, progress=_progress(quiet or as_json),
                 log=(lambda s: None) if (quiet or as_json) else (lambda s: click.echo(s, err=True)))
    click.echo(json.dumps(result, indent=2) if as_json else _text(result))
