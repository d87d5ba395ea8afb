"""The README's htp table: the four tiny architectures compiled for the HTP and verified on the simulator.

    python benchmarks/htp_agreement.py [--bits 4] [--calib-samples 16] [--soc SM8750] [--a16 proj_out]

Per architecture: compile time (model file → context binary), context-binary size, teacher-forced
per-layer agreement with the cpu reference (exact, within 1 LSB, max LSB), free-running per-layer
agreement, and the model output's relative error against the cpu reference and the float model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"]


def row(arch: str, work: Path, args) -> list[str]:
    from fbqc.pipeline import CompileOptions, compile_model
    from fbqc.artifact_verify import verify_artifact

    out = work / arch
    kw = {"include": (r"blocks\.\d+\.", *args.a16), "a16": tuple(args.a16)} if args.a16 else {}
    t = time.perf_counter()
    result = compile_model(ROOT / "examples" / f"{arch}.py", out,
                           CompileOptions(target="htp", bits=args.bits, target_options={"soc": args.soc},
                                          calib_samples=args.calib_samples, **kw),
                           progress=False, log=lambda s: None)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    v = verify_artifact(out, full=True)         # the whole-model checks too (tiny models: seconds)
    verify_s = time.perf_counter() - t
    s, fr = v["summary"], v["free_running"]["summary"]
    b = result["manifest"]["backend"]
    a16 = (f"{s['a16_max_rel_error']:.1e} ({s['a16_max_lsb']} LSB)" if s["a16_layers"] else "—")
    return [arch, f"{s['layers']}", f"{compile_s:.0f} s", f"{b['sizes']['model_ctx_qnn.bin'] / 1e3:.0f} KB",
            f"{b['placement']['cpu_nodes']}", f"{100 * s['a8_exact']:.2f} %", f"{100 * s['a8_within_1lsb']:.3f} %",
            f"{s['a8_max_lsb']}", a16, f"{100 * fr['a8_within_1lsb']:.2f} % / {fr['a8_max_lsb']}",
            f"{v['end_to_end_vs_cpu'][0]['rel_error']:.4f}", f"{v['end_to_end_vs_float'][0]['rel_error']:.3f}",
            f"{verify_s:.0f} s"]


HEAD = ["model (tiny)", "layers", "compile", "context", "CPU nodes", "TF exact", "TF ≤ 1 LSB", "TF max LSB",
        "A16 rel (max LSB)", "free-running ≤ 1 LSB / max", "e2e rel vs cpu", "e2e rel vs float", "verify"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--soc", default="SM8750")
    ap.add_argument("--a16", nargs="*", default=[])
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    args = ap.parse_args(argv)
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    with tempfile.TemporaryDirectory(prefix="fbqc_htp_table_") as tmp:
        for arch in args.archs:
            print("| " + " | ".join(row(arch, Path(tmp), args)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
