"""The example out-of-tree backend (``examples/plugin``, package ``fbqc-listing``, ``--target listing``).

It is installed with pip into a temporary directory (from a copy of its sources, so the repository
gets no ``build/``) and every command runs in a subprocess with that directory on ``PYTHONPATH``:
fbqc finds it through its ``fbqc.backends`` entry point only, as it would any third-party backend.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, example

PLUGIN = ROOT / "examples" / "plugin"
FBQC = "import sys; from fbqc.cli import main; sys.exit(main())"
LAYER = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN, tmp / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(tmp / "site"), str(tmp / "src")],
                       capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp / "site" / "fbqc_listing" / "execute.py").is_file()
    return tmp / "site"


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


def fbqc(site: Path, *args) -> subprocess.CompletedProcess:
    """``fbqc ARGS`` in a fresh interpreter that sees the installed plugin."""
    return subprocess.run([sys.executable, "-c", FBQC, *map(str, args)], capture_output=True, text=True,
                          env=_env(site), timeout=300)


@pytest.fixture(scope="module")
def artifact(site, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("listing") / "sana"
    r = fbqc(site, "compile", example("sana"), "--preset", "tiny", "--target", "listing", "--calib-samples", "2",
             "-o", out, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    # the compile summary: the backend, its version and its Describes line
    assert "listing (fbqc-listing 0.1.0, torch" in r.stdout
    assert re.search(r"^listing +program\.listing: \d+ lines, \d+ statements, 20 integer layers, constants "
                     r"constants\.safetensors", r.stdout, re.M), r.stdout
    return out


def test_list_backends(site):
    r = fbqc(site, "list-backends")
    assert r.returncode == 0, r.stderr
    (line,) = [l for l in r.stdout.splitlines() if l.startswith("listing ")]
    assert "fbqc-listing 0.1.0, torch" in line and "fbqc_listing:ListingBackend" in line
    assert r.stdout.startswith("cpu ")                 # the editable fbqc's own backends are still there


def test_flag_is_contributed_by_the_plugin(site, tmp_path):
    r = fbqc(site, "compile", "--help")
    assert r.returncode == 0 and "--listing-constants" in r.stdout and "safetensors|inline" in r.stdout
    r = fbqc(site, "compile", example("sana"), "--preset", "tiny", "--target", "cpu", "--listing-constants", "inline",
             "-o", tmp_path / "o", "-q")
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error: ")]
    assert r.returncode == 2 and errors == ["error: --listing-constants is an option of the listing backend, not "
                                            "of --target cpu"], r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_listing_is_readable(artifact):
    from safetensors.torch import load_file

    assert sorted(p.name for p in artifact.iterdir()) == ["constants.safetensors", "io.pt", "manifest.json",
                                                          "program.listing", "program.pt2"]
    text = (artifact / "program.listing").read_text()
    lines = text.splitlines()
    assert lines[0] == "# fbqc-listing 1"
    assert "%hidden_states = input('hidden_states')  # f32[1, 32, 8, 8]" in lines
    assert "%encoder_attention_mask = input('encoder_attention_mask')  # i64[1, 8]" in lines
    assert (f"%fbqc_transformer_blocks_0_attn1_to_q_wq = constant('fbqc_transformer_blocks_0_attn1_to_q_wq')"
            f"  # i8[32, 32]") in lines
    # an integer layer: its spec and scales as comments, then the statement marked with its layer
    i = next(i for i, l in enumerate(lines) if l.startswith(f"# layer {LAYER}:"))
    assert lines[i] == (f"# layer {LAYER}: linear W4A8, weight 4 bits narrow per channel, levels -8…7 in int4 "
                        f"(int8), activations uint8 in (3sigma), uint8 out")
    assert re.fullmatch(r"#   x_scale=\S+ x_zp=\d+ w_scale\[32\]=\S+…\S+ y_scale=\S+ y_zp=\d+", lines[i + 1]), lines[i + 1]
    assert re.fullmatch(rf"%qlinear\w*: layer\('{re.escape(LAYER)}'\) = torch\.ops\.fbqc\.qlinear\.default\("
                        rf"%quantize\w*, [0-9.e-]+, \d+, %fbqc_transformer_blocks_0_attn1_to_q_wq, "
                        rf"%fbqc_transformer_blocks_0_attn1_to_q_w_scale_c, .*\)  # u8\[1, 64, 32\]", lines[i + 2])
    assert re.search(r"^%quantize\w* = torch\.ops\.fbqc\.quantize\.default\(%\w+, [0-9.e-]+, \d+, .*\)  "
                     rf"# u8\[1, 64, 32\]  input of {re.escape(LAYER)}$", text, re.M)
    assert re.search(r"^%getitem = operator\.getitem\(%chunk, 0\)  # f32\[", text, re.M)
    assert re.search(r"^%\w+ = torch\.ops\.aten\.layer_norm\.default\(%\w+, \[32\], None, None, 1e-06, False\)",
                     text, re.M)
    assert re.search(r"device=torch\.device\('cpu'\)", text) and "dtype=torch.float32" in text
    assert re.fullmatch(r"return \(%\w+,\)", lines[-1])
    assert sum(l.startswith("%") and ": layer('" in l for l in lines) == 20
    constants = load_file(str(artifact / "constants.safetensors"))
    assert constants["fbqc_transformer_blocks_0_attn1_to_q_wq"].dtype.is_signed   # int8 codes
    assert len(constants) == sum(" = constant('" in l for l in lines)


def test_verify_and_inspect(site, artifact):
    r = fbqc(site, "verify", artifact)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sana (listing): 20 layers" in r.stdout and "int32 accumulators identical: True" in r.stdout
    assert r.stdout.rstrip().endswith("AGREE")
    r = fbqc(site, "inspect", artifact)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^listing  program\.listing: \d+ lines, \d+ statements, 20 integer layers", r.stdout, re.M)
    assert "listing_constants=safetensors" in r.stdout


def test_tampered_constant(site, artifact, tmp_path):
    """A changed weight code: the manifest's hashes catch it; re-hashed, the listing's own codes disagree."""
    from safetensors.torch import load_file, save_file

    from fbqc.artifact import read_manifest, write_manifest

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    path = bad / "constants.safetensors"
    tensors = load_file(str(path))
    key = f"fbqc_{LAYER.replace('.', '_')}_wq"
    wq = tensors[key] = tensors[key].clone()
    wq[0] = wq.max() if int(wq[0].sum()) < 0 else wq.min()         # output channel 0 of one layer
    save_file(tensors, str(path))
    r = fbqc(site, "verify", bad)
    assert r.returncode == 2 and "constants.safetensors do not match the manifest's hashes" in r.stderr, r.stderr
    r = fbqc(site, "inspect", bad)
    assert r.returncode == 1 and "DAMAGED: constants.safetensors" in r.stdout

    write_manifest(bad, read_manifest(bad))                         # as if compiled that way
    r = fbqc(site, "verify", bad, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["summary"]["exact"] is False
    row = next(row for row in result["per_layer"] if row["layer"] == LAYER)
    assert row["exact"] is False and row["contract_mismatches"] > 0


def test_a_wrong_float_op_between_layers_disagrees(site, artifact, tmp_path):
    """Every integer layer exact teacher-forced, but a float op between layers changed (silu → relu):
    the free-running check against the integer reference fails the verdict (fbqc/artifact_verify.py)."""
    from fbqc.artifact import read_manifest, write_manifest

    bad = tmp_path / "relu"
    shutil.copytree(artifact, bad)
    text = (bad / "program.listing").read_text()
    (bad / "program.listing").write_text(text.replace("torch.ops.aten.silu.default(", "torch.ops.aten.relu.default(", 1))
    write_manifest(bad, read_manifest(bad))
    r = fbqc(site, "verify", bad, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["summary"]["exact"] is True                        # each layer is still right for its inputs
    ref = result["vs_reference"]
    assert ref["exact"] is False and ref["input_codes_identical"] < 1.0, ref
    r = fbqc(site, "verify", artifact, "--json")
    ok = json.loads(r.stdout)["vs_reference"]
    assert r.returncode == 0 and ok["exact"] and ok["input_codes_identical"] == 1.0 and ok["input_codes_max_diff"] == 0
    r = fbqc(site, "verify", bad)
    assert "FAILS" in r.stdout and r.stdout.rstrip().endswith("DISAGREE")


DRIVE = r"""
import json, shutil, sys, torch
from pathlib import Path
import fbqc_listing
from fbqc.errors import ArtifactError
from fbqc.plugins import load_backend
from fbqc.reference import Reference

src, dst, site = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
io = torch.load(src / "io.pt", weights_only=True)
inputs = io["inputs"]
backend = load_backend("listing")
ref = Reference(src)
listing = backend.load(src)
out, ref_out = listing.run(inputs), ref.run(inputs)
codes, ref_codes = listing.layer_codes(inputs), ref.layer_codes(inputs)
got = {"plugin_file": fbqc_listing.__file__,
       "same_outputs": len(out) == len(ref_out) and all(torch.equal(a, b) for a, b in zip(out, ref_out)),
       "same_layers": sorted(codes) == sorted(ref_codes),
       "same_codes": all(torch.equal(codes[k][c], ref_codes[k][c]) for k in ref_codes for c in ("xq", "yq"))}

# the listing alone drives the numbers: no program.pt2, one op changed in the text
shutil.copytree(src, dst)
(dst / "program.pt2").unlink()
text = (dst / "program.listing").read_text()
assert "torch.ops.aten.silu.default(" in text
(dst / "program.listing").write_text(text.replace("torch.ops.aten.silu.default(", "torch.ops.aten.relu.default(", 1))
changed = backend.load(dst).run(inputs)
got["changed_differs"] = not torch.equal(changed[0], ref_out[0])
got["changed_finite"] = bool(torch.isfinite(changed[0]).all())

# anything that is not an operator's qualified name or a literal is refused, naming the line
(dst / "program.listing").write_text(text.replace("operator.getitem(%chunk, 0)", "os.system('true')", 1))
try:
    backend.load(dst)
    got["refused"] = None
except ArtifactError as e:
    got["refused"] = str(e)
print(json.dumps(got))
"""


def test_listing_drives_the_numbers(site, artifact, tmp_path):
    """The loader, called directly: bit-identical to the integer reference, and run from the text alone."""
    r = subprocess.run([sys.executable, "-c", DRIVE, str(artifact), str(tmp_path / "changed"), str(site)],
                       capture_output=True, text=True, env=_env(site), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["plugin_file"].startswith(str(site))               # the installed copy, not the sources
    assert got["same_outputs"] and got["same_layers"] and got["same_codes"], got
    assert got["changed_differs"] and got["changed_finite"], got
    assert re.search(r"program\.listing:\d+: 'os\.system' is not an operator name", got["refused"] or ""), got


def test_inline_constants(site, tmp_path):
    """--listing-constants inline: the tensors are in the listing, no constants file; verify agrees."""
    out = tmp_path / "pixart"
    r = fbqc(site, "compile", example("pixart_sigma"), "--preset", "tiny", "--target", "listing",
             "--listing-constants", "inline", "--calib-samples", "2", "-o", out, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "constants inline" in r.stdout and not (out / "constants.safetensors").exists()
    assert json.loads((out / "manifest.json").read_text())["flags"]["listing_constants"] == "inline"
    text = (out / "program.listing").read_text()
    assert "constant('" not in text and re.search(r"^%fbqc_\w+_wq = tensor\(torch\.int8, \[\d+, \d+\], \[-?\d", text, re.M)
    r = fbqc(site, "verify", out)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("AGREE"), r.stdout + r.stderr
