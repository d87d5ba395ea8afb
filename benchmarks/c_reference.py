"""Speed of the emitted C reference vs PyTorch fp32 on CPU, same machine, same run.

    python benchmarks/c_reference.py                      # Sana-600M (preset full), W4A8, 1024 tokens
    python benchmarks/c_reference.py --preset tiny        # seconds, smoke test

Builds the INTEGER program (export → annotate → fake quant → calibrate on --calib-samples samples →
fold → lower; the calibration values do not change the speed), emits C into --out, builds it with
--cflags (default ``-O3 -march=native -fopenmp``; the numerics need ``-ffp-contract=off``, added
always), then times, alternating, the C program and the float model's eager forward
(``torch.no_grad``, ``torch.get_num_threads()`` threads, the same count for OpenMP), --repeat times
each, and prints the best of each and their ratio. The load average before and after is printed: on
a shared machine other jobs slow both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "sana.py"))
    ap.add_argument("--preset", default="full")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_c_reference"))
    ap.add_argument("--cflags", default="-O3 -march=native -fopenmp")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the C emitted by an earlier run in --out")
    ap.add_argument("--portable", action="store_true",
                    help="also time one run of the portable build (-O2 -std=c99 -ffp-contract=off, one thread)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from fbqc.backends.cpu.c_emit import emit_c
    from fbqc.backends.cpu.c_emit.build import build, read_tensors, run
    from fbqc.data import samples_around
    from fbqc.frontend import export_model_file
    from fbqc.pass_infra import PassManager
    from fbqc.pipeline import CompileOptions, build_passes

    out = Path(args.out)
    threads = torch.get_num_threads()
    res: dict = {"model": args.model, "preset": args.preset, "bits": args.bits, "threads": threads,
                 "load_before": load()}
    print(f"load average {res['load_before']}, {threads} threads", flush=True)
    t = time.perf_counter()
    program, mf = export_model_file(args.model, preset=args.preset)
    print(f"export {time.perf_counter() - t:.1f} s", flush=True)
    inputs = program.example_inputs
    if not (args.reuse and (out / "c" / "model.c").is_file()):
        data = mf.call("calibration_data") if mf.has("calibration_data") else samples_around(inputs)
        first, second = build_passes(CompileOptions(bits=args.bits, calib_samples=args.calib_samples),
                                     data, progress=False)
        t = time.perf_counter()
        integer = PassManager(second)(PassManager(first)(program))
        print(f"passes {time.perf_counter() - t:.1f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t = time.perf_counter()
        section = emit_c(integer, out)
        (out / "c_section.json").write_text(json.dumps(section, indent=1))
        res["emit_seconds"] = time.perf_counter() - t
        print(f"emit C {res['emit_seconds']:.1f} s: {len(section['layers'])} quantized layers, "
              f"weights.bin {section['weights_bytes'] / 2**20:.1f} MiB, "
              f"{section['bits_per_quantized_weight']:.3f} bits per quantized weight", flush=True)
        del integer
    section = json.loads((out / "c_section.json").read_text())
    cflags = f"{args.cflags} -std=c99 -ffp-contract=off"
    res["build_seconds"], _ = build(out, out / "run", cflags)
    res["cflags"] = cflags
    print(f"build ({cflags}) {res['build_seconds']:.1f} s", flush=True)

    float_model = mf.call("model").eval()
    c_times, t_times = [], []
    with torch.no_grad():
        for i in range(args.repeat):
            t = time.perf_counter()
            ref = float_model(**inputs)
            t_times.append(time.perf_counter() - t)
            print(f"torch fp32 forward {i}: {t_times[-1]:.2f} s   (load {load()})", flush=True)
            secs, log = run(out / "run", out / "inputs.bin", out / "outputs.bin", threads=threads)
            fwd = float(log.strip().splitlines()[-1].split()[2])
            c_times.append(fwd)
            print(f"C forward {i}: {fwd:.2f} s (process {secs:.2f} s incl. loading weights)   "
                  f"(load {load()})", flush=True)
    if args.portable:
        flags = "-O2 -std=c99 -ffp-contract=off"
        build(out, out / "run_portable", flags)
        secs, log = run(out / "run_portable", out / "inputs.bin", out / "outputs_portable.bin")
        res["portable_seconds"] = float(log.strip().splitlines()[-1].split()[2])
        print(f"portable C ({flags}, 1 thread) forward: {res['portable_seconds']:.2f} s   (load {load()})",
              flush=True)
    ref = ref[0] if isinstance(ref, (tuple, list)) else getattr(ref, "sample", ref)
    c_out = read_tensors(out / "outputs.bin", section["outputs"])[0]
    d = (c_out.double() - ref.double())
    res.update({"torch_seconds": min(t_times), "c_seconds": min(c_times), "torch_all": t_times, "c_all": c_times,
                "ratio_c_over_torch": min(c_times) / min(t_times), "load_after": load(),
                "c_vs_float_rel_error": float(d.norm() / ref.double().norm()), "c_vs_float_max_abs": float(d.abs().max())})
    print(f"\nC {res['c_seconds']:.2f} s vs torch fp32 {res['torch_seconds']:.2f} s: ratio C/torch = "
          f"{res['ratio_c_over_torch']:.2f} (best of {args.repeat}; load average before {res['load_before']}, "
          f"after {res['load_after']}); W{args.bits:g}A8 C output vs float model: rel error "
          f"{res['c_vs_float_rel_error']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
