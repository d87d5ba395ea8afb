"""Sample streams for calibration and training: the model file's own, or a data-free default."""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

DATA_FREE_NOTE = ("data-free samples drawn around example_inputs(): float tensors ~ Normal(mean, std) "
                  "of the example tensor; scalars, integer and bool tensors kept as given")


def samples_around(example: dict[str, Any], seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless deterministic samples shaped like ``example`` (see :data:`DATA_FREE_NOTE`)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        out = {}
        for k, v in example.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1:
                mean, std = v.float().mean(), v.float().std()
                noise = torch.randn(v.shape, generator=gen)
                out[k] = (noise * std + mean).to(v.dtype) if std > 0 else v.clone()
            else:
                out[k] = v
        yield out


def take(data: Iterable[dict[str, Any]], n: int, example: dict[str, Any], what: str) -> Iterator[dict]:
    """First ``n`` items of ``data``, each checked against the example's keys, shapes and dtypes."""
    count = 0
    for i, sample in enumerate(itertools.islice(iter(data), n)):
        _check_like(sample, example, f"{what} sample {i}")
        count += 1
        yield sample
    if count == 0:
        raise ValueError(f"{what} yielded no samples")


def _check_like(sample: Any, example: dict[str, Any], where: str) -> None:
    if not isinstance(sample, dict):
        raise ValueError(f"{where} is a {type(sample).__name__}, expected a dict like example_inputs()")
    if set(sample) != set(example):
        raise ValueError(f"{where} has keys {sorted(sample)}, example_inputs() has {sorted(example)}")
    for k, v in sample.items():
        e = example[k]
        if isinstance(e, torch.Tensor):
            if not isinstance(v, torch.Tensor) or v.shape != e.shape or v.dtype != e.dtype:
                got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{where}: input {k!r} is {got}, the exported program expects "
                                 f"{tuple(e.shape)} {e.dtype} (shapes are static)")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{where}: input {k!r} contains NaN or Inf")
