"""Sample streams for calibration and training.

What is sampled: the model file's own ``calibration_data()`` / ``training_data()``, or a data-free
default around ``example_inputs()`` (:class:`SamplesAround`), map-style when it can be
(:class:`SeededSamples`); :func:`take` checks samples against the example inputs.
What the training loop consumes: one process's part of every global batch (:class:`Share`: whole
samples when the batch splits into them, else the rows of the samples that hold this process's rows)
— made by index from map-style data (:func:`shares`: the other processes' samples are never made or
read), or taken from the stream cycled (:func:`cycle`) and batched (:func:`batches`), which every
process iterates to keep its order but collates only its own part of — prefetched by a thread
(:func:`prefetch`) and collated, in a fixed order, so a resumed run skips exactly the consumed samples.
``FBQC_DATA_TRACE=PATH`` (tests) appends one line per sample made, read or kept to ``PATH.RANK``
(:func:`trace`).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from fbqc.errors import UserError

DATA_FREE_NOTE = ("data-free samples drawn around example_inputs(): float tensors ~ Normal(mean, std) "
                  "of the example tensor; scalars, integer and bool tensors kept as given")


#: the length of an endless map-style stream (``len()`` must be finite)
ENDLESS = 2**62

#: the environment variable naming the per-process data trace (:func:`trace`)
TRACE = "FBQC_DATA_TRACE"


def trace(event: str, index: int, detail: Any = "-") -> None:
    """With ``FBQC_DATA_TRACE=PATH``: append ``EVENT INDEX DETAIL`` to ``PATH.RANK`` (``RANK`` of the
    process, 0 without torchrun). Events: ``make`` (a :class:`SeededSamples` sample made), ``read`` (a
    captured record read; detail: the record), ``keep`` (a sample this process's training collates;
    detail: :func:`digest`). Without the variable it costs one environment lookup."""
    path = os.environ.get(TRACE)
    if path:
        with open(f"{path}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(f"{event} {index} {detail}\n")


def tracing() -> bool:
    return bool(os.environ.get(TRACE))


def digest(sample: Any) -> str:
    """A short hash of a sample's values (tensors by dtype, shape and bytes; nested dicts by key)."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, dict):
            for k in sorted(v):
                h.update(f"<{k}>".encode())
                feed(v[k])
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())

    feed(sample)
    return h.hexdigest()[:16]


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
        trace("make", i)
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
    streams, the data-free default, a capture): a process can make just its own samples."""
    return (not isinstance(data, (dict, str, bytes)) and hasattr(type(data), "__getitem__")
            and hasattr(type(data), "__len__"))


def batch_rows(sample: dict) -> int:
    """The rows of a sample along dim 0 (0: no tensor): ``hidden_states``' first dimension where the
    sample has it (every diffusers transformer does), else the longest first dimension of its tensors."""
    h = sample.get("hidden_states")
    if isinstance(h, torch.Tensor) and h.dim() > 0:
        return h.shape[0]
    return max((v.shape[0] for v in sample.values() if isinstance(v, torch.Tensor) and v.dim() > 0), default=0)


def batched(sample: dict) -> set[str]:
    """The names of the tensors that carry the batch along dim 0. With ``hidden_states``: those whose first
    dimension is its (a tensor whose first dimension differs — FLUX's ``img_ids``/``txt_ids``, positions
    without a batch dimension — is shared by the samples of a batch, not concatenated or split); without
    it, every tensor with a dimension."""
    tensors = {k: v for k, v in sample.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if "hidden_states" not in tensors:
        return set(tensors)
    rows = tensors["hidden_states"].shape[0]
    return {k for k, v in tensors.items() if v.shape[0] == rows}


@dataclass(frozen=True)
class Share:
    """Process ``rank``'s part of every global batch of ``batch`` samples split over ``size`` processes:
    samples ``first…stop-1`` of the batch and, of those samples collated, rows ``rows`` (None: all).

    When ``size`` divides ``batch`` a process takes ``batch/size`` whole samples (no two processes
    share one). Otherwise the collated rows (``batch × sample_rows``) split evenly, and a process takes
    the samples that hold its rows (``--batch 1``: every process the one sample, each its rows of it;
    a sample straddling two processes' rows is made by both)."""
    batch: int
    size: int
    rank: int
    first: int
    stop: int
    rows: tuple[int, int] | None = None

    @classmethod
    def of(cls, batch: int, size: int, rank: int, sample_rows: int) -> "Share":
        if batch % size == 0:
            per = batch // size
            return cls(batch, size, rank, rank * per, (rank + 1) * per)
        total = batch * sample_rows
        if sample_rows == 0 or total % size:
            raise UserError(f"the global batch ({batch} sample(s) of {sample_rows} row(s)) does not split over "
                            f"{size} processes; use a --batch that is a multiple of --nproc")
        per = total // size
        lo, hi = rank * per, (rank + 1) * per
        first, stop = lo // sample_rows, -(-hi // sample_rows)
        return cls(batch, size, rank, first, stop, (lo - first * sample_rows, hi - first * sample_rows))

    @property
    def whole(self) -> bool:
        return self.rows is None

    def take(self, collated: dict) -> dict:
        """This process's rows of its samples collated (tensors whose dim 0 is all the samples' rows)."""
        if self.rows is None:
            return collated
        lo, hi = self.rows
        n, keys = batch_rows(collated), batched(collated)
        return {k: v[lo:hi] if k in keys and v.shape[0] == n else v for k, v in collated.items()}

    def describe(self, map_style: bool) -> str:
        if self.size == 1:
            return "one process: the whole batch"
        how = ("map-style: the other processes' samples are never made or read" if map_style else
               "a stream: every process iterates it in order, collating only its own samples")
        if self.whole:
            return (f"per process: each of the {self.size} processes takes only its own {self.stop - self.first} "
                    f"of the {self.batch} samples of a global batch ({how})")
        return (f"split by rows: --batch {self.batch} over {self.size} processes splits the global batch's "
                f"rows evenly, each process taking the samples that hold its rows (process {self.rank}: samples "
                f"{self.first}–{self.stop - 1} of each batch, rows {self.rows[0]}–{self.rows[1] - 1} of them; "
                f"{how}); a --batch that is a multiple of --nproc gives each process whole samples of its own")


def shares(data, start: int, batch: int, lo: int, hi: int) -> Iterator[list[dict]]:
    """Map-style ``data`` cycled from position ``start``: samples ``lo…hi-1`` of each global batch of
    ``batch`` samples (this process's share; the same order as :func:`cycle` + :func:`batches`), made
    by index: no other sample is made."""
    n = len(data)
    if n == 0:
        raise ValueError("training data yielded no samples")
    while True:
        yield [data[(start + j) % n] for j in range(lo, hi)]
        start += batch


def stream_shares(factory: Callable[[], Iterable], start: int, batch: int, lo: int, hi: int,
                  first: Iterable | None = None) -> Iterator[list[dict]]:
    """A stream (no ``data[i]``) cycled from position ``start``: samples ``lo…hi-1`` of each global batch
    (the order of :func:`shares`). Every process reads the whole stream — the only way to know its
    order — and drops the other processes' samples as they come (never collated, checked or staged)."""
    samples = cycle(factory, start, first)
    while True:
        part = []
        for j in range(batch):
            x = next(samples)
            if lo <= j < hi:
                part.append(x)
        yield part


def batches(samples: Iterator[dict], n: int) -> Iterator[list[dict]]:
    while True:
        yield [next(samples) for _ in range(n)]


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced ahead by a thread (the module student's data: batches of the model file's
    samples are made while the GPU works; the order, hence a resumed position, is unchanged).

    Closing the returned generator (the training loop does, when it ends) stops the thread and waits
    for it: a thread still inside torch's C++ code when the interpreter shuts down can abort the
    process ("terminate called without an active exception")."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))

    thread = threading.Thread(target=work, daemon=True, name="fbqc-prefetch")
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)


def collate(samples: list[dict]) -> dict:
    """Samples concatenated along dim 0 (their batched tensors, :func:`batched`); other values from the
    first sample — a tensor without a batch dimension must be the same in every sample of a batch."""
    if len(samples) == 1:
        return samples[0]
    keys = batched(samples[0])
    out = {}
    for k, v in samples[0].items():
        if k in keys:
            out[k] = torch.cat([x[k] for x in samples])
            continue
        if isinstance(v, torch.Tensor) and any(not torch.equal(x[k], v) for x in samples[1:]):
            raise UserError(f"input {k!r} {tuple(v.shape)} has no batch dimension (its first dimension is not "
                            f"hidden_states') and differs between the samples of a batch, so they cannot be "
                            f"batched together; give every sample the same {k!r} or use --batch 1")
        out[k] = v
    return out


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
