"""Text reports of the htp backend: ``fbqc verify`` and ``fbqc profile`` (the same data with --json)."""
from __future__ import annotations

from typing import Any

from fbqc.summaries import mb, table

from .verify import A8_WITHIN_1LSB_GOAL, A16_REL_ERROR_LIMIT


def _pct(x: float) -> str:
    return f"{100 * x:.3f} %"


def _layer_rows(rows: list[dict[str, Any]], limit: int | None) -> tuple[str, int]:
    rows = sorted(rows, key=lambda r: (r["within_1lsb"], -r["max_lsb"]))
    shown = rows if limit is None else rows[:limit]
    text = table(["layer", "acts", "elements", "exact", "≤ 1 LSB", "max LSB", "rel err"],
                  [[r["layer"], f"A{r['act_bits']}", f"{r['elements']:,}", _pct(r["exact"]),
                    _pct(r["within_1lsb"]), r["max_lsb"], f"{r['rel_error']:.2e}"] for r in shown])
    return text, len(rows) - len(shown)


def _summary_line(s: dict[str, Any]) -> str:
    line = (f"A8 layers: {s['a8_layers']}, {s['a8_elements']:,} outputs: {_pct(s['a8_exact'])} exact, "
            f"{_pct(s['a8_within_1lsb'])} within 1 LSB, max {s['a8_max_lsb']} LSB")
    if s["a16_layers"]:
        line += (f"; A16 layers: {s['a16_layers']}, max rel error {s['a16_max_rel_error']:.2e} "
                 f"(max {s['a16_max_lsb']} LSB)")
    return line


def _block_table(rows: list[dict[str, Any]]) -> str:
    def e2e(r):
        v = r["vs_cpu"]
        bad = any(x.get("finite") is False for x in v)
        return ("NON-FINITE " if bad else "") + ", ".join(f"{x['rel_error']:.2e}" for x in v), \
            ", ".join(f"{x['max_abs']:.3g}" for x in v)

    out = []
    for r in rows:
        s = r["summary"]
        rel, mx = e2e(r)
        out.append([r["block"], f"{r['gmac']:.3g}", rel, mx, s["layers"], _pct(s["a8_exact"]),
                    _pct(s["a8_within_1lsb"]), s["a8_max_lsb"],
                    f"{s['a16_max_rel_error']:.2e}" if s["a16_layers"] else "–"])
    return table(["block", "GMAC", "output rel err", "max abs", "layers", "exact", "≤ 1 LSB", "max LSB",
                   "A16 rel err"], out)


def _checks_lines(result: dict[str, Any]) -> list[str]:
    c = result.get("checks")
    if not c:
        return []
    b = c["blocks"]
    ran = [f"teacher-forced (all {c['teacher_forced']['layers']} layers)"]
    if b["ran"]:
        ran.append(f"{len(b['selected'])} of {b['of']} blocks ({b['chosen_by']})")
    if c["end_to_end"]["ran"]:
        ran.append("end to end and free-running (whole model)")
    lines = ["checks run: " + "; ".join(ran)]
    sec = result.get("seconds") or {}
    if "total" in sec:
        parts = [f"cpu reference {sec['cpu_reference']:.0f} s",
                 f"teacher-forced {sec['compile_seconds']:.0f} s compile + {sec['run_seconds']:.0f} s simulator"]
        for name, t in (sec.get("blocks") or {}).items():
            parts.append(f"{name} {t['lower']:.0f} + {t['compile']:.0f} + {t['run']:.0f} s")
        if "htp_run" in sec:
            fr = sec["free_running"]
            parts.append(f"end to end {sec['htp_run']:.0f} s, free-running {fr['compile'] + fr['run']:.0f} s")
        lines.append(f"time: {sec['total']:.0f} s in all ({sec['simulator_wall']:.0f} s of simulator work, "
                     f"wall): " + "; ".join(parts) + (" (blocks: lower + compile + run)" if sec.get("blocks") else ""))
    if not c["end_to_end"]["ran"]:
        why = c["end_to_end"]["why_not"]
        lines.append(f"end to end not run: {why}")
        lines.append(f"free-running (whole model) not run: {why}")
    return lines


def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
    s = result["summary"]
    lines = [f"{result['artifact']} (htp, {result['soc']} simulator) vs the cpu reference, per quantized "
             f"layer, teacher-forced (fed the reference's input codes):"]
    text, more = _layer_rows(result["per_layer"], None if all_layers else 10)
    lines.append(text)
    if more:
        lines.append(f"… {more} more layers (--all-layers)")
    lines.append(_summary_line(s))
    if "blocks" in result:
        bl = result["blocks"]
        lines.append(f"sampled blocks ({len(bl['per_block'])} of {bl['of']}), each compiled as a graph of its "
                     f"own and fed the cpu reference's block inputs; its layers' codes free-running inside it:")
        lines.append(_block_table(bl["per_block"]))
    if "free_running" in result:
        fr = result["free_running"]["summary"]
        lines.append("free-running (the HTP's own fp16 float ops between layers): " + _summary_line(fr))
    for name, key in (("cpu reference", "end_to_end_vs_cpu"), ("fake-quant", "end_to_end_vs_fake_quant"),
                      ("float", "end_to_end_vs_float")):
        for r in result.get(key, []):
            extra = ""
            if r.get("within_1lsb") is not None:
                extra = f", {_pct(r['within_1lsb'])} within 1 LSB"
                if r.get("max_lsb") is not None:
                    extra += f", max {r['max_lsb']:.1f} LSB"
            lines.append(f"end to end vs {name} (output {r['output']}): max abs {r['max_abs']:.4g}, "
                         f"rel {r['rel_error']:.4g}{extra}")
    lines += _checks_lines(result)
    goal = f"goal: A8 ≥ {_pct(A8_WITHIN_1LSB_GOAL)} within 1 LSB, A16 rel error ≤ {A16_REL_ERROR_LIMIT:g}"
    lines.append(("AGREE" if s["passed"] else "DISAGREE") + f" ({goal}; teacher-forced"
                 + (", blocks and whole model reported beside it)" if "checks" in result else ")"))
    return "\n".join(lines)


def profile_summary(result: dict[str, Any], top_layers: int = 8) -> str:
    if result.get("mode") == "blocks":
        return blocks_profile_summary(result)
    total = result["total_cycles"]
    lines = [f"{result['artifact']}: simulated HTP ({result['soc']}, Hexagon v{result['htp_arch']}) for "
             f"inputs {result['inputs']} — {total:,} cycles "
             f"(accelerator execute; simulated in {result['simulator_seconds']:.1f} s)"]
    lines.append(table(["op type", "nodes", "cycles", "share"],
                        [[r["op"], r["nodes"], f"{r['cycles']:,}", f"{100 * r['share']:.1f} %"]
                         for r in result["by_op_type"]] +
                        [["total (graph)", sum(r["nodes"] for r in result["by_op_type"]), f"{total:,}",
                          "100.0 %"]]))
    layers = result["by_layer"][:top_layers]
    lines.append(table(["layer", "cycles"], [[r["layer"], f"{r['cycles']:,}"] for r in layers]))
    if result.get("csv"):
        lines.append(f"raw profile: {result['csv']}")
    return "\n".join(lines)


def blocks_profile_summary(result: dict[str, Any]) -> str:
    rows, est = result["per_block"], result["estimate"]
    lines = [f"{result['artifact']}: simulated HTP ({result['soc']}, Hexagon v{result['htp_arch']}) for inputs "
             f"{result['inputs']}, sampled transformer blocks, each compiled as a graph of its own "
             f"(simulated in {result['simulator_seconds']:.1f} s):"]
    lines.append(table(["block", "GMAC", "cycles", "top op types"],
                        [[r["block"], f"{r['gmac']:.3g}", f"{r['total_cycles']:,}",
                          ", ".join(f"{o['op']} {100 * o['share']:.0f} %" for o in r["by_op_type"][:3])]
                         for r in rows]))
    total = result["total_cycles"]
    lines.append(f"op types over the {len(rows)} profiled block(s):")
    lines.append(table(["op type", "nodes", "cycles", "share"],
                        [[r["op"], r["nodes"], f"{r['cycles']:,}", f"{100 * r['share']:.1f} %"]
                         for r in result["by_op_type"]] +
                        [["total (graphs)", sum(r["nodes"] for r in result["by_op_type"]), f"{total:,}",
                          "100.0 %"]]))
    per = "; ".join(f"{g}: {v['blocks']} × {v['mean_cycles']:,.0f}" for g, v in est["groups"].items()
                    if v["mean_cycles"] is not None)
    lines.append(f"transformer blocks of the whole model: ~{est['transformer_block_cycles']:,} cycles ({per})")
    lines.append(f"basis: {est['basis']}")
    csvs = [r["csv"] for r in rows if r.get("csv")]
    if csvs:
        lines.append(f"raw profiles: {', '.join(csvs)}")
    return "\n".join(lines)


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
        return (f"{len(c)} contexts, {mb(sum(e['bytes'] for e in c))} in all ("
                + ", ".join(f"{e['file']} {mb(e['bytes'])}" for e in c) + "); stable sha256 "
                + ", ".join(e["stable_sha256"][:12] + "…" for e in c))
    line = f"{c['file']} {mb(c['bytes'])}"
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


def describe_artifact(section: dict[str, Any], short: bool = False) -> list[tuple[str, str]]:
    """Lines of the compile summary (``short``: of ``fbqc inspect``) about an htp manifest section."""
    rows = [(("htp", "placement"), _placement(section)), (("context", "context binary"), _context_binary(section)),
            (("binary", "binary bytes"), _binary(section))]
    return [(labels[0] if short else labels[1], text) for labels, text in rows if text]
