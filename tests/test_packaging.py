"""A plain (non-editable) install exposes fbqc.passes / fbqc.backends and the cpu entry point.

The wheel is built from a copy of the sources and installed with ``pip --target``; the probe runs with
``python -I -S`` (no ``PYTHONPATH``, no user site, no ``.pth`` files: the editable install's finder is
never installed), the wheel's directory first on ``sys.path`` and site-packages after it (torch,
click, …). A module, data file or entry point missing from the wheel therefore fails here instead of
being served from the repository.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source directory → where its files land in the installed package (pyproject's package-dir)
SOURCES = {"fbqc": "fbqc", "passes": "fbqc/passes", "backends": "fbqc/backends"}

PROBE = r"""
import contextlib, io, json, os, sys
site_dir, site_packages, out_file, *argv = sys.argv[1:]
sys.path[:0] = [site_dir]
sys.path += site_packages.split(os.pathsep)
from importlib.metadata import distribution, entry_points

dist = distribution("fbqc")
(cpu,) = entry_points(group="fbqc.backends", name="cpu")
(script,) = dist.entry_points.select(group="console_scripts", name="fbqc")
stdout, stderr, code = io.StringIO(), io.StringIO(), None
with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    sys.argv = ["fbqc", *argv]
    try:
        script.load()()
    except SystemExit as e:
        code = e.code
import fbqc, fbqc.passes, fbqc.backends, fbqc.backends.cpu, fbqc.backends.htp
json.dump({"dist": str(dist.locate_file("")), "cpu_dist": str(cpu.dist.locate_file("")),
           "cpu": cpu.value, "cpu_file": sys.modules[cpu.load().__module__].__file__,
           "code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
           "modules": {n: getattr(m, "__file__", None) for n, m in sys.modules.items()
                       if n == "fbqc" or n.startswith("fbqc.")}}, open(out_file, "w"))
"""


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The wheel of a copy of the sources (not the repo: its ``build/`` may hold stale files that the
    wheel would pick up, and other runs may be building there), installed into ``site/``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for d in SOURCES:
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp / "dist").glob("fbqc-*.whl")
    r = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                       capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp / "site"


def _probe(site: Path, tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "probe.json"
    site_packages = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    r = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, str(site), site_packages, str(out), *argv],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_wheel_holds_every_source_file(wheel_site):
    """Every module and data file of the source tree (a package left out of pyproject's list, a
    runtime C file left out of package-data) is in the installed wheel."""
    want = sorted(f"{SOURCES[d]}/{p.relative_to(ROOT / d).as_posix()}" for d in SOURCES
                  for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix in (".py", ".c", ".h"))
    assert "fbqc/backends/cpu/c_emit/runtime/fbqc_runtime.h" in want and "fbqc/passes/__init__.py" in want
    missing = [f for f in want if not (wheel_site / f).is_file()]
    assert not missing, f"not in the wheel: {missing}"


def test_plain_install_imports_subpackages(wheel_site, tmp_path):
    got = _probe(wheel_site, tmp_path, "list-backends", "--json")
    site = str(wheel_site)
    assert got["dist"] == site and got["cpu_dist"] == site          # the wheel's metadata, not the editable one
    assert got["cpu"] == "fbqc.backends.cpu:CpuBackend"
    assert got["cpu_file"].startswith(f"{site}/fbqc/backends/cpu/")
    files = got["modules"]
    assert files["fbqc"] == f"{site}/fbqc/__init__.py"
    assert files["fbqc.passes"] == f"{site}/fbqc/passes/__init__.py"
    assert files["fbqc.backends"] == f"{site}/fbqc/backends/__init__.py"
    assert files["fbqc.backends.htp"] == f"{site}/fbqc/backends/htp/__init__.py"
    outside = {n: f for n, f in files.items() if not (f or "").startswith(site + "/")}
    assert not outside, f"imported from outside the wheel: {outside}"
    # the `fbqc` console script of the wheel runs and finds the backends through the entry points
    assert got["code"] in (0, None), got["stderr"]
    assert {"cpu", "htp"} <= {row["name"] for row in json.loads(got["stdout"])}


def test_plain_install_lists_passes(wheel_site, tmp_path):
    got = _probe(wheel_site, tmp_path, "list-passes")
    assert got["code"] in (0, None), got["stderr"]
    assert got["stdout"].split()[0] == "AnnotateLinears" and "LowerToInteger" in got["stdout"]


def test_editable_install_maps_directories():
    import fbqc.backends
    import fbqc.passes

    assert Path(fbqc.passes.__file__).parent == ROOT / "passes"
    assert Path(fbqc.backends.__file__).parent == ROOT / "backends"
