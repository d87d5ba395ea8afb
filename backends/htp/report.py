"""Text reports of the htp backend: ``fbqc verify`` and ``fbqc profile`` (the same data with --json)."""
from __future__ import annotations

from typing import Any

from fbqc.report import _table

from .verify import A8_WITHIN_1LSB_GOAL, A16_REL_ERROR_LIMIT


def _pct(x: float) -> str:
    return f"{100 * x:.3f} %"


def _layer_rows(rows: list[dict[str, Any]], limit: int | None) -> tuple[str, int]:
    rows = sorted(rows, key=lambda r: (r["within_1lsb"], -r["max_lsb"]))
    shown = rows if limit is None else rows[:limit]
    text = _table(["layer", "acts", "elements", "exact", "≤ 1 LSB", "max LSB", "rel err"],
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


def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
    s = result["summary"]
    lines = [f"{result['artifact']} (htp, {result['soc']} simulator) vs the cpu reference, per quantized "
             f"layer, teacher-forced (fed the reference's input codes):"]
    text, more = _layer_rows(result["per_layer"], None if all_layers else 10)
    lines.append(text)
    if more:
        lines.append(f"… {more} more layers (--all-layers)")
    lines.append(_summary_line(s))
    fr = result["free_running"]["summary"]
    lines.append("free-running (the HTP's own fp16 float ops between layers): " + _summary_line(fr))
    for name, key in (("cpu reference", "end_to_end_vs_cpu"), ("fake-quant", "end_to_end_vs_fake_quant"),
                      ("float", "end_to_end_vs_float")):
        for r in result[key]:
            extra = ""
            if r.get("within_1lsb") is not None:
                extra = f", {_pct(r['within_1lsb'])} within 1 LSB"
                if r.get("max_lsb") is not None:
                    extra += f", max {r['max_lsb']:.1f} LSB"
            lines.append(f"end to end vs {name} (output {r['output']}): max abs {r['max_abs']:.4g}, "
                         f"rel {r['rel_error']:.4g}{extra}")
    goal = f"goal: A8 ≥ {_pct(A8_WITHIN_1LSB_GOAL)} within 1 LSB, A16 rel error ≤ {A16_REL_ERROR_LIMIT:g}"
    lines.append(("AGREE" if s["passed"] else "DISAGREE") + f" ({goal})")
    return "\n".join(lines)


def profile_summary(result: dict[str, Any], top_layers: int = 8) -> str:
    total = result["total_cycles"]
    lines = [f"{result['artifact']}: simulated HTP ({result['soc']}, Hexagon v{result['htp_arch']}) for "
             f"inputs {result['inputs']} — {total:,} cycles "
             f"(accelerator execute; simulated in {result['simulator_seconds']:.1f} s)"]
    lines.append(_table(["op type", "nodes", "cycles", "share"],
                        [[r["op"], r["nodes"], f"{r['cycles']:,}", f"{100 * r['share']:.1f} %"]
                         for r in result["by_op_type"]] +
                        [["total (graph)", sum(r["nodes"] for r in result["by_op_type"]), f"{total:,}",
                          "100.0 %"]]))
    layers = result["by_layer"][:top_layers]
    lines.append(_table(["layer", "cycles"], [[r["layer"], f"{r['cycles']:,}"] for r in layers]))
    if result.get("csv"):
        lines.append(f"raw profile: {result['csv']}")
    return "\n".join(lines)
