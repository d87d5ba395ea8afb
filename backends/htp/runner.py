"""A loaded htp artifact: run the context binary on the HTP simulator; verify and profile it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbqc.artifact import read_manifest, sha256_tensor
from fbqc.errors import ArtifactError, UserError

from . import qnn
from .ctx_hash import entries
from .qnn_compile import CTX_BIN, CTX_FILE, QDQ_FILE

_NP = {"float": np.float32, "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "bool": np.bool_}


class HtpArtifact:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        info = self.manifest["backend"]
        if info.get("name") != "htp":
            raise ArtifactError(f"{directory} is a {info.get('name')} artifact, not htp")
        binaries = [e["file"] for e in entries(info)] or [CTX_BIN]
        for f in (CTX_FILE, *binaries, QDQ_FILE):
            if not (self.directory / f).is_file():
                raise ArtifactError(f"{directory}: missing {f}")
        self.info = info
        self.target = qnn.soc(info["soc"])
        self._session = None

    # --- running ------------------------------------------------------------------------------
    def session(self, **provider_extra: str):
        if provider_extra:
            return qnn.session(self.directory / CTX_FILE, self.target, **provider_extra)
        if self._session is None:
            self._session = qnn.session(self.directory / CTX_FILE, self.target)
        return self._session

    def feeds(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The ONNX graph's inputs from forward's keyword arguments (static shapes, baked inputs checked)."""
        for name, digest in self.info.get("baked_inputs", {}).items():
            if name not in inputs:
                raise UserError(f"missing input {name!r}")
            if sha256_tensor(inputs[name]) != digest:
                raise UserError(f"input {name!r} differs from the example input it was baked from (its "
                                f"float64 computation was folded into constants); recompile for new values")
        feeds = {}
        for name, meta in self.info["inputs"].items():
            if name not in inputs:
                raise UserError(f"missing input {name!r} (the graph takes {', '.join(self.info['inputs'])})")
            x = inputs[name]
            x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
            if list(x.shape) != meta["shape"]:
                raise UserError(f"input {name!r} has shape {list(x.shape)}; this HTP graph is static: "
                                f"{meta['shape']} (recompile for other shapes)")
            dtype = _NP.get(meta["dtype"])
            if dtype is None:
                raise ArtifactError(f"input {name!r}: unsupported ONNX dtype {meta['dtype']}")
            arr = x.numpy()
            if dtype is np.int32 and arr.dtype == np.int64 and arr.size and \
                    (arr.min() < -2**31 or arr.max() >= 2**31):
                raise UserError(f"input {name!r} holds values outside int32 (the HTP has no int64)")
            feeds[name] = np.ascontiguousarray(arr.astype(dtype, copy=False))
        return feeds

    def run(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        outs = qnn.run(self.session(), self.feeds(inputs))
        return [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs]

    # --- the cpu reference carried in the artifact ----------------------------------------------
    def reference(self):
        from fbqc.reference import Reference

        return Reference(self.directory)

    def check_context(self) -> None:
        """The context binary against the manifest's stable hash (its varying bytes masked)."""
        from .ctx_hash import check

        for entry in entries(self.info):
            why = check(self.directory, entry)
            if why:
                raise ArtifactError(f"{self.directory}: {why}")

    def verify(self, io: dict[str, Any], *, blocks: str | None = None, sample: int | None = None,
               full: bool | None = None, jobs: int = 1, log=None) -> dict[str, Any]:
        """Teacher-forced check of every layer; sampled blocks and/or the whole model (see verify.py)."""
        from .verify import verify

        self.check_context()
        return verify(self, io, blocks=blocks, sample=sample, full=full, jobs=jobs, log=log)

    def profile(self, io: dict[str, Any], out_csv: Path | None = None, *, blocks: str | None = None,
                sample: int | None = None, jobs: int = 1, log=None) -> dict[str, Any]:
        """The whole context's simulated cycles, or (``blocks``/``sample``) those of sampled blocks."""
        if blocks is not None or sample is not None:
            from .profile import profile_blocks

            return profile_blocks(self, io, out_csv, blocks=blocks, sample=sample, jobs=jobs, log=log)
        from .profile import profile

        return profile(self, io, out_csv)
