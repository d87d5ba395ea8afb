"""``htp`` backend: INTEGER graph → QDQ ONNX → QNN HTP context binary (Snapdragon Hexagon NPU).

Artifact (besides ``manifest.json`` and ``io.pt``):

=====================  ===========================================================================
``model_ctx.onnx``     EPContext model: loads the context binary (what a device app ships)
``model_ctx_qnn.bin``  QNN HTP context binary for ``--soc`` (default SM8750, Hexagon v79); a model split
                       into N contexts (``--contexts``, :mod:`.partition`) has ``model_ctx_p<i>_qnn.bin``
``model.qdq.onnx``     the QDQ ONNX it was compiled from (int4/int8 per-channel weights, uint8/16 acts)
``saver_output.c``     the graph as QNN C API calls (``libQnnSaver.so``), with ``params.bin``
``placement.json``     every node's execution provider (all on the HTP) and its QNN op
``program.pt2``        the INTEGER program: ``fbqc verify`` runs it as the cpu reference
=====================  ===========================================================================
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import fbqc
from fbqc.artifact import sha256_tensor
from fbqc.program import Program

from ..base import Artifact, SupportReport
from ..cpu import CpuBackend
from . import qnn
from .ctx_hash import entries


class HtpBackend:
    """Qualcomm Hexagon NPU (QNN HTP) via onnxruntime-qnn: QDQ ONNX → context binary, simulator runs."""

    name = "htp"

    def __init__(self):
        self._lowered: dict[int, tuple[str, Any]] = {}
        self._built: tuple[tuple, tempfile.TemporaryDirectory, dict[str, Any]] | None = None
        self.last_timings: dict[str, float] = {}

    @property
    def version(self) -> str:
        v = qnn.versions()
        return (f"fbqc {fbqc.__version__}, onnxruntime {v['onnxruntime']}, onnxruntime-qnn "
                f"{v['onnxruntime_qnn']} (QNN SDK {v['qnn_sdk']})")

    def lowered(self, program: Program):
        """The program lowered to QDQ ONNX (cached per program: supports() then compile())."""
        from .lower import lower     # torch.onnx / onnxscript: imported when needed (fast CLI start)

        key, fp = id(program), program.graph_fingerprint()
        hit = self._lowered.get(key)
        if hit is None or hit[0] != fp:
            t = time.perf_counter()
            low = lower(program)
            low.seconds = time.perf_counter() - t
            self._lowered = {key: (fp, low)}
        return self._lowered[key][1]

    def check_options(self, options: dict[str, Any]) -> None:
        """Fail before any work on a bad ``--soc``."""
        qnn.soc(options.get("soc"))

    def _build(self, program: Program, target: qnn.Soc, contexts: int | None) -> tuple[Path, dict[str, Any]]:
        """The QNN compile of ``program`` for ``target`` into a scratch directory, done once.

        supports() needs the HTP's own verdict on every node, which is the compile itself (the graph
        preparation is most of a compile's time); compile() then takes the files from here.
        """
        from .qnn_compile import compile_all

        key = (id(program), program.graph_fingerprint(), target.name, contexts)
        if self._built is None or self._built[0] != key:
            self._drop_built()
            low = self.lowered(program)
            tmp = tempfile.TemporaryDirectory(prefix="fbqc_htp_build_")
            try:
                res = compile_all(low, Path(tmp.name), target, contexts=contexts)
            except BaseException:
                tmp.cleanup()
                raise
            self._built = (key, tmp, res)
        return Path(self._built[1].name), self._built[2]

    def _drop_built(self) -> None:
        if self._built is not None:
            self._built[1].cleanup()
            self._built = None

    def supports(self, program: Program, options: dict[str, Any] | None = None) -> SupportReport:
        """Static rules, then the QNN HTP's own verdict: the graph compiled with the CPU fallback
        disabled (kept for compile()), and where that fails, the EP's placement of every node."""
        from .qnn_compile import PlacementError
        from .support import add_ep_rows, static_report

        report = static_report(program, self.name)
        if not report.ok:
            return report
        target = qnn.soc((options or {}).get("soc"))
        try:
            self._build(program, target, (options or {}).get("contexts"))
        except PlacementError as e:
            low = self.lowered(program)
            return add_ep_rows(report, e.rows, low.origin, {li.layer: li.source for li in low.layers},
                               target.name)
        return report

    def compile(self, program: Program, options: dict[str, Any], out_dir: Path) -> Artifact:
        from .lower import describe_inputs

        target = qnn.soc(options.get("soc"))
        low = self.lowered(program)
        ref = CpuBackend().compile(program, options, out_dir)      # program.pt2: the cpu reference
        try:
            built, res = self._build(program, target, options.get("contexts"))
            for f in res["files"]:
                shutil.move(str(built / f), out_dir / f)
        finally:
            self._drop_built()
        res["seconds"] = {"lower": low.seconds, **res["seconds"]}
        prep = low.prepared
        section = {
            "soc": target.name, "soc_model": target.soc_model, "htp_arch": target.htp_arch,
            "product": target.product, **qnn.versions(),
            "session": {"session.disable_cpu_ep_fallback": "1", "ep.context_enable": "1",
                        **{k: v for k, v in qnn.provider_options(target).items() if k != "backend_path"}},
            "context": "model_ctx.onnx", "contexts": len(entries(res)), "qdq_onnx": "model.qdq.onnx",
            "reference": ref.manifest["program"],
            "inputs": describe_inputs(low),
            "baked_inputs": {k: sha256_tensor(v) for k, v in prep.baked_inputs.items()},
            "cast_inputs": prep.cast_inputs,
            "layers": [{"layer": li.layer, "kind": li.kind, "weights": li.container, "weight_spread": li.spread,
                        "acts": f"A{li.x_bits}" + (f"→A{li.y_bits}" if li.y_bits != li.x_bits else "")}
                       for li in prep.layers],
            "folded_constants": prep.folded, "lowering_fixes": low.fixes,
            "placement": res["placement"], "sizes": res["sizes"], "binary": res["binary"],
            "context_binary": res["context_binary"],     # which bytes vary compile to compile; stable hash
        }
        self.last_timings = res["seconds"]       # not in the manifest: equal inputs → equal manifest
        return Artifact(self.name, out_dir, ref.files + res["files"], section)

    def load(self, directory: Path):
        from .runner import HtpArtifact

        return HtpArtifact(Path(directory))

    @staticmethod
    def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
        from .report import verify_summary

        return verify_summary(result, all_layers)

    @staticmethod
    def profile_summary(result: dict[str, Any]) -> str:
        from .report import profile_summary

        return profile_summary(result)

