"""``listing``: the backend contract (:mod:`fbqc.backends.base`) implemented out of tree."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from fbqc.backends.base import Artifact, NodeSupport, SupportReport, make_options, option
from fbqc.errors import ArtifactError
from fbqc.program import Program
from fbqc.stage import Stage

from .execute import Listing
from .listing import CONSTANTS_FILE, CONSTANTS_MODES, NoTextForm, statement


def _check_constants(value: str) -> None:
    if value not in CONSTANTS_MODES:
        raise ValueError(f"--listing-constants must be one of {', '.join(CONSTANTS_MODES)}, got {value!r}")


@dataclass(frozen=True)
class ListingOptions:
    # every field made with option() is a flag of `fbqc compile` (shown in its --help once installed)
    listing_constants: str = option("--listing-constants", "listing: where the constant tensors go: a "
                            "constants.safetensors file next to the listing, or inline in it as "
                            "tensor(dtype, shape, values) lines [default: safetensors].", "safetensors",
                            type=click.Choice(CONSTANTS_MODES), metavar="safetensors|inline",
                            check=_check_constants)


class ListingBackend:
    """The INTEGER program as a readable text listing, run by its own executor (example plugin)."""

    name = "listing"
    Options = ListingOptions

    @property
    def version(self) -> str:
        from . import __version__

        return f"fbqc-listing {__version__}, torch {torch.__version__}"

    def check_options(self, options: ListingOptions) -> None:
        """Nothing beyond the field's own check (``option(check=…)``, run by ``make_options``)."""

    def supports(self, program: Program, options: Any = None) -> SupportReport:
        """Per node: can it be written as a statement that the executor reads back?"""
        report = SupportReport(self.name)
        for n in program.graph.nodes:
            try:
                statement(n, program, "safetensors", None)
                ok, reason = True, ""
            except NoTextForm as e:
                ok, reason = False, str(e)
            report.nodes.append(NodeSupport(n.name, str(n.target) if n.op == "call_function" else n.op, ok, reason))
        return report

    def compile(self, program: Program, options: ListingOptions | dict[str, Any], out_dir: Path) -> Artifact:
        """Write program.listing (+ constants.safetensors); the manifest section counts them."""
        from .listing import write_listing

        options = make_options(ListingOptions, options, "the listing backend")
        if program.stage != Stage.INTEGER:
            raise ArtifactError(f"the listing backend takes an INTEGER program, got {program.stage}")
        t = time.perf_counter()
        try:
            section = write_listing(program, Path(out_dir), options.listing_constants)
        except NoTextForm as e:                 # supports() says which nodes; this is the Python API's path
            raise ArtifactError(f"the listing backend cannot write this program: {e}") from None
        files = section.pop("files")
        return Artifact(self.name, Path(out_dir), files, section, {"write_listing": time.perf_counter() - t})

    def load(self, directory: Path) -> Listing:
        """The listing parsed, ready to run (``fbqc verify`` compares it with the integer reference)."""
        return Listing(Path(directory))

    # --- Describes: a line for the compile summary and `fbqc inspect` --------------------------------
    @staticmethod
    def describe_artifact(section: dict[str, Any], short: bool = False) -> list[tuple[str, str]]:
        if "listing" not in section:
            return []
        where = CONSTANTS_FILE if section.get("constants") == "safetensors" else "inline"
        return [("listing", f"{section['listing']}: {section['lines']} lines, {section['statements']} "
                            f"statements, {section['layers']} integer layers, constants {where}")]
