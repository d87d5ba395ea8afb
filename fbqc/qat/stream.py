"""Training data streams: cycling a model file's samples, batching, prefetching (one concept: what
the training loop consumes, in a fixed order, so a resumed run skips exactly the consumed samples)."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

from fbqc.data import DATA_FREE_NOTE, SamplesAround


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
