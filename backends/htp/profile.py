"""``fbqc profile``: simulated HTP cycles of an htp artifact, per op type and in total.

The QNN EP's ``profiling_level=detailed`` with ``profiling_file_path`` makes the simulator write a CSV
with the graph's "Accelerator (execute) time (cycles)" and one "<node>:OpId_<n> (cycles)" row per op.
Node names are the QNN nodes of ``saver_output.c`` (their QNN op types come from there) and, for the
quantized layers, ``<layer>/<ONNX op>_<i>`` (so cycles can also be summed per layer).
"""
from __future__ import annotations

import csv
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx

from .qnn_compile import QDQ_FILE
from .saver import qnn_ops

TOTAL = "Accelerator (execute) time (cycles)"
_NODE = re.compile(r"^(.*):OpId_\d+ \(cycles\)$")
_IO = re.compile(r"^(Input|Output) OpId_\d+ \(cycles\)$")


def parse(path: Path) -> tuple[int, list[tuple[str, int]]]:
    """(total cycles, [(node name or Input/Output, cycles)]) of the last run in a QNN profile CSV."""
    total, nodes = None, []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ident, unit = row.get("Event Identifier", ""), row.get("Unit of Measurement", "")
            if unit != "CYCLES":
                continue
            value = int(float(row["Time"]))
            if ident == TOTAL:
                total, nodes = value, []            # a new execution starts a new record
            elif (m := _NODE.match(ident)) is not None:
                nodes.append((m.group(1), value))
            elif (m := _IO.match(ident)) is not None:
                nodes.append((m.group(1), value))
    if total is None:
        raise RuntimeError(f"{path}: no '{TOTAL}' in the profile (is this an HTP profile?)")
    return total, nodes


def _onnx_ops(qdq: Path) -> dict[str, str]:
    model = onnx.load(str(qdq), load_external_data=False)
    return {n.name: n.op_type for n in model.graph.node}


def table(total: int, nodes: list[tuple[str, int]], qnn_types: dict[str, str],
          onnx_types: dict[str, str], layers: list[str] = ()) -> dict[str, Any]:
    by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_layer: dict[str, int] = defaultdict(int)
    for name, cycles in nodes:
        op = name if name in ("Input", "Output") else qnn_types.get(name) or onnx_types.get(name, "?")
        by_op[op][0] += 1
        by_op[op][1] += cycles
        layer = next((ly for ly in layers if name.startswith(ly + "/")), "(float ops, data movement)")
        by_layer[layer] += cycles
    ops = sorted(({"op": k, "nodes": v[0], "cycles": v[1], "share": v[1] / max(total, 1)}
                  for k, v in by_op.items()), key=lambda r: -r["cycles"])
    layers = sorted(({"layer": k, "cycles": v} for k, v in by_layer.items()), key=lambda r: -r["cycles"])
    return {"total_cycles": total, "node_cycles": sum(c for _, c in nodes), "by_op_type": ops,
            "by_layer": layers}


def profile(art, io: dict[str, Any], out_csv: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fbqc_htp_profile_") as tmp:
        path = Path(out_csv) if out_csv is not None else Path(tmp) / "profile.csv"
        if path.exists():
            path.unlink()
        t = time.perf_counter()
        sess = art.session(profiling_level="detailed", profiling_file_path=str(path.resolve()))
        sess.run(None, art.feeds(io["inputs"]))
        del sess                                            # the EP writes the CSV when it is released
        wall = time.perf_counter() - t
        total, nodes = parse(path)
    saver_c = art.directory / "saver_output.c"
    qnn_types = qnn_ops(saver_c) if saver_c.is_file() else {}
    layers = sorted((r["layer"] for r in art.manifest["layers"]), key=len, reverse=True)
    result = table(total, nodes, qnn_types, _onnx_ops(art.directory / QDQ_FILE), layers)
    result.update({"artifact": str(art.directory), "soc": art.target.name, "htp_arch": art.target.htp_arch,
                   "simulator_seconds": wall, "csv": str(out_csv) if out_csv is not None else None,
                   "inputs": {k: v["shape"] for k, v in art.info["inputs"].items()}})
    return result
