"""The integer reference every artifact carries: the INTEGER program, saved as ``program.pt2``.

The core writes it into every artifact directory (whatever the backend), so that ``fbqc verify`` can
compare any backend's codes with the reference kernels (DESIGN.md §3) and a backend can run it as
its golden reference (the cpu backend *is* this program; the htp backend checks the simulator
against it). ``torch.export.save`` keeps integer weights, scales and the graph in one file; loading
needs ``import fbqc`` for the ``fbqc::`` ops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError
from .frontend import drop_guards
from .fx_utils import flat_tensors
from .hooks import hooked
from .program import Program
from .spec import QUANT, SPEC_KEY, QuantSpec
from .stage import Stage
from .stage_contract import QUANT_TARGETS_AT

PROGRAM_FILE = "program.pt2"
LAYER_OPS = QUANT_TARGETS_AT[Stage.INTEGER]


def save_reference(program: Program, directory: Path) -> str:
    """Write the INTEGER ``program`` into ``directory`` as :data:`PROGRAM_FILE`; returns the name."""
    if program.stage != Stage.INTEGER:
        raise ArtifactError(f"the integer reference is an INTEGER program, got {program.stage}")
    ep = torch.export.export(program.graph_module, (), program.example_inputs, strict=False)
    for n in ep.graph.nodes:   # provenance holds id()s of graphs: drop it so equal inputs → equal bytes
        n.meta.pop("from_node", None)
    torch.export.save(ep, Path(directory) / PROGRAM_FILE)
    return PROGRAM_FILE


def ensure_reference(program: Program, directory: Path) -> str:
    """The reference in ``directory``: written unless the caller (``fbqc compile``) already did."""
    if not (Path(directory) / PROGRAM_FILE).is_file():
        save_reference(program, directory)
    return PROGRAM_FILE


class Reference:
    """A loaded integer reference: run it, or record the codes entering and leaving each layer."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        path = directory / PROGRAM_FILE
        if not path.is_file():
            raise ArtifactError(f"{directory}: no {PROGRAM_FILE} (the integer reference); compile it again")
        self.directory = directory
        self.exported = torch.export.load(path)
        gm = self.exported.module()
        drop_guards(gm)
        for n in gm.graph.nodes:   # QuantSpecs travel as dicts in meta["custom"]
            if SPEC_KEY in n.meta.get("custom", {}):
                n.meta[QUANT] = QuantSpec.from_dict(n.meta["custom"][SPEC_KEY])
        self.program = Program(gm, Stage.INTEGER, {})

    def run(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        with torch.no_grad():
            return flat_tensors(self.program(**inputs))

    def layers(self) -> dict[str, torch.fx.Node]:
        """Integer layer nodes by layer name (from the QuantSpec kept in node meta)."""
        return {n.meta[QUANT].layer: n for n in self.program.graph.nodes
                if n.op == "call_function" and n.target in LAYER_OPS}

    def layer_codes(self, inputs: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        return self.run_recording(inputs)[1]

    def run_recording(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """One forward: the outputs (as :meth:`run`) and each layer's codes (as :meth:`layer_codes`)."""
        names = {n.name: layer for layer, n in self.layers().items()}
        seen: dict[str, dict[str, torch.Tensor]] = {}

        def record(node_name, target, xq, *args):
            yq = target(xq, *args)
            seen[names[node_name]] = {"xq": xq, "yq": yq}
            return yq

        shadow, _ = hooked(self.program, lambda n: n.name in names, record)
        with torch.no_grad():
            outputs = flat_tensors(shadow(**inputs))
        return outputs, seen

    def constants(self, node: torch.fx.Node) -> list[Any]:
        """Arguments of an integer layer node with get_attr constants resolved to tensors."""
        return [(self.program.attr(a) if a.op == "get_attr" else None) if isinstance(a, torch.fx.Node)
                else a for a in node.args]


def load_reference(directory: Path) -> Reference:
    return Reference(Path(directory))
