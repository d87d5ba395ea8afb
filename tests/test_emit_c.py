"""The cpu backend's standalone C reference (``--emit-c``): build it, run it, compare it.

Per layer, teacher-forced (the C program reads the in-process reference's own input codes), its
int32 accumulators and output codes are compared with an exact int64 NumPy computation and the
NumPy fp32 contract; end to end, its outputs with the in-process cpu reference (the tiny models'
artifacts are shared with test_pipeline.py through the ``compiled`` fixture).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ARCHS
from fbqc.artifact import load_io
from fbqc.backends.cpu import CpuBackend
from fbqc.backends.cpu.c_emit import emit_c
from fbqc.backends.cpu.c_emit.build import compiler, read_dump, read_tensors, write_codes
from fbqc.backends.cpu.c_emit.files import RUNTIME_FILES, copy_runtime
from fbqc.errors import UserError

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")
CFLAGS = ["-O2", "-std=c99", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
#: end to end, C vs the in-process reference (float ops in libm and PyTorch differ in the last bits)
E2E_REL_TOL = 1e-3
RESULTS: dict = {}


def cc(*args, cwd=None):
    r = subprocess.run([compiler(), *args], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr                     # warning-free with -Wall -Wextra
    return r


@pytest.fixture(scope="session")
def runtime_objects(tmp_path_factory):
    """The fixed C files, compiled once with -Wall -Wextra -Werror (they do not depend on the model)."""
    d = tmp_path_factory.mktemp("c_runtime")
    copy_runtime(d)
    objs = []
    for f in RUNTIME_FILES:
        if f.endswith(".c"):
            cc(*CFLAGS, "-c", f, "-o", f[:-2] + ".o", cwd=d)
            objs.append(d / (f[:-2] + ".o"))
    return objs


def build_model(directory: Path, objs) -> Path:
    cc(*CFLAGS, "-c", str(directory / "c" / "model.c"), "-o", str(directory / "model.o"))
    cc("-o", str(directory / "run"), str(directory / "model.o"), *map(str, objs), "-lm")
    return directory / "run"


def run(binary: Path, d: Path, *extra, ok=True):
    r = subprocess.run([str(binary), *map(str, extra), str(d / "inputs.bin"), str(d / "outputs.bin")],
                       capture_output=True, text=True)
    assert (r.returncode == 0) == ok, r.stderr
    return r


def exact_layer(kind, args, xq):
    """int64 accumulators and fp32 contract codes in NumPy, independent of fbqc's kernels."""
    _, sx, zx, wq, ws, wz, b, sy, zy, y_bits = args
    qmax = int(2.0 ** y_bits) - 1                       # the ops take bits (8 or 16): 255 / 65535
    x = (xq.movedim(1, -1) if kind == "conv1x1" else xq).numpy().astype(np.int64) - zx
    w = wq.reshape(wq.shape[0], -1).numpy().astype(np.int64)
    if wz is not None:
        w = w - wz.numpy().astype(np.int64).reshape(-1, 1)
    acc = x @ w.T
    y = acc.astype(np.float32) * (np.float32(sx) * ws.numpy().astype(np.float32))
    if b is not None:
        y = y + b.detach().numpy().astype(np.float32)
    q = np.clip(np.rint(y / np.float32(sy)) + zy, 0, qmax).astype(np.int64)
    if kind == "conv1x1":
        acc, q = np.moveaxis(acc, -1, 1), np.moveaxis(q, -1, 1)
    return acc, q


_LOADED: dict = {}


def load(out: Path):
    """The integer reference (fbqc.reference.Reference) of ``out``, loaded once (torch.export.load dominates these tests' time)."""
    if out not in _LOADED:
        _LOADED[out] = CpuBackend().load(out)
    return _LOADED[out]


def agreement(out: Path, tmp: Path, objs) -> dict:
    loaded = load(out)
    io = load_io(out)
    section = emit_c(loaded.program, tmp, inputs=io["inputs"])
    binary = build_model(tmp, objs)
    free, forced, feed = tmp / "free", tmp / "forced", tmp / "feed"
    for d in (free, forced, feed):
        d.mkdir()
    run(binary, tmp, "--dump", free)
    c_out = read_tensors(tmp / "outputs.bin", section["outputs"])
    ref_out = loaded.run(io["inputs"])
    codes, nodes = loaded.layer_codes(io["inputs"]), loaded.layers()
    assert section["layers"] and set(section["layers"]) == set(nodes)
    for i, name in enumerate(section["layers"]):
        write_codes(feed, i, codes[name]["xq"])
    run(binary, tmp, "--feed", feed, "--dump", forced)
    acc_bad = code_bad = elements = free_same = 0
    for i, name in enumerate(section["layers"]):
        node = nodes[name]
        kind = "conv1x1" if node.target == torch.ops.fbqc.qconv2d_1x1.default else "linear"
        acc, q = exact_layer(kind, loaded.constants(node), codes[name]["xq"])
        yq = codes[name]["yq"]
        acc_c = read_dump(forced, i, "acc", torch.int32, acc.shape).numpy()
        q_c = read_dump(forced, i, "yq", yq.dtype, q.shape).numpy().astype(np.int64)
        acc_bad += int(np.count_nonzero(acc_c != acc))
        code_bad += int(np.count_nonzero(q_c != q)) + int(np.count_nonzero(q_c != yq.numpy()))
        elements += q.size
        free_same += int((read_dump(free, i, "yq", yq.dtype, q.shape) == yq).sum())
    d = (c_out[0].double() - ref_out[0].double())
    return {"layers": len(section["layers"]), "elements": elements, "acc_mismatches": acc_bad,
            "code_mismatches": code_bad, "free_running_identical": free_same / elements,
            "max_abs": float(d.abs().max()), "rel": float(d.norm() / ref_out[0].double().norm()),
            "bits_per_weight": section["bits_per_quantized_weight"]}


@pytest.mark.parametrize("bits", [4, 4.5, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_c_agrees_with_cpu_reference(compiled, runtime_objects, tmp_path, arch, bits):
    out, _ = compiled(arch, bits)
    r = agreement(out, tmp_path, runtime_objects)
    RESULTS[(arch, bits)] = r
    print(f"\n{arch} W{bits}: {r}")
    assert r["acc_mismatches"] == 0          # int32 accumulators bit-exact, teacher-forced
    assert r["code_mismatches"] == 0         # requantized codes identical (NumPy contract and reference)
    assert r["rel"] < E2E_REL_TOL and r["max_abs"] < 0.1, r
    assert r["free_running_identical"] > 0.99
    assert r["bits_per_weight"] == {4: 4.0, 4.5: 8.0, 8: 8.0}[bits]


def test_a16_wide_weights_and_generic_kernel(compiled, runtime_objects, tmp_path):
    """A16 codes (int32) and wide weights with zero points take the int32 path of the C kernel."""
    out, _ = compiled("sana", 8, a16=("ff.conv_point", "attn1.to_out"), scheme="wide")
    r = agreement(out, tmp_path, runtime_objects)
    assert r["acc_mismatches"] == 0 and r["code_mismatches"] == 0, r
    assert r["rel"] < E2E_REL_TOL, r


def test_compile_emit_c_build_run_and_verify(compiled):
    """The user's path: compile --emit-c, the README's cc command, run, fbqc verify."""
    out, result = compiled("pixart_sigma", 4, emit_c=True)
    m = result["manifest"]
    for f in ["README.md", "weights.bin", "weights.json", "inputs.bin", "c/model.c", "c/main.c"]:
        assert (out / f).is_file(), f
    readme = (out / "README.md").read_text()
    assert "cc -O2 -std=c99 -ffp-contract=off -o run c/*.c -lm" in readme
    # the command (GCC's ISO mode has contraction off by default)
    subprocess.run(["cc", "-O2", "-std=c99", "-o", str(out / "run"), *map(str, sorted((out / "c").glob("*.c"))),
                    "-lm"], check=True)
    try:
        r = subprocess.run([str(out / "run"), str(out / "inputs.bin"), str(out / "outputs.bin")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = read_tensors(out / "outputs.bin", m["backend"]["c"]["outputs"])[0]
    finally:
        for f in ("run", "outputs.bin"):
            (out / f).unlink(missing_ok=True)
    io = load_io(out)
    assert torch.allclose(got, io["fake_quant_outputs"][0], rtol=0, atol=1e-3)
    from fbqc.artifact_verify import verify_artifact

    report = verify_artifact(out)
    c = report["emitted_c"]
    assert c["exact"] and c["acc_identical"] and c["codes_identical"], c
    assert c["layers"] == len(m["layers"]) and c["compiler_warnings"] == ""
    assert c["end_to_end_vs_cpu"][0]["rel_error"] < E2E_REL_TOL


def test_weights_file_layout(compiled):
    out, result = compiled("pixart_sigma", 4, emit_c=True)
    blob = (out / "weights.bin").read_bytes()
    desc = json.loads((out / "weights.json").read_text())
    magic, version, count, data_bytes, model_id = struct.unpack("<8sIIQ16s", blob[:40])
    assert (magic, version, count) == (b"FBQCWTS1", 1, len(desc["tensors"]))
    assert data_bytes == len(blob) - 64 == desc["file_bytes"] - 64
    assert model_id.decode() == hashlib.sha256(blob[64:]).hexdigest()[:16] == desc["model_id"]
    assert f'"{desc["model_id"]}"' in (out / "c" / "model.c").read_text()
    loaded = load(out)
    by_layer = {t["layer"]: t for t in desc["tensors"] if "layer" in t}
    assert set(by_layer) == set(loaded.layers())
    packed = 0
    for layer, node in loaded.layers().items():
        wq = loaded.constants(node)[3]
        t = by_layer[layer]
        assert t["dtype"] == "int4" and t["shape"] == list(wq.shape) and t["offset"] % 64 == 0
        raw = np.frombuffer(blob, dtype=np.uint8, count=t["nbytes"], offset=t["offset"])
        nib = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[:wq.numel()].astype(np.int16)
        assert np.array_equal(np.where(nib >= 8, nib - 16, nib), wq.reshape(-1).numpy())
        packed += t["nbytes"]
    params = sum(loaded.constants(n)[3].numel() for n in loaded.layers().values())
    assert packed * 8 / params == desc["bits_per_quantized_weight"] == 4.0
    # float tensors are stored as little-endian float32
    t = next(t for t in desc["tensors"] if t["dtype"] == "float32" and "bias" in t["name"])
    vals = np.frombuffer(blob, dtype="<f4", count=int(np.prod(t["shape"])), offset=t["offset"])
    assert np.array_equal(vals, dict(loaded.program.graph_module.named_buffers(), **dict(
        loaded.program.graph_module.named_parameters()))[t["name"]].detach().reshape(-1).numpy())


def test_runner_rejects_bad_inputs_and_contraction(compiled, tmp_path):
    out, _ = compiled("pixart_sigma", 4, emit_c=True)
    d = tmp_path / "a"
    shutil.copytree(out, d)
    subprocess.run([compiler(), "-O2", "-std=c99", "-ffp-contract=off", "-o", str(d / "run"),
                    *map(str, sorted((d / "c").glob("*.c"))), "-lm"], check=True)
    (d / "inputs.bin").write_bytes((d / "inputs.bin").read_bytes()[:-4])
    r = run(d / "run", d, ok=False)
    assert r.returncode == 2 and "expected" in r.stderr and "bytes of inputs" in r.stderr
    blob = bytearray((d / "weights.bin").read_bytes())
    blob[24:40] = b"0123456789abcdef"                   # another model's id
    (d / "other.bin").write_bytes(bytes(blob))
    r = run(d / "run", d, "--weights", d / "other.bin", ok=False)
    assert "belongs to model 0123456789abcdef" in r.stderr
    if "fma" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False:
        subprocess.run([compiler(), "-O2", "-std=gnu99", "-mfma", "-ffp-contract=fast", "-o", str(d / "fma"),
                        *map(str, sorted((d / "c").glob("*.c"))), "-lm"], check=True)
        shutil.copy(out / "inputs.bin", d / "inputs.bin")
        r = run(d / "fma", d, ok=False)
        assert "contraction" in r.stderr


def test_emission_is_deterministic(compiled, tmp_path):
    out, _ = compiled("flux_schnell", 4)
    loaded = load(out)
    for d in ("a", "b"):
        emit_c(loaded.program, tmp_path / d, inputs=load_io(out)["inputs"], cflags="-O3 -fopenmp")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # flags the numerics need are added to the user's
    assert "cc -O3 -fopenmp -std=c99 -ffp-contract=off -o run c/*.c -lm" in (tmp_path / "a" / "README.md").read_text()


def test_op_without_generator_is_a_clear_error(tmp_path):
    from fbqc.program import Program
    from fbqc.stage import Stage

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 0) + 1

    from fbqc.frontend import drop_guards

    x = torch.randn(4)
    gm = torch.export.export(M(), (x,)).module()
    drop_guards(gm)
    with pytest.raises(UserError, match=r"no C generator for op aten\.cumsum\.default \(node cumsum\)"):
        emit_c(Program(gm, Stage.INTEGER, {"x": x}), tmp_path)


def test_emitters_are_keyed_by_op_objects():
    import operator

    from fbqc.backends.cpu.c_emit.registry import table

    ops = table()
    assert all(isinstance(op, torch._ops.OpOverload) or op is operator.getitem for op in ops)
    assert torch.ops.fbqc.qlinear.default in ops and torch.ops.aten.scaled_dot_product_attention.default in ops


@pytest.mark.parametrize("arch", ["sana", "pixart_sigma"])
def test_padded_attention_mask_runs_the_same_in_c(tmp_path, arch):
    """A classifier-free-guidance branch pads its text: the additive mask bias (−10000 on padding)
    reaches the C attention, which must agree with the reference on those inputs."""
    import textwrap

    from click.testing import CliRunner

    from conftest import example
    from fbqc.cli import main

    f = tmp_path / f"{arch}_padded.py"
    f.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(example(arch).parent)!r})
        import {arch} as m

        def model():
            return m.model()

        def example_inputs():
            x = m.example_inputs()
            mask = x["encoder_attention_mask"].clone()
            mask[:, 3:] = 0                                  # 3 tokens and padding
            return {{**x, "encoder_attention_mask": mask}}
    '''))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(f), "-o", str(out), "--emit-c", "--calib-samples", "2", "-q"])
    assert r.exit_code == 0, r.output
    io = load_io(out)
    loaded = CpuBackend().load(out)
    padded = loaded.run(io["inputs"])[0]
    full = loaded.run({**io["inputs"], "encoder_attention_mask": torch.ones_like(
        io["inputs"]["encoder_attention_mask"])})[0]
    assert not torch.allclose(padded, full)                  # the mask changes the result …
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "C AGREES" in r.output, r.output   # … and the C computes the same
