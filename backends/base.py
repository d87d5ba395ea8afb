"""The backend contract: ``supports(program, options) -> SupportReport`` and ``compile(program, options, dir)``.

A backend receives an INTEGER program and writes its files into a directory the caller owns (the
caller writes ``manifest.json`` and the reference inputs/outputs around them, then renames the
directory into place). ``load(dir)`` gives back something that runs the artifact for ``fbqc verify``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fbqc.program import Program


@dataclass(frozen=True)
class NodeSupport:
    node: str
    op: str
    supported: bool
    reason: str = ""


@dataclass
class SupportReport:
    """Which nodes a backend can take, and why not — never ``None`` for "unsupported"."""

    backend: str
    nodes: list[NodeSupport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(n.supported for n in self.nodes)

    def unsupported(self) -> list[NodeSupport]:
        return [n for n in self.nodes if not n.supported]

    def describe(self, limit: int = 10) -> str:
        bad = self.unsupported()
        if not bad:
            return f"{self.backend}: all {len(self.nodes)} nodes supported"
        lines = [f"{self.backend} cannot take {len(bad)} node(s):"]
        lines += [f"  {n.node} ({n.op}): {n.reason}" for n in bad[:limit]]
        if len(bad) > limit:
            lines.append(f"  … and {len(bad) - limit} more")
        return "\n".join(lines)


@dataclass
class Artifact:
    backend: str
    directory: Path
    files: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)   # backend's section of manifest.json


@runtime_checkable
class LoadedArtifact(Protocol):
    def run(self, inputs: dict[str, Any]) -> list[torch.Tensor]: ...

    def layer_codes(self, inputs: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Per quantized layer: its input codes ``xq`` and requantized output codes ``yq``."""
        ...


class Backend(Protocol):
    name: str

    @property
    def version(self) -> str: ...

    def supports(self, program: Program, options: dict[str, Any] | None = None) -> SupportReport:
        """Per node: can the backend take it for these compile ``options`` (``--soc`` …)?"""
        ...

    def compile(self, program: Program, options: dict[str, Any], out_dir: Path) -> Artifact: ...

    def load(self, directory: Path) -> LoadedArtifact: ...
