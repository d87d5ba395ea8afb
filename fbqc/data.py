"""Sample streams for calibration and training: the model file's own, or a data-free default."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

import torch

DATA_FREE_NOTE = ("data-free samples drawn around example_inputs(): float tensors ~ Normal(mean, std) "
                  "of the example tensor; scalars, integer and bool tensors kept as given")


#: the length of an endless map-style stream (``len()`` must be finite)
ENDLESS = 2**62


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a stream seeded with ``seed`` (each sample has its own
    generator, so any sample can be made without the ones before it)."""
    return (seed * 1_000_003 + index) % 2**63


class SeededSamples:
    """An endless, deterministic, map-style stream: ``s[i] = make(generator seeded with
    sample_seed(seed, i))``. Any sample can be made without the ones before it, so each training
    process makes only its own share of a batch; iterating yields ``s[0], s[1], …``."""

    def __init__(self, make: Callable[[torch.Generator], dict[str, Any]], seed: int = 0) -> None:
        self.make, self.seed = make, seed

    def __len__(self) -> int:
        return ENDLESS

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < ENDLESS:
            raise IndexError(i)
        return self.make(torch.Generator().manual_seed(sample_seed(self.seed, i)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in itertools.count())


class SamplesAround(SeededSamples):
    """Endless deterministic samples shaped like ``example`` (see :data:`DATA_FREE_NOTE`), map-style."""

    def __init__(self, example: dict[str, Any], seed: int = 0) -> None:
        super().__init__(self._around, seed)
        self.example = example
        self.stats = {k: (v.float().mean(), v.float().std()) for k, v in example.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1}

    def _around(self, gen: torch.Generator) -> dict[str, Any]:
        out = {}
        for k, v in self.example.items():
            if k in self.stats:
                mean, std = self.stats[k]
                noise = torch.randn(v.shape, generator=gen)
                out[k] = (noise * std + mean).to(v.dtype) if std > 0 else v.clone()
            else:
                out[k] = v
        return out


def samples_around(example: dict[str, Any], seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless deterministic samples shaped like ``example`` (:class:`SamplesAround`, iterated)."""
    return iter(SamplesAround(example, seed))


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
