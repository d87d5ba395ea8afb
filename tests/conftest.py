"""Shared fixtures: the example model files and compiled tiny artifacts (cached per session)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:   # tests that load an example by path: it imports _common (its neighbour)
    sys.path.insert(0, str(EXAMPLES))
ARCHS = ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"]


def example(name: str) -> Path:
    return EXAMPLES / f"{name}.py"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FBQC_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="full-size model: set FBQC_FULL=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def single_thread():
    """The test on one intra-op thread (``test_qat_toy.one_thread``): a module of tiny-model tests takes it
    with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    from test_qat_toy import one_thread

    with one_thread():
        yield


@pytest.fixture()
def world():
    """One in-process rank (gloo): FSDP2's wrapping and local-shard code without launching processes."""
    from fbqc.qat.parallel import dist as D

    w, _ = D.init(1, "cpu")
    yield w
    w.close()


_compiled: dict = {}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(arch, bits, **opts) → (artifact dir, result dict), each configuration compiled once."""
    from dataclasses import fields

    from fbqc.pipeline import CompileOptions, compile_model

    def build(arch: str, bits: float = 4.0, **kw):
        key = (arch, bits, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in _compiled:
            out = tmp_path_factory.mktemp("art") / f"{arch}_{bits}"
            core = {f.name for f in fields(CompileOptions)}     # the rest are the target backend's options
            target_options = {k: kw.pop(k) for k in list(kw) if k not in core}
            opts = CompileOptions(bits=bits, calib_samples=kw.pop("calib_samples", 8), target_options=target_options,
                                  **kw)
            result = compile_model(example(arch), out, opts, progress=False, log=lambda s: None)
            _compiled[key] = (out, result)
        return _compiled[key]

    return build
