"""What ``fbqc verify`` on an htp artifact will run, and roughly how long it will take (said first).

- the per-layer teacher-forced check: always, every layer (split into ``--jobs`` chunks);
- sampled blocks: ``--blocks SPEC`` / ``--sample K``, or ``first,middle,last`` when the whole-model checks
  are estimated to take longer than :data:`~.estimate.AUTO_FULL_SECONDS` and ``--full`` was not given;
- the whole-model checks (end to end, free-running): ``--full``, or by default when they are cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fbqc.spec import QUANT

from . import estimate as E
from .blocks import Block, select


def _makespan(runs: list[float], n: int) -> float:
    """Wall time of ``runs`` on ``n`` workers, longest first to the least loaded."""
    load = [0.0] * max(1, n)
    for r in sorted(runs, reverse=True):
        load[load.index(min(load))] += r
    return max(load)


@dataclass
class Plan:
    full: bool
    blocks: list[Block]
    all_blocks: list[Block]
    jobs: int
    layers: int
    layer_gmac: float
    model_gmac: float
    why_blocks: str = ""                           # how the blocks were chosen
    block_gmac: dict[str, float] = field(default_factory=dict)
    layer_weight_bytes: int = 0                    # stored bytes of the layers' weight codes

    @property
    def layer_chunks(self) -> int:
        """As many as --jobs, and at least one per PART_BYTES of weights: QNN's preparation of one
        side-by-side graph grows faster than its size (SD3.5-Medium's 385 layers, 1.1 GB of int4
        weights, in one graph: still preparing after 20 min; Sana-600M's 288 MB: 28 s)."""
        from .partition import PART_BYTES

        return max(1, min(max(self.jobs, math.ceil(self.layer_weight_bytes / PART_BYTES)), self.layers))

    @property
    def sim_parts(self) -> int:
        return self.layer_chunks + len(self.blocks) + (2 if self.full else 0)

    # --- estimates ------------------------------------------------------------------------------
    def estimate(self) -> dict[str, Any]:
        tc, ts = E.layers_seconds(self.layer_gmac)
        parts = {"teacher_forced": {"layers": self.layers, "gmac": self.layer_gmac, "compile_seconds": tc,
                                    "simulator_seconds": ts}}
        for name, g in self.block_gmac.items():
            c, s = E.graph_seconds(g)
            parts[f"block {name}"] = {"gmac": g, "compile_seconds": c, "simulator_seconds": s}
        whole = E.whole_model_seconds(self.model_gmac)
        parts["whole_model"] = {"gmac": self.model_gmac, "seconds": whole, "ran": self.full}
        runs = [(tc + ts) / self.layer_chunks] * self.layer_chunks
        runs += [sum(E.graph_seconds(g)) for g in self.block_gmac.values()]
        if self.full:
            c, s = E.graph_seconds(self.model_gmac)
            runs += [E.SESSION_SECONDS + s, c + s]          # the context binary; the free-running graph
        return {"parts": parts, "seconds": _makespan(runs, self.jobs), "jobs": self.jobs, "basis": E.basis()}

    def checks(self) -> dict[str, Any]:
        """Exactly what ran, and why the rest did not (the JSON result's ``checks``)."""
        whole = E.whole_model_seconds(self.model_gmac)
        skip = None if self.full else f"estimated {E.duration(whole)}; --full to run it"
        return {"teacher_forced": {"ran": True, "layers": self.layers},
                "blocks": {"ran": bool(self.blocks), "selected": [b.name for b in self.blocks],
                           "of": len(self.all_blocks), "chosen_by": self.why_blocks},
                "end_to_end": {"ran": self.full, **({"why_not": skip} if skip else {})},
                "free_running": {"ran": self.full, **({"why_not": skip} if skip else {})}}

    def text(self) -> str:
        est = self.estimate()
        p = est["parts"]
        tf = p["teacher_forced"]
        lines = [f"verify plan (estimated; {self.jobs} simulator run(s) at a time):",
                 f"  teacher-forced, every layer: {self.layers} layers, {tf['gmac']:.3g} GMAC: "
                 f"~{E.duration(tf['compile_seconds'] + tf['simulator_seconds'])} "
                 f"({E.duration(tf['compile_seconds'])} compile + {E.duration(tf['simulator_seconds'])} simulator)"]
        if self.blocks:
            g = sum(self.block_gmac.values())
            c, s = E.graph_seconds(g)
            names = ", ".join(b.name for b in self.blocks)
            lines.append(f"  blocks {names} ({len(self.blocks)} of {len(self.all_blocks)}, {self.why_blocks}), "
                         f"{g:.3g} GMAC: ~{E.duration(c + s)} plus lowering")
        whole = p["whole_model"]
        if self.full:
            lines.append(f"  whole model (end to end + free-running), {whole['gmac']:.3g} GMAC: "
                         f"~{E.duration(whole['seconds'])}")
        else:
            lines.append(f"  whole model (end to end + free-running), {whole['gmac']:.3g} GMAC: not run: "
                         f"estimated {E.duration(whole['seconds'])}; --full to run it")
        lines.append(f"  in all ~{E.duration(est['seconds'])} of simulator work, plus the cpu reference and lowering")
        lines.append(f"  basis: {est['basis']}")
        return "\n".join(lines)


def plan_verify(ref, all_blocks: list[Block], spec: str | None, k: int | None, full: bool | None,
                jobs: int = 1) -> Plan:
    """``full``: True (--full), None (not given: run the whole-model checks when they are cheap)."""
    if jobs < 1:
        from fbqc.errors import UserError

        raise UserError(f"--jobs {jobs}: give at least 1")
    program = ref.program
    layer_g = E.layer_gmac(program)
    model_g = E.gmac(program.graph.nodes)
    sampled = spec is not None or k is not None
    if full is None:
        full = not sampled and (not all_blocks or E.whole_model_seconds(model_g) <= E.AUTO_FULL_SECONDS)
    if sampled:
        chosen = select(all_blocks, spec, k)
        why = f"--blocks {spec}" if spec is not None else f"--sample {k}"
    elif not full:
        chosen, why = select(all_blocks, "first,middle,last"), "first, middle, last by default"
    else:
        chosen, why = [], ""
    weights = sum(program.attr(n.args[3]).numel() * (0.5 if n.meta[QUANT].weight.container.logical == "int4" else 1)
                  for n in ref.layers().values())         # the codes as the HTP stores them
    return Plan(full, chosen, all_blocks, jobs, len(ref.layers()), layer_g, model_g, why,
                {b.name: E.gmac(b.nodes) for b in chosen}, int(weights))
