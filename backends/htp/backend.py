"""``htp`` backend: INTEGER graph → QDQ ONNX → QNN HTP context binary (Snapdragon Hexagon NPU).

Artifact (besides ``manifest.json`` and ``io.pt``):

=====================  ===========================================================================
``model_ctx.onnx``     EPContext model: loads the context binary (what a device app ships)
``model_ctx_qnn.bin``  QNN HTP context binary for ``--soc`` (default SM8750, Hexagon v79); a model split
                       into N contexts (``--contexts``, :mod:`.partition`) has ``model_ctx_p<i>_qnn.bin``
``model.qdq.onnx``     the QDQ ONNX it was compiled from (int4/int8 per-channel weights, uint8/16 acts)
``saver_output.c``     the graph as QNN C API calls (``libQnnSaver.so``), with ``params.bin``
``placement.json``     every node's execution provider (all on the HTP) and its QNN op
``program.pt2``        the integer reference (:mod:`fbqc.reference`): ``fbqc verify`` checks the HTP against it
=====================  ===========================================================================
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import click

import fbqc
from fbqc.artifact import sha256_tensor
from fbqc.program import Program
from fbqc.reference import ensure_reference

from ..base import Artifact, SupportReport, make_options, option
from . import qnn
from .ctx_hash import entries

_BLOCKS_HELP = ("htp: transformer blocks to check as graphs of their own, fed the cpu reference's block "
                "inputs: 'all', 'first,middle,last', indices '0,13,27' or names 'transformer_blocks.13'.")
_SAMPLE_HELP = "htp: K evenly spaced transformer blocks, the first and the last included (instead of --blocks)."
_JOBS_HELP = "htp: simulator runs at a time, in parallel processes [default: 1]."


@dataclass(frozen=True)
class HtpOptions:
    """``fbqc compile --target htp`` flags."""

    soc: str | None = option("--soc", "htp: target Snapdragon SoC, SM8750 (8 Elite, v79; default), SM8650 "
                             "(v75) or SM8550 (v73).", check=qnn.soc)
    contexts: int | None = option("--contexts", "htp: split the model into N QNN contexts prepared in "
                                  "parallel (one EPContext model chaining them) [default: one per 256 MB of "
                                  "weights].", type=click.IntRange(1, 64))


@dataclass(frozen=True)
class HtpVerifyOptions:
    """``fbqc verify`` flags for htp artifacts (bounded-time verify, backends/htp/verify.py)."""

    blocks: str | None = option("--blocks", _BLOCKS_HELP, metavar="SPEC")
    sample: int | None = option("--sample", _SAMPLE_HELP, type=click.IntRange(min=1), metavar="K")
    full: bool | None = option("--full", "htp: also run the whole-model checks (end to end, free-running), "
                               "however long they take [default: only when estimated short; otherwise "
                               "blocks first,middle,last are checked].", is_flag=True)
    jobs: int | None = option("--jobs", _JOBS_HELP, type=click.IntRange(min=1), metavar="N")


@dataclass(frozen=True)
class HtpProfileOptions:
    """``fbqc profile`` flags for htp artifacts."""

    blocks: str | None = option("--blocks", "Profile these transformer blocks, each compiled as a graph of "
                                "its own, and estimate the whole model's block cycles ("
                                + _BLOCKS_HELP.split(": ", 1)[1].rstrip(".") + ").", metavar="SPEC")
    sample: int | None = option("--sample", _SAMPLE_HELP, type=click.IntRange(min=1), metavar="K")
    jobs: int | None = option("--jobs", _JOBS_HELP, type=click.IntRange(min=1), metavar="N")


def _given(options: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if v not in (None, False)}


class HtpBackend:
    """Qualcomm Hexagon NPU (QNN HTP) via onnxruntime-qnn: QDQ ONNX → context binary, simulator runs."""

    name = "htp"
    Options = HtpOptions
    VerifyOptions = HtpVerifyOptions
    ProfileOptions = HtpProfileOptions

    def __init__(self):
        self._lowered: dict[int, tuple[str, Any]] = {}
        self._built: tuple[tuple, tempfile.TemporaryDirectory, dict[str, Any]] | None = None

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

    def check_options(self, options: HtpOptions) -> None:
        """Fail before any work on a bad ``--soc``."""
        qnn.soc(options.soc)

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

    def supports(self, program: Program, options: HtpOptions | dict[str, Any] | None = None) -> SupportReport:
        """Static rules, then the QNN HTP's own verdict: the graph compiled with the CPU fallback
        disabled (kept for compile()), and where that fails, the EP's placement of every node."""
        from .qnn_compile import PlacementError
        from .support import add_ep_rows, static_report

        report = static_report(program, self.name)
        if not report.ok:
            return report
        options = make_options(HtpOptions, options, "the htp backend")
        target = qnn.soc(options.soc)
        try:
            self._build(program, target, options.contexts)
        except PlacementError as e:
            low = self.lowered(program)
            return add_ep_rows(report, e.rows, low.origin, {li.layer: li.source for li in low.layers},
                               target.name)
        return report

    def compile(self, program: Program, options: HtpOptions | dict[str, Any], out_dir: Path) -> Artifact:
        from .lower import describe_inputs

        options = make_options(HtpOptions, options, "the htp backend")
        target = qnn.soc(options.soc)
        low = self.lowered(program)
        reference = ensure_reference(program, out_dir)      # program.pt2: the integer reference
        try:
            built, res = self._build(program, target, options.contexts)
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
            "reference": reference,
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
        # timings: not in the manifest (equal inputs → equal manifest), in the compile's summary
        return Artifact(self.name, out_dir, [reference, *res["files"]], section, timings=res["seconds"])

    def load(self, directory: Path):
        from .runner import HtpArtifact

        return HtpArtifact(Path(directory))

    # --- Verifies, Profiles, Describes (backends/base.py) --------------------------------------------
    def verify(self, directory: Path, io: dict[str, Any], options: HtpVerifyOptions,
               log: Callable[[str], None] | None) -> dict[str, Any]:
        """Every layer teacher-forced on the simulator; sampled blocks and/or the whole model."""
        return self.load(directory).verify(io, log=log, **_given(options))

    @staticmethod
    def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
        from .summaries import verify_summary

        return verify_summary(result, all_layers)

    def profile(self, directory: Path, io: dict[str, Any], csv_path: Path | None, options: HtpProfileOptions,
                log: Callable[[str], None] | None) -> dict[str, Any]:
        from fbqc.errors import UserError

        if options.jobs is not None and options.blocks is None and options.sample is None:
            raise UserError("--jobs runs sampled blocks in parallel: give --blocks or --sample with it")
        return self.load(directory).profile(io, csv_path, log=log, **_given(options))

    @staticmethod
    def profile_summary(result: dict[str, Any]) -> str:
        from .summaries import profile_summary

        return profile_summary(result)

    @staticmethod
    def describe_artifact(section: dict[str, Any], short: bool = False) -> list[tuple[str, str]]:
        from .summaries import describe_artifact

        return describe_artifact(section, short)

