"""fbqc's htp pipeline vs onnxruntime's own static PTQ (QNN QDQ config), same model, same HTP target;
or (``--phases``) where fbqc's compile time and memory go.

    python benchmarks/htp_compile.py                       # tiny Sana, W4A8, 16 calibration samples
    python benchmarks/htp_compile.py examples/pixart_sigma.py --calib-samples 32 --json
    python benchmarks/htp_compile.py --phases --preset full --calib-samples 2 --repeat 2 [--contexts 1]

``--phases``: fbqc's compile only, each phase's wall time (export, forwards, calibration, lowering,
QNN contexts, saver, cpu reference, manifest), the time besides calibration as a multiple of one fp32
forward measured in the same run, the peak memory of the whole process tree (sampled every 0.2 s:
the QNN preparations run in child processes) and the context binaries' bytes by kind.

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
import os
import shutil
import sys
import tempfile
import threading
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
    from fbqc.backends.htp.ctx_hash import entries as ctx_entries
    from fbqc.pipeline import CompileOptions, compile_model

    out = work / "fbqc"
    t = time.perf_counter()
    result = compile_model(model_file, out, CompileOptions(target="htp", bits=args.bits, target_options={"soc": args.soc},
                                                           calib_samples=args.calib_samples),
                           progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t
    io = load_io(out)
    y = HtpBackend().load(out).run(io["inputs"])[0]
    y_ref = CpuBackend().load(out).run(io["inputs"])[0]
    b = result["manifest"]["backend"]
    return {"seconds": seconds, "context_bytes": sum(e["bytes"] for e in ctx_entries(b)),
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


class _TreeRss(threading.Thread):
    """Highest summed RSS of this process and its descendants (the QNN child processes), sampled."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = 0, threading.Event()

    def _tree(self) -> int:
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except (OSError, StopIteration):
                continue
        return total

    def run(self):
        while not self._done.wait(0.2):
            self.peak = max(self.peak, self._tree())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def run_phases(model_file: Path, work: Path, args) -> dict:
    from fbqc.pipeline import CompileOptions, compile_model

    watch = _TreeRss()
    watch.start()
    t = time.perf_counter()
    result = compile_model(model_file, work / "fbqc", CompileOptions(
        target="htp", bits=args.bits, calib_samples=args.calib_samples, preset=args.preset,
        target_options={"soc": args.soc, "contexts": args.contexts}), progress=False, log=lambda s: None)
    wall = time.perf_counter() - t
    peak = watch.stop()
    tm, b = result["timings"], result["manifest"]["backend"]
    besides = wall - tm.get("Calibrate", 0.0)
    return {"wall_seconds": wall, "besides_calibration_seconds": besides,
            "fp32_forward_seconds": tm["float_forward"], "forwards": besides / tm["float_forward"],
            "timings": tm, "peak_rss_main_gib": result["peak_rss_mb"] / 1024, "peak_rss_tree_gib": peak / 2**30,
            "contexts": b["contexts"], "binary": b["binary"], "nodes": b["placement"]["nodes"],
            "cpu_nodes": b["placement"]["cpu_nodes"]}


def main_phases(args) -> int:
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="fbqc_bench_") as tmp:
            runs.append(run_phases(Path(args.model), Path(tmp), args))
        r = runs[-1]
        if not args.json:
            tm = r["timings"]
            phases = {k: v for k, v in tm.items() if k not in ("total",)}
            print(f"run {i + 1}: {r['wall_seconds']:.1f} s wall, {r['besides_calibration_seconds']:.1f} s besides "
                  f"calibration = {r['forwards']:.1f} fp32 forwards ({r['fp32_forward_seconds']:.2f} s each); "
                  f"{r['contexts']} context(s), {r['nodes']:,} nodes, {r['cpu_nodes']} on the CPU; peak RSS "
                  f"{r['peak_rss_tree_gib']:.2f} GiB (process tree), {r['peak_rss_main_gib']:.2f} GiB (main)")
            print("  " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
            x = r["binary"]
            print(f"  binary {x['binary_bytes'] / 1e6:.1f} MB = {x['bits_per_quantized_weight']:.3f} bits per "
                  f"quantized weight: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in x["bytes"].items()))
    if args.json:
        print(json.dumps({"model": args.model, "preset": args.preset, "runs": runs}, indent=2))
    else:
        b = [r["besides_calibration_seconds"] for r in runs]
        f = [r["forwards"] for r in runs]
        print(f"besides calibration: {min(b):.1f}–{max(b):.1f} s over {len(runs)} run(s) "
              f"({min(f):.1f}–{max(f):.1f} fp32 forwards)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "examples" / "sana.py"))
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--soc", default="SM8750")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phases", action="store_true", help="fbqc's compile only: time per phase, memory, bytes")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--contexts", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if args.phases:
        return main_phases(args)
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
