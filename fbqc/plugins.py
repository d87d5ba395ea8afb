"""The backend registry: plugins found through the ``fbqc.backends`` entry-point group, loaded lazily.

The contract they implement is declared in :mod:`fbqc.backends.base`; this module finds them, builds
their typed options from command-line values, and asks the optional protocols (``Verifies``,
``Profiles``, ``Describes``) by ``isinstance``. A plugin that fails to import yields a warning naming
it; it never breaks unrelated commands. Nothing registers itself as an import side effect.
"""
from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import UserError

GROUP = "fbqc.backends"

#: the options class attribute of a backend, per command that takes backend flags
OPTIONS_OF = {"compile": "Options", "verify": "VerifyOptions", "profile": "ProfileOptions"}


def available() -> dict[str, EntryPoint]:
    """Registered backends by name (not imported yet)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_backend(name: str):
    """An instance of the backend registered as ``name``; checks it declares the contract."""
    from fbqc.backends.base import Backend

    eps = available()
    if name not in eps:
        raise UserError(f"unknown target {name!r}; installed backends: {', '.join(sorted(eps)) or 'none'} "
                        f"(see `fbqc list-backends`)")
    try:
        backend = eps[name].load()()
    except Exception as e:  # noqa: BLE001 - a broken plugin must be named, not crash
        raise UserError(f"backend plugin {name!r} ({eps[name].value}) failed to load: "
                        f"{type(e).__name__}: {e}") from e
    if not isinstance(backend, Backend):
        missing = [a for a in ("name", "Options", "version", "check_options", "supports", "compile", "load")
                   if not hasattr(backend, a)]
        raise UserError(f"backend plugin {name!r} ({eps[name].value}) does not implement the backend "
                        f"contract (fbqc.backends.base.Backend): missing {', '.join(missing)}")
    return backend


def loaded_backends() -> dict[str, Any]:
    """Every installed backend that loads (a broken one: a warning naming it, and left out)."""
    out = {}
    for name in sorted(available()):
        try:
            out[name] = load_backend(name)
        except UserError as e:
            warnings.warn(str(e), stacklevel=2)
    return out


def describe_all() -> list[dict[str, str]]:
    """One row per installed backend; broken plugins are reported with a warning, not raised."""
    rows = []
    for name, ep in sorted(available().items()):
        try:
            backend = load_backend(name)
            rows.append({"name": name, "version": backend.version, "entry_point": ep.value,
                         "description": (type(backend).__doc__ or "").strip().splitlines()[0]})
        except UserError as e:
            warnings.warn(str(e), stacklevel=2)
            rows.append({"name": name, "version": "?", "entry_point": ep.value,
                         "description": f"BROKEN: {str(e).split(': ', 1)[-1]}"})
    return rows


def options_class(backend: Any, command: str) -> type | None:
    """The backend's options dataclass for ``command`` (None: the backend has no such command)."""
    return getattr(type(backend), OPTIONS_OF[command], None)


def backend_options(backend: Any, values: Any = None, command: str = "compile") -> Any:
    """The backend's typed options for ``command`` from a mapping of field values (or an instance);
    an unknown key or a bad value is a :class:`UserError` naming the flag."""
    from fbqc.backends.base import NoOptions, make_options

    cls = options_class(backend, command) or NoOptions
    try:
        opts = make_options(cls, values, f"the {backend.name} backend's {command}")
        if command == "compile":
            backend.check_options(opts)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    return opts


def flag_owners(command: str) -> dict[str, tuple[Any, list[str]]]:
    """Per flag field name of ``command``: the dataclass Field and the backends declaring it."""
    from fbqc.backends.base import flags_of

    owners: dict[str, tuple[Any, list[str]]] = {}
    for name, backend in loaded_backends().items():
        try:
            declared = flags_of(options_class(backend, command))
        except TypeError as e:                # a plugin's broken options: named, never a crash
            warnings.warn(f"backend plugin {name!r}: {e}; its {command} flags are left out", stacklevel=2)
            continue
        for field_name, f in declared:
            first, by = owners.setdefault(field_name, (f, []))
            if f.metadata["flag"] != first.metadata["flag"] or f.metadata["type"] != first.metadata["type"] \
                    or f.metadata["is_flag"] != first.metadata["is_flag"]:
                warnings.warn(f"backend plugin {name!r}: option {field_name!r} ({f.metadata['flag']}) differs "
                              f"from backend {by[0]!r}'s option of that name; {by[0]!r}'s flag is used",
                              stacklevel=2)
            by.append(name)
    return owners


def split_flags(command: str, backend_name: str, given: dict[str, Any], what: str) -> dict[str, Any]:
    """The flags given (``given``: field → value, None = not given) that ``backend_name`` declares for
    ``command``; a flag only other backends declare is an error naming them (``what``: the phrase
    after "the <backend> backend", e.g. "checks every layer and the whole model")."""
    from fbqc.backends.base import flags_of

    backend = load_backend(backend_name)          # an unknown --target: an error even without flags
    out = {k: v for k, v in given.items() if v is not None}
    own = {n for n, _ in flags_of(options_class(backend, command))}
    foreign = next((k for k in out if k not in own), None)
    if foreign is None:
        return out
    f, by = flag_owners(command).get(foreign, (None, []))       # only now: every backend is loaded
    flag = f.metadata["flag"] if f is not None else "--" + foreign.replace("_", "-")
    owner = "/".join(by) or "other"
    if command == "compile":
        raise UserError(f"{flag} is an option of the {owner} backend, not of --target {backend_name}")
    raise UserError(f"{flag} is for {owner} artifacts; the {backend_name} backend {what}")


def describe_artifact(section: dict[str, Any], short: bool = False) -> list[tuple[str, str]]:
    """The artifact's backend's lines about its manifest section (none if it declares none or is
    not installed: ``fbqc inspect`` works without the backend)."""
    from fbqc.backends.base import Describes

    try:
        backend = load_backend(section.get("name", "?"))
    except UserError:
        return []
    return list(backend.describe_artifact(section, short)) if isinstance(backend, Describes) else []
