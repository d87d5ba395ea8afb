"""Backends are plugins found through the ``fbqc.backends`` entry-point group, loaded lazily.

A plugin that fails to import yields a warning naming it; it never breaks unrelated commands.
Nothing registers itself as an import side effect.
"""
from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points

from fbqc.errors import UserError

from .base import Artifact, Backend, LoadedArtifact, NodeSupport, SupportReport

GROUP = "fbqc.backends"


def available() -> dict[str, EntryPoint]:
    """Registered backends by name (not imported yet)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_backend(name: str) -> Backend:
    eps = available()
    if name not in eps:
        raise UserError(f"unknown target {name!r}; installed backends: {', '.join(sorted(eps)) or 'none'} "
                        f"(see `fbqc list-backends`)")
    try:
        cls = eps[name].load()
    except Exception as e:  # noqa: BLE001 - a broken plugin must be named, not crash
        raise UserError(f"backend plugin {name!r} ({eps[name].value}) failed to load: "
                        f"{type(e).__name__}: {e}") from e
    return cls()


def describe_all() -> list[dict[str, str]]:
    """One row per installed backend; broken plugins are reported with a warning, not raised."""
    rows = []
    for name, ep in sorted(available().items()):
        try:
            backend = ep.load()()
            rows.append({"name": name, "version": backend.version, "entry_point": ep.value,
                         "description": (type(backend).__doc__ or "").strip().splitlines()[0]})
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"backend plugin {name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}",
                          stacklevel=2)
            rows.append({"name": name, "version": "?", "entry_point": ep.value,
                         "description": f"BROKEN: {type(e).__name__}: {e}"})
    return rows


__all__ = ["available", "load_backend", "describe_all", "Backend", "SupportReport", "NodeSupport",
           "Artifact", "LoadedArtifact", "GROUP"]
