"""A plain (non-editable) install exposes fbqc.passes / fbqc.backends and the cpu entry point."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_imports_subpackages(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fbqc, fbqc.passes, fbqc.backends, "
            "fbqc.backends.cpu; from importlib.metadata import entry_points; "
            "print(fbqc.passes.__file__); print(fbqc.backends.__file__); "
            "print(sorted({e.value for e in entry_points(group='fbqc.backends') if e.name == 'cpu'}))")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    passes_file, backends_file, eps = r.stdout.strip().splitlines()
    assert passes_file.startswith(str(target)) and passes_file.endswith("fbqc/passes/__init__.py")
    assert backends_file.startswith(str(target)) and backends_file.endswith("fbqc/backends/__init__.py")
    assert "fbqc.backends.cpu:CpuBackend" in eps


def test_editable_install_maps_directories():
    import fbqc.backends
    import fbqc.passes

    assert Path(fbqc.passes.__file__).parent == ROOT / "passes"
    assert Path(fbqc.backends.__file__).parent == ROOT / "backends"
