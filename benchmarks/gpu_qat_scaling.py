"""Data-parallel QAT throughput: `fbqc train --nproc N` against one GPU, measured in the same run.

    python benchmarks/gpu_qat_scaling.py                  # Sana-1600M, batch 4 per GPU, 1024 tokens, 2 GPUs:
                                                          # ddp-cg and fsdp-keep-rt-u4-cg, the README's rows
    python benchmarks/gpu_qat_scaling.py --configs ddp,fsdp-keep --gpus 2 --json scaling.json --profile-dir prof
    python benchmarks/gpu_qat_scaling.py --preset tiny --device cpu --gpus 2 --steps 8 --skip 3   # smoke test

Every configuration is a real ``fbqc train`` command (``--compile --schedule direct --bits 4.5``, the
module student, fused fake quant, bf16 autocast, fused AdamW) in its own process(es), launched through
torchrun where ``--nproc`` > 1. The baseline is the same training on one GPU (no wrapper) at the
per-GPU batch; a configuration with N GPUs trains N times that global batch, so

    throughput ratio = (N × baseline s/step) / (s/step)         (≥ 1.8 on 2 GPUs is the target)

Step time is the mean over the logged steps after ``--skip`` (compilation happens in the first two),
and the median of their intervals beside it (``× median``: the same ratio of medians, which one stall
of the host — a 1.2 s step seen once in 22 — does not move);
each run is stopped once its log has ``--steps`` rows (the final checkpoint is not timed). Configs:

    ddp             DistributedDataParallel, gradients averaged in fp32
    ddp-bf16        the same, averaged in bf16 (``--grad-reduce bf16``)
    fsdp            FSDP2 ``fully_shard`` per block (parameters re-gathered for backward)
    fsdp-keep       FSDP2 keeping the gathered parameters until backward (``--fsdp-keep-params``)
    fsdp-keep-bf16  the same, gradients reduce-scattered in bf16
    fsdp-keep-rt    fsdp-keep with a whole bf16 teacher per GPU (``--fsdp-replicate-teacher``)
    NAME-uK         an fsdp config with K blocks per FSDP2 unit (``--fsdp-unit K``): fsdp-keep-rt-u4
    NAME-bMB        a ddp config with MB-megabyte gradient buckets (``--ddp-bucket-mb MB``): ddp-b25-cg
    NAME-cg         any of them with ``--cuda-graphs`` (compiled blocks replayed as CUDA graphs), against
                    a one-GPU baseline with CUDA graphs too ("1 GPU-cg"); an fsdp config needs -keep
                    (the gathered parameters then keep their memory, so the graphs replay)
    NAME@VAR=V+…    any of them with these environment variables set (NCCL settings: ``ddp-cg@NCCL_MAX_CTAS=8``)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "ddp": ["--strategy", "ddp"],
    "ddp-bf16": ["--strategy", "ddp", "--grad-reduce", "bf16"],
    "fsdp": ["--strategy", "fsdp"],
    "fsdp-keep": ["--strategy", "fsdp", "--fsdp-keep-params"],
    "fsdp-keep-bf16": ["--strategy", "fsdp", "--fsdp-keep-params", "--grad-reduce", "bf16"],
    "fsdp-keep-rt": ["--strategy", "fsdp", "--fsdp-keep-params", "--fsdp-replicate-teacher"],
}
#: NAME, then optional modifiers: -uK (K blocks per FSDP2 unit), -bMB (DDP bucket size), -cg, @VAR=V+VAR=V
SYNTAX = re.compile(r"(?P<base>[a-z0-9-]+?)(?:-u(?P<unit>\d+))?(?:-b(?P<mb>\d+))?(?P<cg>-cg)?(?:@(?P<env>.*))?")


def parse(config: str) -> tuple[list[str], dict[str, str], bool]:
    """``NAME[-uK][-bMB][-cg][@VAR=V+VAR=V]`` → (fbqc train flags, environment, CUDA graphs)."""
    m = SYNTAX.fullmatch(config)
    if m is None or m["base"] not in CONFIGS:
        raise KeyError(config)
    pairs = [e.partition("=") for e in (m["env"] or "").split("+") if e]
    if any(not k or not eq for k, eq, _ in pairs):
        raise KeyError(config)
    flags = [*CONFIGS[m["base"]], *(["--fsdp-unit", m["unit"]] if m["unit"] else []),
             *(["--ddp-bucket-mb", m["mb"]] if m["mb"] else []), *(["--cuda-graphs"] if m["cg"] else [])]
    return flags, {k: v for k, _, v in pairs}, bool(m["cg"])


def rows_of(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip().endswith("}")]


def run(name: str, extra: list[str], nproc: int, args, work: Path, env: dict | None = None) -> dict:
    """One ``fbqc train`` run, stopped once ``args.steps`` steps are logged; its step statistics."""
    out = work / name
    cmd = [sys.executable, "-m", "fbqc.cli", "train", args.model_file, "--preset", args.preset,
           "--device", args.device, "--schedule", "direct", "--bits", str(args.bits), "--steps", "1000",
           "--checkpoint-every", "0", "--lr", "1e-5", "-q", "--batch", str(args.batch * nproc),
           *(["--compile"] if args.compile else []), *(["--nproc", str(nproc)] if nproc > 1 else []),
           *(["--profile"] if args.profile_dir else []), *extra, "-o", str(out)]
    t0 = time.perf_counter()
    err = open(work / f"{name}.err", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                            cwd=work, env={**os.environ, **(env or {})})   # not the checkout: its fbqc/ is not the installed package
    try:
        while proc.poll() is None and len(rows_of(out / "log.jsonl")) < args.steps:
            if time.perf_counter() - t0 > args.timeout:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.close()
    rows = rows_of(out / "log.jsonl")[:args.steps]
    skipped = [line for line in (work / f"{name}.err").read_text().splitlines() if "skipping cudagraphs" in line]
    if args.profile_dir:                                 # fbqc train --profile: steps 6–8, per process
        dest = Path(args.profile_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for table in sorted((out / "profile").glob("rank*.txt")):
            shutil.copy(table, dest / f"{name.replace(' ', '-')}-{table.name}")
    result = {"config": name, "processes": nproc, "global_batch": args.batch * nproc, "steps": len(rows),
              "wall_s": round(time.perf_counter() - t0, 1), **({"cudagraphs_skipped": skipped[:3]} if skipped else {})}
    if len(rows) <= args.skip + 1:
        tail = (work / f"{name}.err").read_text().strip().splitlines()[-3:]
        print(f"  {name}: only {len(rows)} steps logged; stderr: {' | '.join(tail)}", file=sys.stderr)
        return result
    timed = rows[args.skip:]
    deltas = [b["seconds"] - a["seconds"] for a, b in zip(timed, timed[1:])]
    result.update(deltas=[round(d, 4) for d in deltas], step_s=(timed[-1]["seconds"] - timed[0]["seconds"]) / (len(timed) - 1),
                  median_s=statistics.median(deltas), peak_gib=rows[-1].get("peak_gib"),
                  loss_first=rows[0]["loss"], loss_last=rows[-1]["loss"])
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-file", default=str(ROOT / "examples" / "sana.py"))
    ap.add_argument("--preset", default="1600m")
    ap.add_argument("--batch", type=int, default=4, help="samples per GPU (1024 tokens each at 1600m)")
    ap.add_argument("--bits", type=float, default=4.5)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--configs", default="ddp-cg,fsdp-keep-rt-u4-cg",
                    help=f"comma-separated, of {', '.join(CONFIGS)}, each with the modifiers -uK, -bMB, -cg, "
                         f"@VAR=V (see the file's docstring)")
    ap.add_argument("--steps", type=int, default=30, help="logged steps per run")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per run at most")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-dir", default=None, help="also profile steps 6–8 of every run (fbqc train "
                    "--profile; outside the timed steps) and copy each process's table here")
    args = ap.parse_args(argv)
    if args.profile_dir and args.skip < 10:
        print("warning: --profile-dir profiles steps 6–8 and writes the trace after step 9; with --skip "
              f"{args.skip} they are timed (use --skip ≥ 10)", file=sys.stderr)
    configs, unknown = {}, []
    for c in args.configs.split(","):
        try:
            configs[c] = parse(c)
        except KeyError:
            unknown.append(c)
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)} (each also with the "
                 f"modifiers -uK, -bMB, -cg, @VAR=VALUE+VAR=VALUE, in this order)")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.gpus:
            ap.error(f"{args.gpus} GPUs asked for, {torch.cuda.device_count()} visible")
        device = f"{args.gpus}× {torch.cuda.get_device_name(0)}; torch {torch.__version__}"
    else:
        device = f"{args.gpus} CPU processes"
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        work = Path(tmp)
        results = []
        baselines = [("1 GPU" + s, ["--strategy", "ddp", *(["--cuda-graphs"] if s else [])], {}, 1)
                     for s in ("", "-cg") if any(cg == bool(s) for _, _, cg in configs.values())]
        for name, extra, env, n in [*baselines, *((c, f, e, args.gpus) for c, (f, e, _) in configs.items())]:
            results.append(run(name, extra, n, args, work, env))
            print(f"  {name}: {results[-1].get('step_s', float('nan')):.4f} s/step", file=sys.stderr)
            if args.json:                                 # as it goes: a cut-off run keeps its rows
                Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "rows": results},
                                                      indent=2))
    cuda_graphs = lambda r: r["config"].partition("@")[0].endswith("-cg")      # noqa: E731
    base = {cuda_graphs(r): r for r in results if r["processes"] == 1 and "step_s" in r}
    print(f"\nQAT throughput — {device}; {args.preset} preset, {args.batch} samples per GPU, W{args.bits:g} "
          f"+ A8 dynamic, fbqc train{' --compile' if args.compile else ''}; mean over steps {args.skip + 1}–{args.steps}")
    print(f"{'config':24s} {'GPUs':>4s} {'batch':>5s} {'s/step':>8s} {'median':>8s} {'samples/s':>10s} "
          f"{'× 1 GPU':>8s} {'× median':>8s} {'peak GiB':>9s}")
    for r in results:
        if "step_s" not in r:
            print(f"{r['config']:24s} {r['processes']:4d} {r['global_batch']:5d}   failed ({r['steps']} steps)")
            continue
        r["samples_per_s"] = r["global_batch"] / r["step_s"]
        b = base.get(cuda_graphs(r))
        r["throughput_ratio"] = r["processes"] * b["step_s"] / r["step_s"] if b else None
        r["median_ratio"] = r["processes"] * b["median_s"] / r["median_s"] if b else None
        print(f"{r['config']:24s} {r['processes']:4d} {r['global_batch']:5d} {r['step_s']:8.4f} "
              f"{r['median_s']:8.4f} {r['samples_per_s']:10.2f} {r['throughput_ratio'] or float('nan'):8.2f} "
              f"{r['median_ratio'] or float('nan'):8.2f} "
              f"{r['peak_gib'] if r['peak_gib'] is not None else float('nan'):9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
