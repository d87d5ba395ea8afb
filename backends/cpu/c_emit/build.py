"""Build and run an emitted C program (used by ``fbqc verify``, the tests and the benchmark)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from fbqc.errors import ArtifactError

from .files import C_DIR, DEFAULT_CFLAGS

NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32,
             "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def compiler() -> str | None:
    """The C compiler: $CC, else cc / gcc / clang on PATH; None if there is none."""
    for cand in [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if cand and shutil.which(shlex.split(cand)[0]):
            return cand
    return None


def build(artifact: Path, binary: Path, cflags: str = DEFAULT_CFLAGS, *, extra: str = "",
          timeout: float = 900) -> tuple[float, str]:
    """Compile ``artifact/c/*.c`` into ``binary``; returns (seconds, compiler messages)."""
    cc = compiler()
    if cc is None:
        raise ArtifactError("no C compiler found (set CC, or install cc)")
    sources = sorted(str(p) for p in (Path(artifact) / C_DIR).glob("*.c"))
    if not sources:
        raise ArtifactError(f"{artifact}: no {C_DIR}/*.c; compile with --emit-c")
    cmd = [*shlex.split(cc), *shlex.split(cflags), *shlex.split(extra), "-o", str(binary), *sources, "-lm"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ArtifactError(f"building the C program failed ({' '.join(cmd[:4])} …):\n{r.stderr[-2000:]}")
    return time.perf_counter() - t, r.stderr


def run(binary: Path, inputs: Path, outputs: Path, *, weights: Path | None = None, dump: Path | None = None,
        feed: Path | None = None, repeat: int = 1, threads: int | None = None, timeout: float = 3600
        ) -> tuple[float, str]:
    """Run the program; returns (wall seconds, its stderr)."""
    cmd = [str(binary)]
    for flag, value in (("--weights", weights), ("--dump", dump), ("--feed", feed)):
        if value is not None:
            cmd += [flag, str(value)]
    if repeat != 1:
        cmd += ["--repeat", str(repeat)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    r = subprocess.run(cmd + [str(inputs), str(outputs)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    if r.returncode != 0:
        raise ArtifactError(f"the C program failed (exit {r.returncode}): {r.stderr.strip()[-1000:]}")
    return time.perf_counter() - t, r.stderr


def read_tensors(path: Path, rows: list[dict]) -> list[torch.Tensor]:
    """Tensors back to back in a raw file, as described by ``rows`` (name, dtype, shape)."""
    data = Path(path).read_bytes()
    out, off = [], 0
    for r in rows:
        dt = np.dtype(NP_DTYPES[r["dtype"]])
        n = int(np.prod(r["shape"])) if r["shape"] else 1
        arr = np.frombuffer(data, dtype=dt, count=n, offset=off).reshape(r["shape"])
        out.append(torch.from_numpy(arr.copy()))
        off += n * dt.itemsize
    if off != len(data):
        raise ArtifactError(f"{path}: {len(data)} bytes, expected {off}")
    return out


def read_dump(directory: Path, index: int, what: str, dtype: torch.dtype, shape) -> torch.Tensor:
    np_dtype = {torch.uint8: np.uint8, torch.int32: np.int32}[dtype]
    arr = np.fromfile(Path(directory) / f"L{index:04d}.{what}", dtype=np_dtype)
    return torch.from_numpy(arr).reshape(shape)


def write_codes(directory: Path, index: int, codes: torch.Tensor) -> None:
    (Path(directory) / f"L{index:04d}.xq").write_bytes(codes.detach().contiguous().numpy().tobytes())
