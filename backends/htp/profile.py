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


# --- sampled blocks, each compiled as a graph of its own ---------------------------------------------

def _merge(tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in tables:
        for r in t["by_op_type"]:
            by_op[r["op"]][0] += r["nodes"]
            by_op[r["op"]][1] += r["cycles"]
    total = sum(t["total_cycles"] for t in tables)
    return sorted(({"op": k, "nodes": v[0], "cycles": v[1], "share": v[1] / max(total, 1)}
                   for k, v in by_op.items()), key=lambda r: -r["cycles"])


def blocks_estimate(rows: list[dict[str, Any]], all_blocks) -> dict[str, Any]:
    """Transformer-block cycles of the whole model: per block list, mean profiled block × its blocks."""
    groups: dict[str, dict[str, Any]] = {}
    for b in all_blocks:
        groups.setdefault(b.group, {"blocks": 0, "profiled": 0, "cycles": []})["blocks"] += 1
    for r in rows:
        g = groups[r["block"].rpartition(".")[0]]
        g["profiled"] += 1
        g["cycles"].append(r["total_cycles"])
    total, missing = 0, []
    for name, g in groups.items():
        g["mean_cycles"] = sum(g["cycles"]) / len(g["cycles"]) if g["cycles"] else None
        g["estimate_cycles"] = g["mean_cycles"] * g["blocks"] if g["cycles"] else None
        del g["cycles"]
        if g["estimate_cycles"] is None:
            missing.append(name)
        else:
            total += g["estimate_cycles"]
    basis = (f"{len(rows)} of {len(all_blocks)} blocks profiled, each compiled as a graph of its own and fed "
             f"the cpu reference's block inputs; estimate = mean profiled block × blocks"
             + (" per block list" if len(groups) > 1 else "") + "; embeddings/final layer not included")
    if missing:
        basis += f"; no block of {', '.join(missing)} profiled: not included"
    return {"transformer_block_cycles": round(total), "groups": groups, "basis": basis}


def profile_blocks(art, io: dict[str, Any], out_csv: Path | None = None, *, blocks: str | None = None,
                   sample: int | None = None, jobs: int = 1, log=None) -> dict[str, Any]:
    """``fbqc profile --blocks/--sample``: each chosen block's simulated cycles (QNN detailed profile)."""
    from tqdm.auto import tqdm

    from . import blocks as B
    from . import estimate as E
    from . import qnn
    from .saver import SaverRun
    from .simjobs import SimJob, run_jobs

    t0 = time.perf_counter()
    ref = art.reference()
    all_blocks = B.find_blocks(ref.program)
    chosen = B.select(all_blocks, blocks, sample, "--blocks" if blocks is not None else "--sample")
    if log is not None:
        g = sum(E.gmac(b.nodes) for b in chosen)
        c, s = E.graph_seconds(g)
        log(f"profile plan (estimated; {jobs} simulator run(s) at a time):\n  blocks "
            f"{', '.join(b.name for b in chosen)} ({len(chosen)} of {len(all_blocks)}), {g:.3g} GMAC: "
            f"~{E.duration(c + s)} plus lowering\n  basis: {E.basis()}")
    bar = tqdm(total=1 + 2 * len(chosen), desc="profile", unit="part", disable=None, dynamic_ncols=True)
    try:
        bar.set_postfix_str("cpu reference")
        cap = B.capture(ref.program, io["inputs"], chosen, codes=False)
        bar.update()
        with tempfile.TemporaryDirectory(prefix="fbqc_htp_profile_") as tmp:
            graphs, sims, savers = [], [], []
            for b in chosen:
                bar.set_postfix_str(f"lowering block {b.name}")
                d = Path(tmp) / f"block{b.index}"
                graphs.append(B.build(ref.program, b, cap.inputs[b.name], d, layer_outputs=False))
                # the QNN op types of the profile's node names: libQnnSaver in a child, beside the rest
                savers.append(SaverRun(graphs[-1].qdq, qnn.provider_options(art.target)))
                sims.append(SimJob(f"block {b.name}", str(graphs[-1].qdq), art.target.name, graphs[-1].feeds,
                                   profile_csv=str(d / "profile.csv")))
                bar.update()
            try:
                t = time.perf_counter()
                results = run_jobs(sims, jobs, on_done=lambda r: (bar.update(), bar.set_postfix_str(
                    f"done: {r.key}")))
                sim_wall = time.perf_counter() - t
                qnn_types = []
                for g, sv in zip(graphs, savers):
                    sv.finish(g.qdq.parent)
                    qnn_types.append(qnn_ops(g.qdq.parent / "saver_output.c"))
            finally:
                for sv in savers:
                    sv.cancel()
            rows = []
            for g, res, types in zip(graphs, results, qnn_types):
                total, nodes = parse(g.qdq.parent / "profile.csv")
                layers = sorted(g.block.layers, key=len, reverse=True)
                row = {"block": g.block.name, "index": g.block.index, "gmac": g.gmac,
                       **table(total, nodes, types, _onnx_ops(g.qdq), layers),
                       "seconds": {"lower": g.lower_seconds, "compile": res.compile_seconds,
                                   "run": res.run_seconds}}
                rows.append(row)
                if out_csv is not None:
                    dest = Path(out_csv)
                    dest = dest.with_name(f"{dest.stem}.{g.block.name}{dest.suffix or '.csv'}")
                    dest.write_bytes((g.qdq.parent / "profile.csv").read_bytes())
                    row["csv"] = str(dest)
    finally:
        bar.close()
    total = sum(r["total_cycles"] for r in rows)
    return {"artifact": str(art.directory), "soc": art.target.name, "htp_arch": art.target.htp_arch,
            "mode": "blocks", "blocks": {"of": len(all_blocks), "profiled": [r["block"] for r in rows]},
            "per_block": rows, "total_cycles": total, "node_cycles": sum(r["node_cycles"] for r in rows),
            "by_op_type": _merge(rows), "estimate": blocks_estimate(rows, all_blocks),
            "simulator_seconds": sim_wall, "seconds": {"total": time.perf_counter() - t0, "simulator_wall": sim_wall},
            "inputs": {k: v["shape"] for k, v in art.info["inputs"].items()}}
