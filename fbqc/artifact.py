"""Artifact directories: written to a temporary sibling and renamed into place, with a manifest.

An artifact is self-contained: ``manifest.json`` (versions, flags, per-layer bits and hashes, stage
history, file hashes), ``io.pt`` (the example inputs and the fake-quant and float models' outputs for
them, so ``fbqc verify`` needs no model file) and the backend's own files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError
from .outputs import check_writable, staging  # noqa: F401 - the artifact's output rules

MANIFEST = "manifest.json"
IO_FILE = "io.pt"
FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    files = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and p.name != MANIFEST and not p.name.startswith(".fbqc"))
    manifest = {**manifest, "files": {f: sha256_file(directory / f) for f in files}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_versioned_json(path: Path, fmt: int, kind: str, error: type[Exception], missing: str) -> dict[str, Any]:
    """``path``'s JSON object, whose ``format`` must be ``fmt``; each failure raises ``error`` naming
    the file (``missing``: the message when it does not exist). Artifact manifests and run files."""
    if not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise error(f"{path}: {kind} format {found!r}, this fbqc reads {fmt}")
    return data


#: keys every artifact manifest has (a manifest without one is damaged, not a crash)
REQUIRED_KEYS = ("fbqc", "backend", "model", "flags", "inputs", "calibration", "stages", "size", "layers", "files")


def read_manifest(directory: Path) -> dict[str, Any]:
    m = read_versioned_json(Path(directory) / MANIFEST, FORMAT, "artifact", ArtifactError,
                            f"{directory} is not an fbqc artifact (no {MANIFEST})")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ArtifactError(f"{Path(directory) / MANIFEST}: the manifest has no {', '.join(map(repr, missing))}; "
                            f"the file is damaged or not written by fbqc (compile the artifact again)")
    return m


def check_hashes(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Names of files whose content no longer matches the manifest."""
    bad = []
    for name, digest in manifest.get("files", {}).items():
        p = Path(directory) / name
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(name)
    return bad


def save_io(directory: Path, inputs: dict[str, Any], outputs: dict[str, list[torch.Tensor]]) -> None:
    torch.save({"inputs": inputs, **outputs}, directory / IO_FILE)


def load_io(directory: Path) -> dict[str, Any]:
    path = Path(directory) / IO_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {IO_FILE} (example inputs and reference outputs)")
    return torch.load(path, weights_only=True)
