"""``fbqc verify``: re-run an artifact and measure its agreement with the fake-quant model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .agreement import check_layer, end_to_end, nonfinite_rows, output_lsb, summarize
from .artifact import check_hashes, load_io, read_manifest
from .errors import ArtifactError, UserError

#: options of the htp backend's bounded-time verify / profile (None: not given)
SIM_OPTIONS = {"blocks": "--blocks", "sample": "--sample", "full": "--full", "jobs": "--jobs"}


def _sim_options(backend: str, options: dict[str, Any], what: str) -> dict[str, Any]:
    """The options given (not None); on a backend without a simulator, the first one is an error."""
    given = {k: v for k, v in options.items() if v is not None}
    if given and backend != "htp":
        flag = SIM_OPTIONS[next(iter(given))]
        raise UserError(f"{flag} is for htp artifacts; the {backend} backend {what}")
    return given


def verify_artifact(directory: str | Path, *, blocks: str | None = None, sample: int | None = None,
                    full: bool | None = None, jobs: int | None = None, log=None) -> dict[str, Any]:
    """Per-layer teacher-forced and end-to-end agreement (DESIGN.md §3) of the artifact in ``directory``.

    htp artifacts: ``blocks``/``sample`` choose transformer blocks checked as graphs of their own,
    ``full`` the whole-model checks, ``jobs`` the simulator runs at a time (see backends/htp/verify.py);
    ``log`` receives the plan and its time estimate before any simulator work.
    """
    from fbqc.backends import load_backend

    directory = Path(directory)
    manifest = read_manifest(directory)
    opts = _sim_options(manifest["backend"]["name"], {"blocks": blocks, "sample": sample, "full": full,
                                                      "jobs": jobs},
                        "checks every layer and the whole model")
    bad = check_hashes(directory, manifest)
    if bad:
        raise ArtifactError(f"{directory}: file(s) {', '.join(bad)} do not match the manifest's hashes")
    io = load_io(directory)
    backend = load_backend(manifest["backend"]["name"])
    loaded = backend.load(directory)
    own = getattr(loaded, "verify", None)     # a backend that checks itself against a reference (htp)
    if own is not None:
        return _no_agreement_with_nonfinite(own(io, log=log, **opts))
    outputs = loaded.run(io["inputs"])
    lsb = output_lsb(loaded.program) if hasattr(loaded, "program") else None
    layers_meta = {r["layer"]: r for r in manifest["layers"]}
    e2e = end_to_end(outputs, io["fake_quant_outputs"], lsb)
    e2e_float = end_to_end(outputs, io["float_outputs"])

    codes = loaded.layer_codes(io["inputs"])
    rows = []
    for layer, node in loaded.layers().items():
        if layer not in codes:
            raise ArtifactError(f"{directory}: layer {layer} was not reached by the example inputs")
        c = codes[layer]
        rows.append(check_layer(layer, layers_meta[layer]["kind"], loaded.constants(node), c["xq"], c["yq"]))
    result = {"artifact": str(directory), "backend": manifest["backend"]["name"],
              "per_layer": [r.as_dict() for r in rows], "summary": summarize(rows),
              "end_to_end_vs_fake_quant": [r.as_dict() for r in e2e],
              "end_to_end_vs_float": [r.as_dict() for r in e2e_float]}
    emitted = getattr(loaded, "emitted_code_check", None)   # cpu --emit-c: build, run and compare the C
    if emitted is not None and (c := emitted(io)) is not None:
        result["emitted_c"] = c
    return _no_agreement_with_nonfinite(result)


def _no_agreement_with_nonfinite(result: dict[str, Any]) -> dict[str, Any]:
    """A comparison that saw NaN/Inf (the artifact's outputs or a reference) never agrees."""
    bad = nonfinite_rows(result)           # the model's, the emitted C's and sampled blocks' comparisons
    if bad:
        result["nonfinite"] = bad
        result["summary"] = {**result["summary"], "exact": False, "passed": False}
        if "emitted_c" in result:
            result["emitted_c"] = {**result["emitted_c"], "exact": False}
    return result


def summary_text(result: dict[str, Any], all_layers: bool = False) -> str:
    """Text report of :func:`verify_artifact`'s result; a backend with its own check formats it."""
    from fbqc.backends import load_backend

    from .report import verify_summary

    fmt = getattr(load_backend(result["backend"]), "verify_summary", None)
    return fmt(result, all_layers) if fmt is not None else verify_summary(result, all_layers)


def profile_artifact(directory: str | Path, csv_path: Path | None = None, *, blocks: str | None = None,
                     sample: int | None = None, jobs: int | None = None, log=None) -> tuple[dict[str, Any], str]:
    """``fbqc profile``: the backend's simulated cost of the artifact on its example inputs (htp: the
    whole context, or with ``blocks``/``sample`` each chosen transformer block compiled on its own)."""
    from fbqc.backends import load_backend

    directory = Path(directory)
    manifest = read_manifest(directory)
    name = manifest["backend"]["name"]
    opts = _sim_options(name, {"blocks": blocks, "sample": sample, "jobs": jobs},
                        "has no simulator profile (compile with --target htp)")
    if jobs is not None and blocks is None and sample is None:
        raise UserError("--jobs runs sampled blocks in parallel: give --blocks or --sample with it")
    backend = load_backend(name)
    loaded = backend.load(directory)
    if not hasattr(loaded, "profile"):
        raise ArtifactError(f"{directory}: the {backend.name} backend has no simulator profile "
                            f"(compile with --target htp)")
    result = loaded.profile(load_io(directory), csv_path, log=log, **opts)
    return result, backend.profile_summary(result)
