"""The backend contract, declared in one place: what a plugin in the ``fbqc.backends`` group provides.

A backend receives an INTEGER program (the integer reference, DESIGN.md §3) and writes its files into
a directory the caller owns; the caller writes ``manifest.json``, the reference program
(:data:`fbqc.reference.PROGRAM_FILE`) and the example inputs/outputs around them, then renames the
directory into place.

Required (:class:`Backend`)::

    name: str                                   # the --target value
    Options: type                               # a dataclass; fields made with option() are CLI flags
    version -> str                              # property: what built the artifact (manifest, list-backends)
    check_options(options) -> None              # bad option values fail before any work
    supports(program, options) -> SupportReport # per node: can it take it, for these options
    compile(program, options, out_dir) -> Artifact
    load(directory) -> LoadedArtifact           # run(inputs), layer_codes(inputs)

Optional, found by ``isinstance`` against these runtime-checkable protocols (never by ``getattr``):

- :class:`Verifies` — the backend checks its artifacts itself (``fbqc verify``), with its own
  ``VerifyOptions`` flags; without it the core compares ``load(dir).run`` / ``layer_codes`` with the
  reference (:func:`fbqc.artifact_verify.compare_with_reference`).
- :class:`Profiles` — ``fbqc profile``: the artifact's cost on the target, with ``ProfileOptions`` flags.
- :class:`Describes` — lines about its manifest section in ``fbqc compile``'s summary and ``fbqc inspect``.

Flags: every field of ``Options`` / ``VerifyOptions`` / ``ProfileOptions`` declared with
:func:`option` becomes a flag of ``fbqc compile`` / ``verify`` / ``profile``; the core holds no target's
flag. A flag given for an artifact or ``--target`` whose backend does not declare it is an error that
names the backend that does. A field named like one of the command's own parameters (``bits``,
``force`` …) is left out with a warning: prefix a backend's names with its own (``listing_constants``).
Backends may share a field (two simulators' ``--jobs``) when flag, type and kind are the same.
Backends use public core API only (no ``fbqc._private`` names, no other
plugin's modules).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from fbqc.program import Program


def option(flag: str, help: str, default: Any = None, *, type: Any = None, is_flag: bool = False,
           metavar: str | None = None, check: Callable[[Any], Any] | None = None) -> Any:
    """A field of a backend's options dataclass that is also a command-line flag.

    ``type``: a click parameter type (``click.IntRange(1, 64)``) or a Python type; ``check``: a
    callable that raises ``ValueError`` naming the problem (run by :func:`make_options`).
    """
    return field(default=default, metadata={"flag": flag, "help": help, "type": type, "is_flag": is_flag,
                                            "metavar": metavar, "check": check})


@dataclass(frozen=True)
class NoOptions:
    """Options of a backend (or of its verify/profile) that has none."""


def flags_of(options_cls: type | None) -> list[tuple[str, Any]]:
    """``(field name, dataclass Field)`` of each option of ``options_cls`` that is a flag."""
    if options_cls is None:
        return []
    if not is_dataclass(options_cls):
        raise TypeError(f"{options_cls!r}: backend options must be a dataclass")
    return [(f.name, f) for f in fields(options_cls) if "flag" in f.metadata]


def make_options(options_cls: type, values: dict[str, Any] | Any | None, owner: str) -> Any:
    """``options_cls`` from a mapping (unset keys take their defaults; an unknown key is an error that
    names the backend's options), or ``values`` itself when it already is one. Checks each field."""
    if isinstance(values, options_cls):
        opts = values
    else:
        values = dict(values or {})
        known = {f.name: f for f in fields(options_cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            names = ", ".join(f"{k} ({known[k].metadata.get('flag', k)})" for k in known) or "none"
            raise ValueError(f"{owner} has no option {', '.join(map(repr, unknown))}; its options: {names}")
        opts = options_cls(**values)
    for f in fields(options_cls):
        check = f.metadata.get("check")
        if check is not None and getattr(opts, f.name) is not None:
            check(getattr(opts, f.name))
    return opts


def defaults_of(options_cls: type) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not MISSING else None) for f in fields(options_cls)}


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
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: compile summary only


@runtime_checkable
class LoadedArtifact(Protocol):
    def run(self, inputs: dict[str, Any]) -> list[torch.Tensor]: ...

    def layer_codes(self, inputs: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Per quantized layer: its input codes ``xq`` and requantized output codes ``yq``."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str
    Options: type

    @property
    def version(self) -> str: ...

    def check_options(self, options: Any) -> None:
        """Raise ``ValueError`` naming the flag on a bad value (``--soc SM1234``), before any work."""
        ...

    def supports(self, program: Program, options: Any = None) -> SupportReport:
        """Per node: can the backend take it for these compile ``options`` (``--soc`` …)?"""
        ...

    def compile(self, program: Program, options: Any, out_dir: Path) -> Artifact: ...

    def load(self, directory: Path) -> LoadedArtifact: ...


@runtime_checkable
class Verifies(Protocol):
    """A backend that checks its own artifacts (``fbqc verify``): the result holds ``summary``
    (``exact``: the verdict) and whatever the backend's ``verify_summary`` prints."""

    VerifyOptions: type

    def verify(self, directory: Path, io: dict[str, Any], options: Any,
               log: Callable[[str], None] | None) -> dict[str, Any]: ...

    def verify_summary(self, result: dict[str, Any], all_layers: bool = False) -> str: ...


@runtime_checkable
class Profiles(Protocol):
    """``fbqc profile``: the artifact's simulated (or measured) cost on the target."""

    ProfileOptions: type

    def profile(self, directory: Path, io: dict[str, Any], csv_path: Path | None, options: Any,
                log: Callable[[str], None] | None) -> dict[str, Any]: ...

    def profile_summary(self, result: dict[str, Any]) -> str: ...


@runtime_checkable
class Describes(Protocol):
    """Lines about the backend's manifest section: ``(label, text)`` for the compile summary, or with
    ``short`` for ``fbqc inspect`` (labels of at most 8 characters)."""

    def describe_artifact(self, section: dict[str, Any], short: bool = False) -> list[tuple[str, str]]: ...
