"""onnxruntime + the QNN execution provider (``onnxruntime-qnn``): sessions on the HTP (simulator).

On x86-64 the package's ``libQnnHtp.so`` compiles graphs for the chosen Hexagon architecture and runs
them on its cycle-level HTP simulator; ``libQnnSaver.so`` records the QNN C API calls of a graph.
Every session here disables the CPU fallback (``session.disable_cpu_ep_fallback=1``) and keeps the
graph-boundary Q/DQ on the HTP (``offload_graph_io_quantization=0``); only :func:`placement_probe`
allows the fallback, to name the nodes the HTP would not take.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fbqc.errors import UserError


@dataclass(frozen=True)
class Soc:
    name: str
    soc_model: int
    htp_arch: int
    product: str


#: ``--soc`` table (QNN ``soc_model`` ids and Hexagon architectures)
SOCS = {s.name: s for s in (
    Soc("SM8750", 69, 79, "Snapdragon 8 Elite"),
    Soc("SM8650", 57, 75, "Snapdragon 8 Gen 3"),
    Soc("SM8550", 43, 73, "Snapdragon 8 Gen 2"),
)}
DEFAULT_SOC = "SM8750"
EP = "QNNExecutionProvider"


def soc(name: str | None) -> Soc:
    key = (name or DEFAULT_SOC).upper()
    if key not in SOCS:
        raise UserError(f"unknown --soc {name!r}; known: {', '.join(SOCS)}")
    return SOCS[key]


@functools.cache
def _runtime():
    try:
        import onnxruntime as ort
        import onnxruntime_qnn as oq
    except ImportError as e:  # pragma: no cover - a core dependency
        raise UserError(f"the htp backend needs onnxruntime-qnn ({e}); pip install onnxruntime-qnn") from e
    ort.register_execution_provider_library(EP, oq.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        raise UserError("onnxruntime-qnn is installed but offers no QNN device")
    return ort, oq, devices


def versions() -> dict[str, str]:
    import onnxruntime as ort
    import onnxruntime_qnn as oq

    return {"onnxruntime": ort.__version__, "onnxruntime_qnn": oq.__version__,
            "qnn_sdk": getattr(oq.build_and_package_info, "qnn_version", "?")}


def provider_options(target: Soc, **extra: str) -> dict[str, str]:
    _, oq, _ = _runtime()
    return {"backend_path": oq.get_qnn_htp_path(), "soc_model": str(target.soc_model),
            "htp_arch": str(target.htp_arch), "enable_htp_fp16_precision": "1",
            "offload_graph_io_quantization": "0", **extra}


@contextlib.contextmanager
def _native_stdout_silenced():
    """libQnnHtp prints a ``# LIBNATIVE: …`` banner on the process's stdout (fd 1) when it loads; that
    would corrupt ``--json`` output. Silenced unless FBQC_ORT_LOG_LEVEL asks for logs."""
    if "FBQC_ORT_LOG_LEVEL" in os.environ:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def session(model: str | Path, target: Soc, *, fallback: bool = False, context: Path | None = None,
            record_placement: bool = False, from_bytes: bool = True, **provider_extra: str):
    """An ``InferenceSession`` on the QNN HTP backend (compiles the graph, or loads a context binary)."""
    ort, _, devices = _runtime()
    so = ort.SessionOptions()
    so.log_severity_level = int(os.environ.get("FBQC_ORT_LOG_LEVEL", "4"))
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record_placement:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if context is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context))
        so.add_session_config_entry("ep.context_embed_mode", "0")
    so.add_provider_for_devices(devices, provider_options(target, **provider_extra))
    if context is not None and from_bytes:
        # from bytes: onnxruntime then names the QNN graph after the model's content, not its path
        # (a temporary directory's name would otherwise make the context binary differ run to run)
        model = Path(model).read_bytes()
    with _native_stdout_silenced():
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so)


def placement(sess) -> list[dict[str, str]]:
    """One row per node of the session's final graph: the execution provider that runs it."""
    rows = []
    for sub in sess.get_provider_graph_assignment_info():
        for n in sub.get_nodes():
            rows.append({"node": n.name, "op": n.op_type, "ep": sub.ep_name})
    return rows


def placement_probe(model: str | Path, target: Soc) -> list[dict[str, str]]:
    """Placement with the CPU fallback *allowed*: which nodes the HTP would not take."""
    return placement(session(model, target, fallback=True, record_placement=True))


def run(sess, feeds: dict[str, Any]) -> list[Any]:
    return sess.run(None, feeds)
