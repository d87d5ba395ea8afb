"""Sample streams for calibration and training.

What is sampled: the model file's own ``calibration_data()`` / ``training_data()``, or a data-free
default around ``example_inputs()`` (:class:`SamplesAround`), map-style when it can be
(:class:`SeededSamples`); :func:`take` checks samples against the example inputs.
What the training loop consumes: the stream cycled (:func:`cycle`), batched (:func:`batches`), one
process's share of each batch (:func:`shares`), prefetched by a thread (:func:`prefetch`) and collated
— in a fixed order, so a resumed run skips exactly the consumed samples.
"""
from __future__ import annotations

import itertools
import queue
import threading
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


# ---- what the training loop consumes ----------------------------------------------------------
def cycle(factory: Callable[[], Iterable], skip: int, first: Iterable | None = None) -> Iterator[dict]:
    """Cycle through ``factory()`` forever, after skipping ``skip`` items (the resumed position);
    ``first``: the stream ``factory()`` already returned (the first pass reads it, not a new one)."""
    seen = 0
    while True:
        empty = True
        data, first = (first if first is not None else factory()), None
        for sample in data:
            empty = False
            if seen >= skip:
                yield sample
            seen += 1
        if empty:
            raise ValueError("training data yielded no samples")


def indexed(data) -> bool:
    """Map-style data (``len(data)`` and ``data[i]``: a list, a map-style ``Dataset``, the examples'
    streams, the data-free default): a process can make just its own samples."""
    return (not isinstance(data, (dict, str, bytes)) and hasattr(type(data), "__getitem__")
            and hasattr(type(data), "__len__"))


def shares(data, start: int, batch: int, lo: int, hi: int) -> Iterator[list[dict]]:
    """Map-style ``data`` cycled from position ``start``: samples ``lo…hi-1`` of each global batch of
    ``batch`` samples (this process's share; the same order as :func:`cycle` + :func:`batches`)."""
    n = len(data)
    if n == 0:
        raise ValueError("training data yielded no samples")
    while True:
        yield [data[(start + j) % n] for j in range(lo, hi)]
        start += batch


def batches(samples: Iterator[dict], n: int) -> Iterator[list[dict]]:
    while True:
        yield [next(samples) for _ in range(n)]


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced ahead by a thread (the module student's data: batches of the model file's
    samples are made while the GPU works; the order, hence a resumed position, is unchanged)."""
    q: queue.Queue = queue.Queue(depth)

    def work():
        try:
            for item in items:
                q.put((True, item))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((False, e))

    threading.Thread(target=work, daemon=True, name="fbqc-prefetch").start()
    while True:
        ok, item = q.get()
        if not ok:
            raise item
        yield item


def collate(samples: list[dict]) -> dict:
    """Samples concatenated along dim 0 (tensors with a batch dimension; other values from the first)."""
    if len(samples) == 1:
        return samples[0]
    return {k: torch.cat([x[k] for x in samples]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in samples[0].items()}


def source(data, data_note: str | None, example: dict, seed: int) -> tuple[Callable[[], Iterable], str]:
    """(a zero-argument factory of the sample stream, its description for the log and run.json)."""
    if data is None:
        return (lambda: SamplesAround(example, seed=seed)), DATA_FREE_NOTE
    return (data if callable(data) else (lambda: data)), data_note or "the given data"


def split_target(sample: dict) -> tuple[dict, object]:
    """(the inputs, the recorded KD target or None): ``--teacher-cache`` samples carry the teacher's
    recorded output under :data:`fbqc.captured_data.TARGET`."""
    from fbqc.captured_data import TARGET

    if TARGET not in sample:
        return sample, None
    return {k: v for k, v in sample.items() if k != TARGET}, sample[TARGET]


def inputs_only(samples: Iterable[dict]) -> list[dict] | Iterator[dict]:
    """``samples`` without their recorded KD targets (a list stays a list)."""
    out = (split_target(s)[0] for s in samples)
    return list(out) if isinstance(samples, list) else out
