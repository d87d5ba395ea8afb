"""``fbqc verify``: re-run an artifact and measure its agreement with the fake-quant model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .agreement import check_layer, end_to_end, output_lsb, summarize
from .artifact import check_hashes, load_io, read_manifest
from .errors import ArtifactError


def verify_artifact(directory: str | Path) -> dict[str, Any]:
    """Per-layer teacher-forced and end-to-end agreement (DESIGN.md §3) of the artifact in ``directory``."""
    from fbqc.backends import load_backend

    directory = Path(directory)
    manifest = read_manifest(directory)
    bad = check_hashes(directory, manifest)
    if bad:
        raise ArtifactError(f"{directory}: file(s) {', '.join(bad)} do not match the manifest's hashes")
    io = load_io(directory)
    backend = load_backend(manifest["backend"]["name"])
    loaded = backend.load(directory)
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
    return {"artifact": str(directory), "backend": manifest["backend"]["name"],
            "per_layer": [r.as_dict() for r in rows], "summary": summarize(rows),
            "end_to_end_vs_fake_quant": [r.as_dict() for r in e2e],
            "end_to_end_vs_float": [r.as_dict() for r in e2e_float]}
