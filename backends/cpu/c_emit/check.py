"""Agreement of the emitted C program with the in-process cpu reference (DESIGN.md §3).

1. Per layer, teacher-forced: the program runs with ``--feed`` (each quantized layer reads the
   reference's own input codes) and ``--dump``; its int32 accumulators must equal the reference
   kernel's (``fbqc.ops.integer.int_matmul`` of the same codes) and its output codes the reference's.
2. End to end: the free-running program's outputs against the in-process reference's and the
   fake-quant model's (max abs and relative error); also how many codes each layer reproduces
   free-running (float ops in C and PyTorch differ in the last bits, which moves a few codes).
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fbqc.agreement import end_to_end
from fbqc.errors import ArtifactError
from fbqc.ops.integer import int_matmul

from .build import build, compiler, read_dump, read_tensors, run, write_codes
from .files import INPUTS_FILE, WEIGHTS_FILE


def reference_acc(kind: str, args: list[Any], xq: torch.Tensor) -> torch.Tensor:
    """int32 accumulators of the in-process kernel for input codes ``xq`` (layout of the layer's output)."""
    _, _, x_zp, wq, _, w_zp, *_ = args
    if kind == "conv1x1":
        return int_matmul(xq.movedim(1, -1), x_zp, wq, w_zp).movedim(-1, 1).contiguous()
    return int_matmul(xq, x_zp, wq, w_zp)


def check_hashes(directory: Path, section: dict[str, Any]) -> None:
    bad = [f for f, h in section.get("sha256", {}).items()
           if not (directory / f).is_file() or hashlib.sha256((directory / f).read_bytes()).hexdigest() != h]
    if bad:
        raise ArtifactError(f"{directory}: C file(s) {', '.join(bad)} do not match the manifest's hashes")


def check_emitted_c(directory: Path, loaded, io: dict[str, Any], section: dict[str, Any], *,
                    cflags: str | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Build the artifact's C program and compare it with ``loaded`` (the integer reference, fbqc.reference.Reference)."""
    directory = Path(directory)
    if compiler() is None:
        return {"skipped": "no C compiler found (set CC)", "exact": None}
    check_hashes(directory, section)
    cflags = cflags or section["cflags"]
    with tempfile.TemporaryDirectory(prefix="fbqc_c_") as tmp:
        work = Path(keep) if keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        binary = work / "run"
        build_s, warnings = build(directory, binary, cflags)
        weights, inputs = directory / WEIGHTS_FILE, directory / INPUTS_FILE
        free, forced, feed = work / "free", work / "forced", work / "feed"
        for d in (free, forced, feed):
            d.mkdir(exist_ok=True)
        run_s, _ = run(binary, inputs, work / "out_free.bin", weights=weights, dump=free)
        c_out = read_tensors(work / "out_free.bin", section["outputs"])
        c_in = read_tensors(inputs, section["inputs"])
        ref_inputs = {**(io or {}).get("inputs", {}),         # non-tensor leaves (None) the C never reads
                      **{r["name"]: t for r, t in zip(section["inputs"], c_in)}}
        t = time.perf_counter()
        ref_out = loaded.run(ref_inputs)
        ref_s = time.perf_counter() - t
        codes = loaded.layer_codes(ref_inputs)
        nodes = loaded.layers()
        names = section["layers"]
        missing = [n for n in names if n not in codes]
        if missing:
            raise ArtifactError(f"{directory}: the reference has no layer(s) {', '.join(missing[:5])}")
        for i, name in enumerate(names):
            write_codes(feed, i, codes[name]["xq"])
        run(binary, inputs, work / "out_forced.bin", weights=weights, dump=forced, feed=feed)
        rows = []
        for i, name in enumerate(names):
            ref = codes[name]
            node = nodes[name]
            kind = "conv1x1" if node.target == torch.ops.fbqc.qconv2d_1x1.default else "linear"
            acc_ref = reference_acc(kind, loaded.constants(node), ref["xq"])
            acc_c = read_dump(forced, i, "acc", torch.int32, acc_ref.shape)
            yq_c = read_dump(forced, i, "yq", ref["yq"].dtype, ref["yq"].shape)
            yq_free = read_dump(free, i, "yq", ref["yq"].dtype, ref["yq"].shape)
            diff = (yq_c.to(torch.int64) - ref["yq"].to(torch.int64)).abs()
            rows.append({"layer": name, "elements": int(yq_c.numel()),
                         "acc_mismatches": int((acc_c != acc_ref).sum()),
                         "code_mismatches": int((diff > 0).sum()), "max_code_diff": int(diff.max()),
                         "free_running_identical": float((yq_free == ref["yq"]).double().mean())})
    e2e_cpu = [r.as_dict() for r in end_to_end(c_out, ref_out)]
    e2e_fq = [r.as_dict() for r in end_to_end(c_out, io["fake_quant_outputs"])] if io else []
    acc_ok = all(r["acc_mismatches"] == 0 for r in rows)
    codes_ok = all(r["code_mismatches"] == 0 for r in rows)
    return {"cflags": cflags, "build_seconds": build_s, "run_seconds": run_s, "reference_seconds": ref_s,
            "compiler_warnings": warnings.strip(), "layers": len(rows), "per_layer": rows,
            "elements": sum(r["elements"] for r in rows), "acc_identical": acc_ok, "codes_identical": codes_ok,
            "free_running_identical": (sum(r["free_running_identical"] * r["elements"] for r in rows)
                                       / max(sum(r["elements"] for r in rows), 1)),
            "end_to_end_vs_cpu": e2e_cpu, "end_to_end_vs_fake_quant": e2e_fq,
            "exact": acc_ok and codes_ok}


def describe(c: dict[str, Any]) -> str:
    """Text lines for ``fbqc verify``."""
    if c.get("skipped"):
        return f"emitted C: skipped ({c['skipped']})"
    lines = [f"emitted C ({c['cflags']}; built in {c['build_seconds']:.1f} s, ran in {c['run_seconds']:.2f} s): "
             f"{c['layers']} layers teacher-forced, {c['elements']:,} outputs: int32 accumulators identical: "
             f"{c['acc_identical']}; output codes identical: {c['codes_identical']}; free-running "
             f"{100 * c['free_running_identical']:.3f} % of codes identical"]
    for name, key in (("cpu reference", "end_to_end_vs_cpu"), ("fake-quant", "end_to_end_vs_fake_quant")):
        for r in c[key]:
            lines.append(f"emitted C end to end vs {name} (output {r['output']}): max abs {r['max_abs']:.4g}, "
                         f"rel {r['rel_error']:.4g}")
    bad = [r for r in c["per_layer"] if r["acc_mismatches"] or r["code_mismatches"]]
    lines += [f"  {r['layer']}: {r['acc_mismatches']} accumulators, {r['code_mismatches']} codes differ "
              f"(max {r['max_code_diff']})" for r in bad[:10]]
    lines.append("C AGREES" if c["exact"] else "C DISAGREES")
    return "\n".join(lines)
