"""Time and peak memory per compile stage (default: Sana-600M full preset on the CPU).

    python benchmarks/compile_time.py                       # Sana-600M, 100 calibration samples
    python benchmarks/compile_time.py --calib-samples 10 --model examples/pixart_sigma.py

Baseline measured in the same run: one fp32 forward of the float model; every stage is also printed
as a multiple of it. Peak memory is the process's RSS high-water mark after each stage.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "examples" / "sana.py"))
    ap.add_argument("--preset", default="full")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--calib-samples", type=int, default=100)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from fbqc.pipeline import CompileOptions, compile_model
    from fbqc.artifact_verify import verify_artifact

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = compile_model(args.model, Path(tmp) / "art",
                               CompileOptions(bits=args.bits, preset=args.preset,
                                              calib_samples=args.calib_samples),
                               progress=True, log=print)
        total = time.perf_counter() - start
        t = time.perf_counter()
        verify = verify_artifact(Path(tmp) / "art")
        verify_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (Path(tmp) / "art").iterdir())
    tm = result["timings"]
    base = tm["float_forward"]
    hist = {h["pass"]: h for h in result["manifest"]["stages"]}
    for stage in ["export", "float_forward", *hist, "backend"]:
        rows.append((stage, tm.get(stage, float("nan"))))
    rows.append(("verify", verify_s))
    print(f"\n{args.model} preset={args.preset} bits={args.bits} calib_samples={args.calib_samples}")
    print(f"baseline: one fp32 forward = {base:.2f} s")
    print(f"{'stage':<16}{'seconds':>10}{'× forward':>12}")
    for name, sec in rows:
        print(f"{name:<16}{sec:>10.2f}{sec / base:>12.1f}")
    print(f"{'total compile':<16}{total:>10.2f}{total / base:>12.1f}")
    print(f"peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB (after verify {rss_gib():.2f} GiB); "
          f"artifact {size / 2**20:.1f} MiB; float weights {result['manifest']['size']['float_bytes'] / 2**20:.1f} MiB")
    print(f"agreement: {verify['summary']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total": total, "peak_rss_mb": result["peak_rss_mb"],
                                               "summary": verify["summary"], "artifact_bytes": size}, indent=2))


if __name__ == "__main__":
    main()
