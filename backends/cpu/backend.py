"""``cpu`` backend: runs the INTEGER graph in-process with the reference integer kernels.

Artifact: ``program.pt2`` — the INTEGER program re-exported with ``torch.export`` and saved with
``torch.export.save`` (integer weights, scales and the graph in one file; loading needs
``import fbqc`` for the ``fbqc::`` ops).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import fbqc
from fbqc.errors import ArtifactError
from fbqc.hooks import hooked
from fbqc.program import Program
from fbqc.spec import QUANT, SPEC_KEY, QuantSpec
from fbqc.stage import Stage
from fbqc.verifier import FBQC_OPS_AT, QUANT_TARGETS_AT

from ..base import Artifact, NodeSupport, SupportReport

PROGRAM_FILE = "program.pt2"
INTEGER_OPS = FBQC_OPS_AT[Stage.INTEGER]
LAYER_OPS = QUANT_TARGETS_AT[Stage.INTEGER]


def _flat_outputs(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class CpuBackend:
    """Reference integer kernels in-process (true int32 matmul); the golden reference."""

    name = "cpu"

    @property
    def version(self) -> str:
        return f"fbqc {fbqc.__version__}, torch {torch.__version__}"

    def supports(self, program: Program, options: dict[str, Any] | None = None) -> SupportReport:
        report = SupportReport(self.name)
        for n in program.graph.nodes:
            if n.op != "call_function":
                continue
            op = str(n.target)
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fbqc":
                ok = n.target in INTEGER_OPS
                reason = "" if ok else (f"{op} is not an integer op; run the graph through Fold and "
                                        f"LowerToInteger first")
            else:
                ok, reason = True, ""
            report.nodes.append(NodeSupport(n.name, op, ok, reason))
        return report

    def compile(self, program: Program, options: dict[str, Any], out_dir: Path) -> Artifact:
        if program.stage != Stage.INTEGER:
            raise ArtifactError(f"the cpu backend takes an INTEGER program, got {program.stage}")
        ep = torch.export.export(program.graph_module, (), program.example_inputs, strict=False)
        for n in ep.graph.nodes:   # provenance holds id()s of graphs: drop it so equal inputs → equal bytes
            n.meta.pop("from_node", None)
        torch.export.save(ep, out_dir / PROGRAM_FILE)
        files, manifest = [PROGRAM_FILE], {"program": PROGRAM_FILE}
        if options.get("emit_c"):                   # standalone C99 reference (c_emit/), --emit-c
            from .c_emit import DEFAULT_CFLAGS, emit_c

            manifest["c"] = emit_c(program, out_dir, cflags=options.get("c_flags") or DEFAULT_CFLAGS)
            files += manifest["c"]["files"]
        return Artifact(self.name, out_dir, files, manifest)

    def load(self, directory: Path) -> "CpuArtifact":
        return CpuArtifact(Path(directory))


class CpuArtifact:
    """A loaded cpu artifact: run it, or record the codes entering and leaving each integer layer."""

    def __init__(self, directory: Path):
        path = directory / PROGRAM_FILE
        if not path.is_file():
            raise ArtifactError(f"{directory}: no {PROGRAM_FILE}; not a cpu artifact")
        self.directory = directory
        self.exported = torch.export.load(path)
        gm = self.exported.module()
        fbqc.frontend._drop_guards(gm)
        for n in gm.graph.nodes:   # QuantSpecs travel as dicts in meta["custom"]
            if SPEC_KEY in n.meta.get("custom", {}):
                n.meta[QUANT] = QuantSpec.from_dict(n.meta["custom"][SPEC_KEY])
        self.program = Program(gm, Stage.INTEGER, {})

    def run(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        with torch.no_grad():
            return _flat_outputs(self.program(**inputs))

    def layers(self) -> dict[str, torch.fx.Node]:
        """Integer layer nodes by layer name (from the QuantSpec kept in node meta, else node name)."""
        out = {}
        for n in self.program.graph.nodes:
            if n.op == "call_function" and n.target in LAYER_OPS:
                out[n.meta[QUANT].layer] = n
        return out

    def layer_codes(self, inputs: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        names = {n.name: layer for layer, n in self.layers().items()}
        seen: dict[str, dict[str, torch.Tensor]] = {}

        def record(node_name, target, xq, *args):
            yq = target(xq, *args)
            seen[names[node_name]] = {"xq": xq, "yq": yq}
            return yq

        shadow, _ = hooked(self.program, lambda n: n.name in names, record)
        with torch.no_grad():
            shadow(**inputs)
        return seen

    def emitted_code_check(self, io: dict[str, Any]) -> dict[str, Any] | None:
        """Build and run the emitted C program (if the artifact has one) and compare it with this
        reference per layer (teacher-forced) and end to end; None without --emit-c."""
        from fbqc.artifact import read_manifest

        section = read_manifest(self.directory).get("backend", {}).get("c")
        if not section:
            return None
        from .c_emit.check import check_emitted_c

        return check_emitted_c(self.directory, self, io, section)

    def constants(self, node: torch.fx.Node) -> list[Any]:
        """Arguments of an integer layer node with get_attr constants resolved to tensors."""
        return [(self.program.attr(a) if a.op == "get_attr" else None) if isinstance(a, torch.fx.Node)
                else a for a in node.args]
