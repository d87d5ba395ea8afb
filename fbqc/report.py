"""Human-readable summaries for the CLI (the same data is available with --json)."""
from __future__ import annotations

from collections import Counter
from typing import Any


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths]), *map(fmt, cells[1:])])


def _bits_mix(layers: list[dict]) -> str:
    mix = Counter(f"W{r['weight_bits']:g}A{r['act_bits_in']}" for r in layers)
    return ", ".join(f"{k} ×{v}" for k, v in sorted(mix.items()))


def _placement(b: dict[str, Any]) -> str | None:
    """An htp artifact's placement: nodes on the HTP vs the CPU (None: the backend records none)."""
    p = b.get("placement")
    if not p:
        return None
    on = p["by_execution_provider"].get("QNNExecutionProvider", 0)
    return f"{on:,} of {p['nodes']:,} ONNX nodes on the HTP ({p['soc']}, v{p['htp_arch']}), {p['cpu_nodes']} on the CPU"


def _context_binary(b: dict[str, Any]) -> str | None:
    c = b.get("context_binary")
    if not c and "model_ctx_qnn.bin" in b.get("sizes", {}):
        c = {"file": "model_ctx_qnn.bin", "bytes": b["sizes"]["model_ctx_qnn.bin"]}
    if not c:
        return None
    if isinstance(c, list):          # a model split into several QNN contexts
        return (f"{len(c)} contexts, {_mb(sum(e['bytes'] for e in c))} in all ("
                + ", ".join(f"{e['file']} {_mb(e['bytes'])}" for e in c) + "); stable sha256 "
                + ", ".join(e["stable_sha256"][:12] + "…" for e in c))
    line = f"{c['file']} {_mb(c['bytes'])}"
    if "stable_sha256" in c:
        line += f", stable sha256 {c['stable_sha256'][:12]}… ({c['varying_bytes']:,} varying bytes masked)"
    return line


def _binary(b: dict[str, Any]) -> str | None:
    """An htp binary's bits per quantized weight and where its bytes go (backends/htp/sizes.py)."""
    x = b.get("binary")
    if not x or not x.get("bits_per_quantized_weight"):
        return None
    top = sorted(((v, k) for k, v in x["bytes"].items() if v), reverse=True)[:3]
    parts = ", ".join(f"{k.split('_')[0]} {v / 1e6:,.1f}" for v, k in top)
    return f"{x['bits_per_quantized_weight']:.2f} bits/quantized weight ({parts} MB)"


def _run(r: dict[str, Any]) -> str:
    return f"{r['dir']} (schedule {r['schedule']}, {r['steps']} steps)"


def compile_summary(result: dict[str, Any]) -> str:
    m = result["manifest"]
    s, a = m["size"], m["agreement"]
    e2e_fq, e2e_f = a["integer_vs_fake_quant"][0], a["integer_vs_float"][0]
    rows = [
        ["artifact", result["artifact"]],
        ["backend", f"{m['backend']['name']} ({m['backend']['version']})"],
        ["layers quantized", f"{len(m['layers'])} ({_bits_mix(m['layers'])})"],
        ["params quantized", f"{s['quantized_params']:,} of {s['params']:,} ({100 * s['quantized_fraction']:.1f} %)"],
        ["size", f"{_mb(s['float_bytes'])} → {_mb(s['bytes_after'])}"],
        ["bits / quantized param", f"{s['bits_per_quantized_param']:.3f} (storage incl. scales; "
                                   f"{s['mean_weight_bits']:.3g} logical)"],
        ["calibration", f"{m['calibration']['samples']} samples, {m['calibration']['observer']}"],
        ["integer vs fake-quant", f"max abs {e2e_fq['max_abs']:.3g}, rel {e2e_fq['rel_error']:.3g}"],
        ["integer vs float", f"max abs {e2e_f['max_abs']:.3g}, rel {e2e_f['rel_error']:.3g}"],
        ["time", f"{result['timings']['total']:.1f} s, peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB"],
    ]
    extra = [["placement", _placement(m["backend"])], ["context binary", _context_binary(m["backend"])],
             ["binary bytes", _binary(m["backend"])],
             ["trained in run", _run(m["run"]) if m.get("run") else None]]
    rows[2:2] = [r for r in extra if r[1]]
    return _table(["compile", ""], rows)


def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
    s = result["summary"]
    rows = sorted(result["per_layer"], key=lambda r: (r["exact"], -r["fq_other"], -r["fq_ties"]))
    shown = rows if all_layers else rows[:10]
    lines = [f"{result['artifact']} ({result['backend']}): {s['layers']} layers, {s['elements']:,} outputs, "
             f"teacher-forced"]
    lines.append(_table(
        ["layer", "elements", "acc ≠", "contract ≠", "= fake-quant", "ties", "other", "max LSB"],
        [[r["layer"], r["elements"], r["acc_mismatches"], r["contract_mismatches"], r["fq_equal"],
          r["fq_ties"], r["fq_other"], r["max_lsb"]] for r in shown]))
    if len(rows) > len(shown):
        lines.append(f"… {len(rows) - len(shown)} more layers (--all-layers)")
    lines.append(f"int32 accumulators identical: {s['acc_identical']}; requantized codes identical to the "
                 f"contract: {s['contract_identical']}; identical to fake-quant: "
                 f"{100 * s['fq_identical_fraction']:.4f} % ({s['fq_ties']} .5-ties, {s['fq_other']} other)")
    for name, key in (("fake-quant", "end_to_end_vs_fake_quant"), ("float", "end_to_end_vs_float")):
        for r in result[key]:
            lsb = f", {100 * r['within_1lsb']:.3f} % within 1 LSB" if r.get("within_1lsb") is not None else ""
            lines.append(f"end to end vs {name} (output {r['output']}): max abs {r['max_abs']:.4g}, "
                         f"rel {r['rel_error']:.4g}{lsb}")
    lines.append("AGREE" if s["exact"] else "DISAGREE")
    return "\n".join(lines)


def inspect_summary(m: dict[str, Any]) -> str:
    s = m["size"]
    lines = [f"model    {m['model']['module']} from {m['model']['file']} {m['model'].get('opts') or ''}",
             f"backend  {m['backend']['name']} ({m['backend']['version']})",
             f"flags    " + ", ".join(f"{k}={v}" for k, v in m["flags"].items() if v not in (None, (), [], {})),
             f"inputs   " + ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in m["inputs"].items()),
             f"size     {_mb(s['float_bytes'])} → {_mb(s['bytes_after'])}, "
             f"{s['bits_per_quantized_param']:.3f} bits per quantized param",
             "stages   " + " → ".join(f"{st['pass']}" for st in m["stages"])]
    for label, text in (("run", _run(m["run"]) if m.get("run") else None), ("htp", _placement(m["backend"])),
                        ("context", _context_binary(m["backend"])), ("binary", _binary(m["backend"]))):
        if text:
            lines.insert(1 if label == "run" else len(lines), f"{label:<8} {text}")
    lines.append("")
    lines.append(_table(["layer", "kind", "bits", "levels", "container", "act", "shape", "params"],
                        [[r["layer"], r["kind"], f"{r['weight_bits']:g}", f"{r['levels'][0]}…{r['levels'][1]}",
                          r["container"], f"A{r['act_bits_in']}", "×".join(map(str, r["shape"])),
                          f"{r['params']:,}"] for r in m["layers"]]))
    if m.get("skipped_layers"):
        lines.append("kept float: " + ", ".join(f"{k} ({v})" for k, v in m["skipped_layers"].items()))
    lines.append("files    " + ", ".join(m["files"]))
    return "\n".join(lines)


def plan_summary(p: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    lines = [f"{p['module']}: {p['params']:,} parameters ({gib(p['float_bytes'])} fp32"
             f"{', on the meta device' if p['meta_weights'] else ''}), exported in {p['export_seconds']:.1f} s",
             f"{len(p['layers'])} layers to quantize ({_bits_mix(p['layers'])}), "
             f"{p['quantized_params']:,} params ({100 * p['quantized_params'] / max(p['params'], 1):.1f} %)",
             f"a full compile needs about {gib(p['compile_memory_estimate_bytes'])} of memory; "
             + (f"this machine has {gib(p['available_bytes'])} available: "
                f"{'fits' if p['fits'] else 'does NOT fit'}" if p["available_bytes"] else "")]
    return "\n".join(lines)
