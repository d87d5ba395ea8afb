"""``fbqc verify`` and ``fbqc profile``: re-run an artifact on its backend and measure its agreement
with the fake-quant model (DESIGN.md §3), or its cost on the target.

A backend that implements :class:`~fbqc.backends.base.Verifies` checks its artifacts itself (htp: the
simulator against the integer reference, within a time bound); for any other backend the core runs
:func:`compare_with_reference`: the artifact's codes per layer, teacher-forced, and its outputs end to
end, against the integer reference every artifact carries (:mod:`fbqc.reference`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .agreement import check_layer, end_to_end, nonfinite_rows, output_lsb, summarize
from .artifact import check_hashes, load_io, read_manifest
from .errors import ArtifactError, UserError

#: what `fbqc verify` does for a backend without verify flags (the error for a flag it lacks says so)
GENERIC_VERIFY = "checks every layer and the whole model"


def verify_artifact(directory: str | Path, *, log: Callable[[str], None] | None = None,
                    **options: Any) -> dict[str, Any]:
    """Per-layer teacher-forced and end-to-end agreement of the artifact in ``directory``.

    ``options``: the artifact's backend's verify options by keyword (htp: ``blocks``, ``sample``,
    ``full``, ``jobs``; None values are "not given"); ``log`` receives what the backend says before
    long work (htp: the plan and its time estimate).
    """
    from fbqc.backends.base import Verifies

    from .plugins import backend_options, load_backend, split_flags

    directory = Path(directory)
    manifest = read_manifest(directory)
    name = manifest["backend"]["name"]
    given = split_flags("verify", name, options, GENERIC_VERIFY)
    bad = check_hashes(directory, manifest)
    if bad:
        raise ArtifactError(f"{directory}: file(s) {', '.join(bad)} do not match the manifest's hashes")
    io = load_io(directory)
    backend = load_backend(name)
    if isinstance(backend, Verifies):
        result = backend.verify(directory, io, backend_options(backend, given, "verify"), log)
    else:
        result = compare_with_reference(directory, backend.load(directory), io, manifest)
    return _no_agreement_with_nonfinite(result)


#: a backend's free-running outputs against the integer reference's: at least this fraction within one
#: output LSB (quantized outputs), else at most this relative error — float ops between the integer
#: layers may round differently on another target, but not compute something else
REFERENCE_WITHIN_1LSB, REFERENCE_REL_ERROR = 0.99, 1e-3


def compare_with_reference(directory: Path, loaded: Any, io: dict[str, Any],
                           manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """A loaded artifact (``run``, ``layer_codes``) against the integer reference in ``directory``:
    per layer, teacher-forced, the output codes for its input codes (the reference's constants); end to
    end its outputs against the fake-quant and float models'; and — for an artifact that is not the
    reference itself — free-running: its outputs and each layer's input codes against the reference's,
    which catches wrong float ops between the integer layers (DESIGN.md §3)."""
    from .reference import Reference

    reference = loaded if isinstance(loaded, Reference) else Reference(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    outputs = loaded.run(io["inputs"])
    lsb = output_lsb(reference.program)
    kinds = {r["layer"]: r["kind"] for r in manifest["layers"]}
    codes = loaded.layer_codes(io["inputs"])
    rows = []
    for layer, node in reference.layers().items():
        if layer not in codes:
            raise ArtifactError(f"{directory}: layer {layer} was not reached by the example inputs")
        c = codes[layer]
        rows.append(check_layer(layer, kinds[layer], reference.constants(node), c["xq"], c["yq"]))
    result = {"artifact": str(directory), "backend": manifest["backend"]["name"],
              "per_layer": [r.as_dict() for r in rows], "summary": summarize(rows),
              "end_to_end_vs_fake_quant": [r.as_dict() for r in end_to_end(outputs, io["fake_quant_outputs"], lsb)],
              "end_to_end_vs_float": [r.as_dict() for r in end_to_end(outputs, io["float_outputs"])]}
    if loaded is not reference:
        result["vs_reference"] = _free_running(codes, reference, outputs, io["inputs"], lsb)
    return result


def _free_running(codes: dict[str, Any], reference: Any, outputs: list, inputs: dict[str, Any], lsb) -> dict[str, Any]:
    """The artifact's own input codes per layer and outputs against the reference's (see above)."""
    ref_outputs, want = reference.run_recording(inputs)          # one forward for both
    identical = total = max_diff = 0
    for layer, c in want.items():
        diff = (codes[layer]["xq"].to(torch.int64) - c["xq"].to(torch.int64)).abs()
        identical += int((diff == 0).sum())
        total += diff.numel()
        max_diff = max(max_diff, int(diff.max()) if diff.numel() else 0)
    e2e = [r.as_dict() for r in end_to_end(outputs, ref_outputs, lsb)]
    ok = all((r["within_1lsb"] >= REFERENCE_WITHIN_1LSB) if r.get("within_1lsb") is not None
             else r["rel_error"] <= REFERENCE_REL_ERROR for r in e2e)
    return {"input_codes_identical": identical / max(total, 1), "input_codes_max_diff": max_diff,
            "end_to_end": e2e, "exact": ok,
            "goal": f"outputs ≥ {100 * REFERENCE_WITHIN_1LSB:g} % within 1 LSB of the reference's "
                    f"(float outputs: rel error ≤ {REFERENCE_REL_ERROR:g})"}


def _no_agreement_with_nonfinite(result: dict[str, Any]) -> dict[str, Any]:
    """A comparison that saw NaN/Inf (the artifact's outputs or a reference) never agrees."""
    bad = nonfinite_rows(result)           # the model's, the emitted C's and sampled blocks' comparisons
    if bad:
        result["nonfinite"] = bad
        result["summary"] = {**result["summary"], "exact": False, "passed": False}
        for section in result.values():    # a backend's own sections (cpu --emit-c: emitted_c) too
            if isinstance(section, dict) and "exact" in section and section is not result["summary"]:
                section["exact"] = False
    return result


def agrees(result: dict[str, Any]) -> bool:
    """The verdict: the model's summary and every section with a verdict of its own (emitted C …)."""
    return bool(result["summary"]["exact"]) and not any(
        isinstance(v, dict) and v.get("exact") is False for v in result.values())


def summary_text(result: dict[str, Any], all_layers: bool = False) -> str:
    """Text report of :func:`verify_artifact`'s result; a backend with its own check formats it."""
    from fbqc.backends.base import Verifies

    from .plugins import load_backend
    from .summaries import verify_summary

    backend = load_backend(result["backend"])
    text = (backend.verify_summary(result, all_layers) if isinstance(backend, Verifies)
            else verify_summary(result, all_layers))
    if result.get("nonfinite"):
        text += f"\nNON-FINITE outputs (NaN/Inf) in {', '.join(result['nonfinite'])}: no agreement"
    return text


def profile_artifact(directory: str | Path, csv_path: Path | None = None, *,
                     log: Callable[[str], None] | None = None, **options: Any) -> tuple[dict[str, Any], str]:
    """``fbqc profile``: the backend's cost of the artifact on its example inputs, and its text."""
    from fbqc.backends.base import Profiles

    from .plugins import backend_options, load_backend, loaded_backends, split_flags

    directory = Path(directory)
    manifest = read_manifest(directory)
    name = manifest["backend"]["name"]
    backend = load_backend(name)
    having = [n for n, b in loaded_backends().items() if isinstance(b, Profiles)]
    no_profile = (f"has no simulator profile (compile with --target {' or '.join(having)})" if having else
                  "has no simulator profile (no installed backend has one)")
    given = split_flags("profile", name, options, no_profile)
    if not isinstance(backend, Profiles):
        raise UserError(f"{directory}: the {name} backend {no_profile}")
    result = backend.profile(directory, load_io(directory), csv_path, backend_options(backend, given, "profile"),
                             log)
    return result, backend.profile_summary(result)
