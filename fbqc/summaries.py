"""Human-readable summaries for the CLI (the same data is available with --json)."""
from __future__ import annotations

from collections import Counter
from typing import Any


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths]), *map(fmt, cells[1:])])


def _bits_mix(layers: list[dict]) -> str:
    mix = Counter(f"W{r['weight_bits']:g}A{r['act_bits_in']}" for r in layers)
    return ", ".join(f"{k} ×{v}" for k, v in sorted(mix.items()))


def backend_lines(section: dict[str, Any], short: bool) -> list[tuple[str, str]]:
    """What the artifact's backend says of its manifest section (its ``describe_artifact``), if anything."""
    from .plugins import describe_artifact

    return describe_artifact(section, short)


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
        ["size", f"{mb(s['float_bytes'])} → {mb(s['bytes_after'])}"],
        ["bits / quantized param", f"{s['bits_per_quantized_param']:.3f} (storage incl. scales; "
                                   f"{s['mean_weight_bits']:.3g} logical)"],
        ["calibration", f"{m['calibration']['samples']} samples, {m['calibration']['observer']}"],
        ["integer vs fake-quant", f"max abs {e2e_fq['max_abs']:.3g}, rel {e2e_fq['rel_error']:.3g}"],
        ["integer vs float", f"max abs {e2e_f['max_abs']:.3g}, rel {e2e_f['rel_error']:.3g}"],
        ["time", f"{result['timings']['total']:.1f} s, peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB"],
    ]
    extra = [[label, text] for label, text in backend_lines(m["backend"], short=False)]
    extra.append(["trained in run", _run(m["run"]) if m.get("run") else None])
    rows[2:2] = [r for r in extra if r[1]]
    return table(["compile", ""], rows)


def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
    s = result["summary"]
    rows = sorted(result["per_layer"], key=lambda r: (r["exact"], -r["fq_other"], -r["fq_ties"]))
    shown = rows if all_layers else rows[:10]
    lines = [f"{result['artifact']} ({result['backend']}): {s['layers']} layers, {s['elements']:,} outputs, "
             f"teacher-forced"]
    lines.append(table(
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
    ref = result.get("vs_reference")             # a backend that is not the reference itself
    if ref:
        lines.append(f"free-running vs the integer reference: {100 * ref['input_codes_identical']:.3f} % of layer "
                     f"input codes identical (max diff {ref['input_codes_max_diff']})")
        for r in ref["end_to_end"]:
            lsb = f", {100 * r['within_1lsb']:.3f} % within 1 LSB" if r.get("within_1lsb") is not None else ""
            lines.append(f"end to end vs the integer reference (output {r['output']}): max abs {r['max_abs']:.4g}, "
                         f"rel {r['rel_error']:.4g}{lsb} — {'ok' if ref['exact'] else 'FAILS'} (goal: {ref['goal']})")
    lines.append("AGREE" if s["exact"] and (not ref or ref["exact"]) else "DISAGREE")
    return "\n".join(lines)


def inspect_summary(m: dict[str, Any]) -> str:
    s = m["size"]
    lines = [f"model    {m['model']['module']} from {m['model']['file']} {m['model'].get('opts') or ''}",
             f"backend  {m['backend']['name']} ({m['backend']['version']})",
             f"flags    " + ", ".join(f"{k}={v}" for k, v in m["flags"].items() if v not in (None, (), [], {})),
             f"inputs   " + ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in m["inputs"].items()),
             f"size     {mb(s['float_bytes'])} → {mb(s['bytes_after'])}, "
             f"{s['bits_per_quantized_param']:.3f} bits per quantized param",
             "stages   " + " → ".join(f"{st['pass']}" for st in m["stages"])]
    for label, text in (("run", _run(m["run"]) if m.get("run") else None),
                        *backend_lines(m["backend"], short=True)):
        if text:
            lines.insert(1 if label == "run" else len(lines), f"{label:<8} {text}")
    lines.append("")
    lines.append(table(["layer", "kind", "bits", "levels", "container", "act", "shape", "params"],
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
