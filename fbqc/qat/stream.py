"""Training data streams: cycling a model file's samples, batching, prefetching (one concept: what
the training loop consumes, in a fixed order, so a resumed run skips exactly the consumed samples)."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

from fbqc.data import DATA_FREE_NOTE, samples_around


def cycle(factory: Callable[[], Iterable], skip: int) -> Iterator[dict]:
    """Cycle through ``factory()`` forever, after skipping ``skip`` items (the resumed position)."""
    seen = 0
    while True:
        empty = True
        for sample in factory():
            empty = False
            if seen >= skip:
                yield sample
            seen += 1
        if empty:
            raise ValueError("training data yielded no samples")


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
        return (lambda: samples_around(example, seed=seed)), DATA_FREE_NOTE
    return (data if callable(data) else (lambda: data)), data_note or "the given data"
