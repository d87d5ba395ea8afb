"""``cpu`` backend: runs the INTEGER graph in-process with the reference integer kernels.

Artifact: the integer reference ``program.pt2`` every artifact carries (:mod:`fbqc.reference`) is
the cpu artifact; ``--emit-c`` adds standalone C99 code (``c/*.c``, ``weights.bin``, a README) that
``fbqc verify`` builds, runs and compares.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import fbqc
from fbqc.errors import ArtifactError
from fbqc.program import Program
from fbqc.reference import PROGRAM_FILE, Reference, ensure_reference
from fbqc.stage import Stage
from fbqc.stage_contract import FBQC_OPS_AT

from ..base import Artifact, NodeSupport, NoOptions, SupportReport, make_options, option

INTEGER_OPS = FBQC_OPS_AT[Stage.INTEGER]


@dataclass(frozen=True)
class CpuOptions:
    emit_c: bool = option("--emit-c", "cpu: also write standalone C99 reference code (c/*.c, weights.bin, "
                          "inputs.bin, README.md) that builds with any C compiler; fbqc verify runs it.",
                          False, is_flag=True)
    c_flags: str | None = option("--c-flags", "cpu: C compiler flags recorded for --emit-c (README, fbqc "
                                 "verify) [default: -O2 -std=c99 -ffp-contract=off].")


class CpuBackend:
    """Reference integer kernels in-process (true int32 matmul); the golden reference."""

    name = "cpu"
    Options = CpuOptions
    VerifyOptions = NoOptions

    @property
    def version(self) -> str:
        return f"fbqc {fbqc.__version__}, torch {torch.__version__}"

    def check_options(self, options: CpuOptions) -> None:
        if options.c_flags is not None and not options.emit_c:
            raise ValueError("--c-flags sets the C compiler flags of --emit-c: give --emit-c with it")

    def supports(self, program: Program, options: Any = None) -> SupportReport:
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

    def compile(self, program: Program, options: CpuOptions | dict[str, Any], out_dir: Path) -> Artifact:
        options = make_options(CpuOptions, options, "the cpu backend")
        if program.stage != Stage.INTEGER:
            raise ArtifactError(f"the cpu backend takes an INTEGER program, got {program.stage}")
        files, manifest = [ensure_reference(program, out_dir)], {"program": PROGRAM_FILE}
        if options.emit_c:                          # standalone C99 reference (c_emit/), --emit-c
            from .c_emit import DEFAULT_CFLAGS, emit_c

            manifest["c"] = emit_c(program, out_dir, cflags=options.c_flags or DEFAULT_CFLAGS)
            files += manifest["c"]["files"]
        return Artifact(self.name, out_dir, files, manifest)

    def load(self, directory: Path) -> Reference:
        return Reference(Path(directory))

    # --- Verifies: the reference against the fake-quant model, and the emitted C against both ---------
    def verify(self, directory: Path, io: dict[str, Any], options: Any,
               log: Callable[[str], None] | None) -> dict[str, Any]:
        from fbqc.artifact import read_manifest
        from fbqc.artifact_verify import compare_with_reference

        loaded, manifest = self.load(directory), read_manifest(Path(directory))
        result = compare_with_reference(Path(directory), loaded, io, manifest)
        section = manifest.get("backend", {}).get("c")
        if section:                                 # --emit-c: build, run and compare the C program
            from .c_emit.check import check_emitted_c

            result["emitted_c"] = check_emitted_c(Path(directory), loaded, io, section)
        return result

    @staticmethod
    def verify_summary(result: dict[str, Any], all_layers: bool = False) -> str:
        from fbqc.summaries import verify_summary

        text = verify_summary(result, all_layers)
        if "emitted_c" in result:
            from .c_emit.check import describe

            text += "\n" + describe(result["emitted_c"])
        return text

    # --- Describes: how to build and run the emitted C (compile summary, inspect) --------------------
    @staticmethod
    def describe_artifact(section: dict[str, Any], short: bool = False) -> list[tuple[str, str]]:
        c = section.get("c")
        if not c:
            return []
        from .c_emit import build_command

        return [("C" if short else "C reference", f"{build_command(c['cflags'])}; ./run inputs.bin outputs.bin "
                 f"(README.md)")]
