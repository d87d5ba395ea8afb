"""The compile pipeline: export → annotate → fake quant → calibrate → fold → lower → backend.

``compile_model`` is what ``fbqc compile`` runs; it is usable from Python as well.
"""
from __future__ import annotations

import gc
import platform
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import __version__
from .agreement import end_to_end, output_lsb
from .artifact import FORMAT, save_io, sha256_tensor, staging, write_manifest
from .errors import UserError
from .frontend import export_model_file
from .memory import available_bytes, peak_rss_mb
from .pass_infra import Instrument, PassManager
from .program import Program
from .fx_utils import flat_tensors
from .reference import save_reference
from .spec import QUANT
from .stage import Stage


@dataclass
class CompileOptions:
    target: str = "cpu"
    bits: float = 4.0
    scheme: str = "narrow"
    observer: str = "3sigma"
    calib_samples: int = 100
    calib_data: str | None = None                   # a capture directory (fbqc capture): --calib-data
    include: tuple[str, ...] | None = None          # None: fbqc.passes.DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    layer_bits: dict[str, float] = field(default_factory=dict)
    a16: tuple[str, ...] = ()
    preset: str | None = None
    checkpoint: str | None = None
    verify_each: bool = False
    print_after_change: bool = False
    #: the target backend's own options (its ``Options`` dataclass, or a mapping of its fields, e.g.
    #: ``{"soc": "SM8650"}`` for htp, ``{"emit_c": True}`` for cpu); checked by the backend
    target_options: Any = field(default_factory=dict)

    def flags(self) -> dict[str, Any]:
        """The manifest's ``flags``: these options and the backend's, by field name."""
        d = asdict(self)
        for k in ("verify_each", "print_after_change", "target_options"):
            d.pop(k)
        t = self.target_options
        return {**d, **(asdict(t) if is_dataclass(t) else dict(t or {}))}


class _Progress(Instrument):
    def __init__(self, bar, log):
        self.bar, self.log = bar, log

    def before_pass(self, p, program):
        self.bar.set_description(p.name)

    def after_pass(self, p, result, record):
        self.bar.update(1)
        self.log(f"  {record.name:<16} {record.requires:>20} → {record.produces:<10} "
                 f"{record.seconds:8.2f} s  peak RSS {record.peak_rss_mb / 1024:6.2f} GiB")


def build_passes(opts: CompileOptions, data, progress: bool, after_insert=()):
    from fbqc.passes import DEFAULT_INCLUDE, AnnotateLinears, Calibrate, Fold, InsertFakeQuant, \
        LowerToInteger

    annotate = AnnotateLinears(opts.bits, scheme=opts.scheme, observer=opts.observer,
                               include=opts.include if opts.include is not None else DEFAULT_INCLUDE,
                               exclude=opts.exclude, layer_bits=opts.layer_bits,
                               layer_act_bits={p: 16 for p in opts.a16})
    return ([annotate, InsertFakeQuant(), *after_insert,      # after_insert: e.g. LoadTrainedState (QAT run)
             Calibrate(data, opts.calib_samples, progress=progress)],
            [Fold(), LowerToInteger()])


def layer_table(program: Program) -> list[dict[str, Any]]:
    """Per integer layer: spec, shape, parameter count, storage and hashes (manifest 'layers')."""
    rows = []
    for n in program.quantized_nodes():
        spec = n.meta[QUANT]
        xq, sx, zx, wq_node, ws_node, wz_node, b_node, sy, zy, _ = n.args
        wq = program.attr(wq_node)
        cont = spec.weight.container
        rows.append({"layer": spec.layer, "kind": spec.kind, "weight_bits": spec.weight.bits,
                     "levels": list(spec.weight.levels), "container": cont.logical,
                     "scheme": spec.weight.scheme, "act_bits_in": spec.input.bits,
                     "act_bits_out": spec.output.bits, "shape": list(wq.shape), "params": wq.numel(),
                     "x_scale": sx, "x_zero_point": zx, "y_scale": sy, "y_zero_point": zy,
                     "weight_sha256": sha256_tensor(wq),
                     "storage_bytes": (wq.numel() * cont.bits + 7) // 8 + 4 * wq.shape[0]
                     + (4 * wq.shape[0] if wz_node is not None else 0)})
    return rows


def size_summary(float_program: Program, layers: list[dict[str, Any]]) -> dict[str, Any]:
    total_params = sum(t.numel() for t in float_program.graph_module.state_dict().values())
    float_bytes = sum(t.numel() * t.element_size() for t in float_program.graph_module.state_dict().values())
    q_params = sum(r["params"] for r in layers)
    q_bytes = sum(r["storage_bytes"] for r in layers)
    after = float_bytes - 4 * q_params + q_bytes
    return {"params": total_params, "quantized_params": q_params,
            "quantized_fraction": q_params / max(total_params, 1),
            "float_bytes": float_bytes, "bytes_after": after,
            "bits_per_quantized_param": 8 * q_bytes / max(q_params, 1),
            "mean_weight_bits": sum(r["weight_bits"] * r["params"] for r in layers) / max(q_params, 1)}


#: peak memory of a full compile ≈ this × the float weights' bytes (measured: Sana-600M full on CPU)
PEAK_OVER_WEIGHTS = 2.5


def plan(model_path: str | Path, opts: CompileOptions, *, log: Callable[[str], None] = print
         ) -> dict[str, Any]:
    """Export and annotate only (works on meta-device weights): the layers, bits and memory needed."""
    from fbqc.passes import AnnotateLinears

    t = time.perf_counter()
    program, _ = export_model_file(model_path, preset=opts.preset, checkpoint=opts.checkpoint)
    export_s = time.perf_counter() - t
    annotate = build_passes(opts, data=(), progress=False)[0][0]
    assert isinstance(annotate, AnnotateLinears)
    annotated = PassManager([annotate], verify_each=True)(program)
    state = annotated.graph_module.state_dict()
    float_bytes = sum(v.numel() * v.element_size() for v in state.values())
    layers = []
    for n in annotated.quantized_nodes():
        spec = n.meta[QUANT]
        w = annotated.attr(n.args[1])
        layers.append({"layer": spec.layer, "kind": spec.kind, "weight_bits": spec.weight.bits,
                       "container": spec.weight.container.logical, "act_bits_in": spec.input.bits,
                       "shape": list(w.shape), "params": w.numel()})
    need = PEAK_OVER_WEIGHTS * float_bytes
    avail = available_bytes()
    return {"module": program.info["module"], "meta_weights": program.info["meta_weights"],
            "export_seconds": export_s, "params": sum(v.numel() for v in state.values()),
            "float_bytes": float_bytes, "layers": layers,
            "quantized_params": sum(r["params"] for r in layers),
            "compile_memory_estimate_bytes": need, "available_bytes": avail,
            "fits": avail is not None and need < avail, "peak_rss_mb": peak_rss_mb()}




def compile_model(model_path: str | Path, out: str | Path, opts: CompileOptions, *, force: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print, after_insert=(),
                  run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``model_path`` to an artifact directory ``out``; returns the summary (``--json``).

    ``after_insert``: passes run between InsertFakeQuant and Calibrate (``fbqc compile RUN_DIR`` loads
    the trained student there); ``run``: the training run it came from, recorded in the manifest.
    One writer at a time: ``out`` is locked for the whole compile.
    """
    from fbqc.outputs import output_lock

    with output_lock(Path(out)):
        return _compile_model(model_path, Path(out), opts, force=force, progress=progress, log=log,
                              after_insert=after_insert, run=run)


def _compile_model(model_path, out: Path, opts: CompileOptions, *, force, progress, log, after_insert, run):
    from fbqc.artifact import check_writable
    from fbqc.plugins import backend_options, load_backend

    if progress:
        log = tqdm.write  # keeps log lines and progress bars apart
    backend = load_backend(opts.target)      # unknown target: fail before any work
    target_options = backend_options(backend, opts.target_options)   # htp --soc SM1234: fail early too
    check_writable(out, force)
    try:
        build_passes(opts, data=(), progress=False)  # --include/--exclude/--layer-bits regexes: before export
    except ValueError as e:
        raise UserError(str(e)) from None
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    bar = tqdm(total=7 + len(after_insert), desc="export", unit="stage", disable=not progress, leave=False)
    t = time.perf_counter()
    program, mf = export_model_file(model_path, preset=opts.preset, checkpoint=opts.checkpoint)
    if program.info.get("meta_weights"):
        raise UserError(f"{model_path}: the model's weights are on the meta device (too large to "
                        f"materialise here); use `fbqc compile --dry-run` to see its layers and the "
                        f"memory a full compile needs")
    timings["export"] = time.perf_counter() - t
    bar.update(1)
    log(f"exported {program.info['module']} in {timings['export']:.1f} s "
        f"({len(program.graph.nodes)} nodes)")
    with torch.no_grad():
        float_out = flat_tensors(program.run_example())
        t = time.perf_counter()                      # a warm forward: the first one pays one-off costs
        program.run_example()
        timings["float_forward"] = time.perf_counter() - t

    from .captured_data import Calibration       # --calib-data, calibration_data() or the data-free default

    calibration = Calibration(mf, program, opts, log)
    data, data_note = calibration.data, calibration.note
    log(f"calibration: {calibration.planned} samples, {opts.observer} ranges, from {data_note} "
        f"(~{calibration.planned * timings['float_forward']:.0f} s at {timings['float_forward']:.1f} s "
        f"per forward)")

    first, second = build_passes(opts, data, progress, after_insert)
    ins = [_Progress(bar, log)]
    pm = dict(verify_each=opts.verify_each, print_after_change=opts.print_after_change, instruments=ins)
    _check_finite(program, float_out, "float model")
    fq = PassManager(first, **pm)(program)
    with torch.no_grad():
        fq_out = flat_tensors(fq.run_example())
    _check_finite(fq, fq_out, "fake-quant model")
    integer = PassManager(second, **pm)(fq)
    with torch.no_grad():
        int_out = flat_tensors(integer.run_example())
    _check_finite(integer, int_out, "integer model")

    layers = layer_table(integer)
    size = size_summary(program, layers)
    model_info = {"file": str(model_path), "module": program.info["module"], "opts": program.info.get("opts", {})}
    skipped = program.info.get("skipped_layers", {})
    calib_entry = calibration.entry(fq.info.get("calibration", {}))
    # the backend needs only the INTEGER program: free the float and fake-quant models (and the
    # calibration data) before it (SD3.5-Medium: 9.2 GiB of fp32 weights)
    del program, fq, calibration, data, first, second, pm, ins
    gc.collect()
    t = time.perf_counter()
    report = backend.supports(integer, target_options)   # htp: the QNN compile itself, kept for compile()
    timings["supports"] = time.perf_counter() - t
    if not report.ok:
        raise UserError(report.describe())
    bar.set_description(f"backend {backend.name}")
    lsb = output_lsb(integer)
    agreement = {
        "integer_vs_fake_quant": [r.as_dict() for r in end_to_end(int_out, fq_out, lsb)],
        "integer_vs_float": [r.as_dict() for r in end_to_end(int_out, float_out)],
        "fake_quant_vs_float": [r.as_dict() for r in end_to_end(fq_out, float_out)],
    }
    with staging(out, force) as tmp:
        t = time.perf_counter()
        save_reference(integer, tmp)                     # program.pt2: every artifact carries it
        artifact = backend.compile(integer, target_options, tmp)
        save_io(tmp, integer.example_inputs, {"fake_quant_outputs": fq_out, "float_outputs": float_out})
        manifest = {
            "format": FORMAT,
            "fbqc": __version__,
            "versions": _versions(),
            "backend": {"name": backend.name, "version": backend.version, **artifact.manifest},
            "model": model_info,
            "flags": {**opts.flags(), **asdict(target_options)},
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in integer.example_inputs.items() if isinstance(v, torch.Tensor)},
            "calibration": calib_entry,
            "stages": [{"pass": r.name, "requires": r.requires, "produces": r.produces,
                        "modified": r.modified} for r in integer.history],
            "skipped_layers": skipped,
            "size": size,
            "agreement": agreement,
            **({"run": run} if run is not None else {}),
            "layers": layers,
        }
        write_manifest(tmp, manifest)
        timings["backend"] = time.perf_counter() - t
    bar.update(1)
    bar.close()
    timings["total"] = time.perf_counter() - t0
    timings.update({r.name: r.seconds for r in integer.history})
    timings.update({f"backend.{k}": v for k, v in artifact.timings.items()})
    return {"artifact": str(out), "manifest": manifest, "timings": timings, "peak_rss_mb": peak_rss_mb()}


def _check_finite(program: Program, outputs: list[torch.Tensor], what: str) -> None:
    """Non-finite outputs fail the compile, naming the first node where a NaN/Inf appears."""
    from .finite import first_nonfinite_node, nonfinite

    bad = nonfinite(outputs)
    if bad:
        where = first_nonfinite_node(program, program.example_inputs)
        fix = ("keep the quantized layer float (--exclude) or give it more bits (--layer-bits), or check "
               "its weights and calibration data" if what != "float model" else "check the model's weights")
        raise UserError(f"the {what}'s output {bad[0]} is not finite (NaN/Inf) on the example inputs; "
                        f"the first non-finite value appears at {where or 'an output'}: {fix}")


def _versions() -> dict[str, str]:
    import diffusers
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__}
