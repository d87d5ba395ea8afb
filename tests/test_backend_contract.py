"""The backend contract (backends/base.py) as the core uses it: typed options, flags contributed by
backends, optional protocols found by isinstance, the registry's errors (fbqc/plugins.py)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest

from fbqc import plugins
from fbqc.backends.base import Backend, Describes, NoOptions, Profiles, Verifies, flags_of, make_options, option
from fbqc.backends.cpu import CpuBackend
from fbqc.backends.htp import HtpBackend
from fbqc.errors import UserError


def test_shipped_backends_declare_the_contract():
    cpu, htp = CpuBackend(), HtpBackend()
    assert isinstance(cpu, Backend) and isinstance(htp, Backend)
    assert isinstance(cpu, Verifies) and isinstance(htp, Verifies)          # cpu: + the emitted C check
    assert isinstance(htp, Profiles) and not isinstance(cpu, Profiles)
    assert isinstance(htp, Describes) and isinstance(cpu, Describes)
    assert [n for n, _ in flags_of(cpu.Options)] == ["emit_c", "c_flags"]
    assert [n for n, _ in flags_of(htp.Options)] == ["soc", "contexts"]
    assert [n for n, _ in flags_of(htp.VerifyOptions)] == ["blocks", "sample", "full", "jobs"]
    assert flags_of(cpu.VerifyOptions) == []


def test_typed_options_from_a_mapping():
    htp = HtpBackend()
    opts = plugins.backend_options(htp, {"soc": "SM8650"})
    assert type(opts) is htp.Options and (opts.soc, opts.contexts) == ("SM8650", None)
    assert plugins.backend_options(htp, opts) is opts
    with pytest.raises(UserError, match=r"unknown --soc 'SM1234'"):
        plugins.backend_options(htp, {"soc": "SM1234"})
    with pytest.raises(UserError, match=r"htp backend's compile has no option 'emit_c'.*soc \(--soc\)"):
        plugins.backend_options(htp, {"emit_c": True})
    with pytest.raises(UserError, match=r"--c-flags .* give --emit-c with it"):
        plugins.backend_options(CpuBackend(), {"c_flags": "-O3"})


def test_a_flag_of_another_backend_is_an_error_naming_it():
    assert plugins.split_flags("compile", "htp", {"soc": "SM8650", "contexts": None}, "") == {"soc": "SM8650"}
    with pytest.raises(UserError, match=r"^--soc is an option of the htp backend, not of --target cpu$"):
        plugins.split_flags("compile", "cpu", {"soc": "SM8650"}, "")
    with pytest.raises(UserError, match=r"^--emit-c is an option of the cpu backend, not of --target htp$"):
        plugins.split_flags("compile", "htp", {"emit_c": True}, "")
    with pytest.raises(UserError, match=r"^--jobs is for htp artifacts; the cpu backend checks every"):
        plugins.split_flags("verify", "cpu", {"jobs": 2}, "checks every layer and the whole model")


def test_option_checks_run_and_unknown_fields_are_named():
    @dataclass(frozen=True)
    class Opts:
        level: int | None = option("--level", "a level in 1..3", check=lambda v: _in_range(v))

    def _in_range(v):
        if not 1 <= v <= 3:
            raise ValueError(f"--level must be in 1..3, got {v}")

    assert make_options(Opts, {"level": 2}, "x").level == 2
    with pytest.raises(ValueError, match=r"--level must be in 1\.\.3, got 7"):
        make_options(Opts, {"level": 7}, "x")
    with pytest.raises(ValueError, match=r"x has no option 'lvl'; its options: level \(--level\)"):
        make_options(Opts, {"lvl": 1}, "x")
    assert make_options(NoOptions, None, "x") == NoOptions()


def test_a_plugin_that_breaks_the_contract_is_named(monkeypatch):
    eps = {"half": EntryPoint("half", "collections:OrderedDict", plugins.GROUP),
           "gone": EntryPoint("gone", "no_such_module_fbqc:Backend", plugins.GROUP)}
    monkeypatch.setattr(plugins, "available", lambda: dict(eps))
    with pytest.raises(UserError, match=r"'half' \(collections:OrderedDict\) does not implement the backend "
                                        r"contract .*missing name, Options, version, check_options, supports"):
        plugins.load_backend("half")
    with pytest.raises(UserError, match=r"'gone' .* failed to load: ModuleNotFoundError"):
        plugins.load_backend("gone")
    with pytest.warns(UserWarning) as seen:
        rows = plugins.describe_all()
    assert [r["name"] for r in rows] == ["gone", "half"] and all(r["version"] == "?" for r in rows)
    assert len(seen) == 2
    with pytest.warns(UserWarning):
        assert plugins.flag_owners("compile") == {}          # broken plugins contribute no flags, no crash


def test_compile_options_record_the_backend_options():
    from fbqc.pipeline import CompileOptions

    flags = CompileOptions(target="htp", target_options={"soc": "SM8650"}).flags()
    assert flags["soc"] == "SM8650" and flags["target"] == "htp" and "target_options" not in flags
