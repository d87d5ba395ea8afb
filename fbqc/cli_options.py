"""Option parsers and output helpers shared by the ``fbqc`` commands (their own module so that each
command module imports them without importing :mod:`fbqc.cli`)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click


def _bits(ctx, param, value):
    if value is None:
        return None
    from .quant_math import check_bits
    try:
        return check_bits(value, "--bits")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _pairs(ctx, param, values) -> dict[str, float]:
    out = {}
    from .quant_math import check_bits
    for v in values:
        pattern, sep, bits = v.rpartition("=")
        if not sep or not pattern:
            raise click.BadParameter(f"{v!r}: expected PATTERN=BITS, e.g. 'proj_out=8'")
        try:
            out[pattern] = check_bits(bits, f"bits for {pattern!r}")
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return out


def _emit(ctx: click.Context, data: Any, text: str) -> None:
    if ctx.find_root().params.get("as_json") or ctx.params.get("as_json"):
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


def _progress(quiet: bool) -> bool:
    """Progress bars only on a terminal: redirected to a file or a pipe, the log lines stay and the
    bars (carriage returns, escape codes) go."""
    return not quiet and sys.stderr.isatty()


def backend_flags(command: str):
    """Decorator: the flags the installed backends declare for ``command`` (their options dataclasses,
    fbqc.backends.base.option), passed to the command as keyword arguments (None: not given)."""
    from .plugins import flag_owners

    def deco(f):
        import inspect
        import warnings

        core = {n for n, p in inspect.signature(f).parameters.items() if p.kind != p.VAR_KEYWORD}
        for name, (fld, owners) in reversed(list(flag_owners(command).items())):
            md = fld.metadata
            if name in core:                      # a backend may add flags, never replace the core's
                warnings.warn(f"backend(s) {', '.join(owners)}: option {name!r} ({md['flag']}) clashes with "
                              f"fbqc {command}'s own {name!r}; left out (prefix it with the backend's name)",
                              stacklevel=2)
                continue
            kw: dict[str, Any] = {"help": md["help"], "default": None}
            if md["is_flag"]:
                kw.update(is_flag=True, flag_value=True)
            else:
                kw.update(type=md["type"], metavar=md["metavar"])
            f = click.option(md["flag"], name, **kw)(f)
        return f
    return deco
