"""Agreement of the cpu reference with the fake-quant model for the tiny seed architectures.

    python benchmarks/agreement_table.py [--bits 4 4.5 8] [--calib-samples 16]

Prints a markdown table (the README's results table): per architecture and bit-width, the per-layer
teacher-forced checks of DESIGN.md §3 and the end-to-end errors vs the fake-quant and float models.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="+", default=[4, 4.5, 8])
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    ap.add_argument("--calib-samples", type=int, default=16)
    args = ap.parse_args()

    from fbqc.pipeline import CompileOptions, compile_model
    from fbqc.artifact_verify import verify_artifact

    print("| model (tiny) | bits | layers | outputs checked | int32 acc identical | codes = contract "
          "| codes = fake-quant | .5 ties | other | e2e rel. err vs fake-quant | e2e rel. err vs float |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for bits in args.bits:
                out = Path(tmp) / f"{arch}-{bits}"
                t = time.perf_counter()
                compile_model(ROOT / "examples" / f"{arch}.py", out,
                              CompileOptions(bits=bits, calib_samples=args.calib_samples),
                              progress=False, log=lambda s: None)
                r = verify_artifact(out)
                s = r["summary"]
                print(f"| {arch} | {bits:g} | {s['layers']} | {s['elements']:,} | {s['acc_identical']} | "
                      f"{s['contract_identical']} | {100 * s['fq_identical_fraction']:.4f} % | {s['fq_ties']} | "
                      f"{s['fq_other']} | {r['end_to_end_vs_fake_quant'][0]['rel_error']:.2e} | "
                      f"{r['end_to_end_vs_float'][0]['rel_error']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
