"""fbqc's htp pipeline vs onnxruntime's own static PTQ (QNN QDQ config), same model, same HTP target.

    python benchmarks/htp_compile.py                       # tiny Sana, W4A8, 16 calibration samples
    python benchmarks/htp_compile.py examples/pixart_sigma.py --calib-samples 32 --json

Both paths start from the model file and end at a QNN HTP context binary for ``--soc`` (compiled with
the CPU fallback disabled where possible), run on the HTP simulator on the example inputs:

- fbqc: ``compile_model(--target htp)`` (export → annotate → calibrate → fold → integer → QDQ ONNX →
  context): int4 per-channel weights in the transformer blocks' linears, uint8 activations around them,
  other ops in fp16 on the HTP.
- onnxruntime: ``torch.onnx.export`` of the float model → ``qnn_preprocess_model`` →
  ``get_qnn_qdq_config(activation_type=QUInt8, weight_type=QInt4|QInt8, per_channel=True)`` →
  ``quantize`` → QNN context (uint8 activations on every op, all weights quantized).

Reported: wall time to the context binary, context-binary and artifact size, nodes left off the HTP,
and the simulator output's error against the float model (and, for onnxruntime's model, against
onnxruntime CPU running the same QDQ model).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def run_fbqc(model_file: Path, work: Path, args) -> dict:
    from fbqc.artifact import load_io
    from fbqc.backends.cpu import CpuBackend
    from fbqc.backends.htp import HtpBackend
    from fbqc.pipeline import CompileOptions, compile_model

    out = work / "fbqc"
    t = time.perf_counter()
    result = compile_model(model_file, out, CompileOptions(target="htp", bits=args.bits, soc=args.soc,
                                                           calib_samples=args.calib_samples),
                           progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t
    io = load_io(out)
    y = HtpBackend().load(out).run(io["inputs"])[0]
    y_ref = CpuBackend().load(out).run(io["inputs"])[0]
    b = result["manifest"]["backend"]
    return {"seconds": seconds, "context_bytes": b["sizes"]["model_ctx_qnn.bin"],
            "artifact_bytes": _dir_size(out), "cpu_nodes": b["placement"]["cpu_nodes"],
            "rel_error_vs_float": _rel(y, io["float_outputs"][0]),
            "rel_error_vs_own_cpu_reference": _rel(y, y_ref),
            "quantized": f"{len(result['manifest']['layers'])} linears W{args.bits:g}A8, rest fp16"}


class _Reader:
    """onnxruntime CalibrationDataReader over the model file's calibration samples."""

    def __init__(self, samples, names):
        self.it = iter([{k: s[k].numpy() for k in names} for s in samples])

    def get_next(self):
        return next(self.it, None)


def run_ort(model_file: Path, work: Path, args) -> dict:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from fbqc.backends.htp import qnn
    from fbqc.backends.htp.qnn_compile import off_htp
    from fbqc.frontend import _entry, load_model_file

    target = qnn.soc(args.soc)
    t = time.perf_counter()
    mf = load_model_file(model_file)
    module = mf.call("model").eval()
    inputs = mf.call("example_inputs")
    names = list(inputs)
    float_path, pre, qdq, ctx = (work / f for f in ("float.onnx", "pre.onnx", "qdq.onnx", "qdq_ctx.onnx"))
    with torch.no_grad():
        torch.onnx.export(_entry(module), (), str(float_path), kwargs=inputs, dynamo=True, opset_version=21,
                          verbose=False)
        y_float = _entry(module)(**inputs)
        y_float = y_float[0] if isinstance(y_float, (tuple, list)) else y_float
    row: dict = {}
    try:
        if not qnn_preprocess_model(str(float_path), str(pre)):   # False: nothing to change
            shutil.copy(float_path, pre)
        samples = list(itertools.islice(mf.call("calibration_data"), args.calib_samples))
        wtype = QuantType.QInt4 if args.bits <= 4 else QuantType.QInt8
        config = get_qnn_qdq_config(str(pre), _Reader(samples, names), activation_type=QuantType.QUInt8,
                                    weight_type=wtype, per_channel=True)
        quantize(str(pre), str(qdq), config)
    except Exception as e:  # noqa: BLE001 - a failing step is a result of the benchmark
        return {"failed_at": "onnxruntime quantization", "error": f"{type(e).__name__}: {str(e)[:200]}",
                "seconds": time.perf_counter() - t}
    feeds = {k: v.numpy() for k, v in inputs.items()}
    try:
        sess = qnn.session(qdq, target, context=ctx, from_bytes=False)   # it has external data
        row["cpu_nodes"] = 0
    except Exception as e:  # noqa: BLE001
        row["compile_error"] = str(e).strip().splitlines()[0][:160]
        try:
            off = off_htp(qnn.placement_probe(qdq, target))
            row.update(cpu_nodes=len(off), off_htp_ops=sorted({r["op"] for r in off}))
            sess = qnn.session(qdq, target, fallback=True)        # measure it anyway, with CPU nodes
        except Exception as e2:  # noqa: BLE001 - the QNN EP could not build the graph at all
            row.update(failed_at="QNN compile", error=str(e2).strip().splitlines()[0][:160],
                       seconds=time.perf_counter() - t)
            return row
    row["seconds"] = time.perf_counter() - t
    y = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    import onnxruntime as ort

    y_cpu = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"]).run(
        None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    bin_path = work / "qdq_ctx_qnn.bin"
    row.update(context_bytes=bin_path.stat().st_size if bin_path.exists() else None,
               artifact_bytes=sum((work / f).stat().st_size for f in ("qdq.onnx", "qdq_ctx.onnx",
                                                                        "qdq_ctx_qnn.bin")
                                  if (work / f).exists()),
               rel_error_vs_float=_rel(y, y_float.numpy()), rel_error_vs_own_cpu_reference=_rel(y, y_cpu),
               quantized=f"all ops, W{'4' if args.bits <= 4 else '8'} per-channel, uint8 activations")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "examples" / "sana.py"))
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--soc", default="SM8750")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="fbqc_bench_") as tmp:
        work = Path(tmp)
        (work / "ort").mkdir()
        rows = {"fbqc": run_fbqc(model, work, args), "onnxruntime static PTQ": run_ort(model, work / "ort", args)}
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"model": str(model), "soc": args.soc, "bits": args.bits,
                          "calib_samples": args.calib_samples, "results": rows}, indent=2))
        return 0
    print(f"{model.name}, W{args.bits:g}A8 to {args.soc}, {args.calib_samples} calibration samples, "
          f"HTP simulator on the example inputs")
    keys = [("seconds", "time to context binary", lambda v: f"{v:.1f} s"),
            ("context_bytes", "context binary", lambda v: f"{v / 1e6:.3f} MB" if v else "—"),
            ("artifact_bytes", "artifact files", lambda v: f"{v / 1e6:.3f} MB" if v else "—"),
            ("cpu_nodes", "nodes off the HTP", str),
            ("rel_error_vs_float", "output rel. error vs float model", lambda v: f"{v:.4f}"),
            ("rel_error_vs_own_cpu_reference", "HTP vs its own CPU reference", lambda v: f"{v:.4f}"),
            ("quantized", "what is quantized", str)]
    width = max(len(k[1]) for k in keys)
    print(f"{'':{width}}  " + "  ".join(f"{n:>28}" for n in rows))
    for key, label, fmt in keys:
        cells = [fmt(r[key]) if r.get(key) is not None else r.get("failed_at", "—") for r in rows.values()]
        print(f"{label:{width}}  " + "  ".join(f"{c:>28}" for c in cells))
    for name, r in rows.items():
        for k in ("compile_error", "off_htp_ops", "error"):
            if k in r:
                print(f"{name}: {k}: {r[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
