"""``fbqc export-diffusers RUN DIR``: a trained student as a diffusers checkpoint (DESIGN.md §5).

The run's model file builds the float model (its preset / checkpoint options), the run's flags
annotate it (the same :class:`~fbqc.passes.AnnotateLinears` rule, at the schedule's final bits), the
trained state is loaded, and each quantized layer's weight is replaced by its fake-quantized value
(:func:`fbqc.ops.fake_quant.weight_value`: on the W-bit grid, stored as fp32). ``save_pretrained`` writes
it, so users sample with their usual pipeline. Activations stay float there: the A8 quantization
happens in the compiled artifact. ``fbqc_quant.json`` beside it lists the layers and their specs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fbqc.artifact import check_writable, staging
from fbqc.errors import UserError
from fbqc.ops.fake_quant import weight_value
from fbqc.frontend import load_model_file

from . import checkpoint as ck

MANIFEST = "fbqc_quant.json"


def export_diffusers(run_dir: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the finished run ``run_dir``'s student to ``out`` with ``save_pretrained``; a summary."""
    from fbqc.pipeline import build_passes

    from ..students.modules import annotate_modules
    from ..model_file import options_from, run_model_file

    run_dir, out = Path(run_dir), Path(out)
    run = ck.read_run(run_dir)
    state = ck.load_student(run_dir)
    check_writable(out, force, "diffusers")          # before building the model, not after
    src = run["source"]
    model_file = run_model_file(run_dir, run)
    opts = options_from(src["flags"])
    model = load_model_file(model_file, preset=opts.preset, checkpoint=opts.checkpoint).call("model")
    if not hasattr(model, "save_pretrained"):
        raise UserError(f"{model_file}: model() returned a {type(model).__name__}, which has no "
                        f"save_pretrained (export-diffusers needs a diffusers model)")
    missing = [k for k, _ in model.named_parameters() if k not in state]
    if missing:
        raise ck.RunError(f"{run_dir}/{ck.STUDENT} has no tensor for {missing[:3]}: the run was trained "
                          f"on another model or preset")
    specs = annotate_modules(model, build_passes(opts, data=(), progress=False)[0][0])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name].to(p.dtype))
        for layer, spec in specs.items():
            w = model.get_submodule(layer).weight
            bits = torch.tensor(float(spec.weight.bits), dtype=torch.float64)
            w.copy_(weight_value(w, bits, spec.weight.axis, spec.weight.scheme))
    summary = {"run": str(run_dir), "schedule": run["schedule"]["spec"], "model": type(model).__name__,
               "layers": len(specs), "bits": sorted({s.weight.bits for s in specs.values()}),
               "student_sha256": ck.state_digest(state),
               "note": "weights fake-quantized (on the W-bit grid, stored fp32); activations float"}
    with staging(out, force, "diffusers") as tmp:    # written whole, then renamed into place
        model.save_pretrained(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps({**summary, "specs": {k: v.to_dict() for k, v in specs.items()}},
                                               indent=2) + "\n")
    return {**summary, "out": str(out)}
