"""Simulator work as independent jobs: compile one ONNX graph for the HTP and run it once.

``verify`` and ``profile`` describe each piece of simulator work (the teacher-forced layer model or a
chunk of it, a block, the whole context) as a :class:`SimJob`: a model *file*, its feeds and what to
record. :func:`run_jobs` runs them in this process (``jobs=1``), or in worker processes (``jobs>1``,
a ``forkserver`` pool whose server has imported this module once): feeds and outputs travel as ``.npz``
files, never as live sessions, and results come back in the order the jobs were given, whatever
order they finished in, so the report does not depend on ``jobs``.
"""
from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class SimJob:
    key: str                                  # what it checks, e.g. "block transformer_blocks.0"
    model: str                                # ONNX file: a QDQ graph or the EPContext model
    soc: str
    feeds: dict[str, np.ndarray] | str        # arrays, or an .npz file written for a worker
    placement: bool = False                   # count the nodes that did not land on the HTP
    profile_csv: str | None = None            # QNN profiling_level=detailed into this CSV
    inputs_from_session: bool = True          # feed only the inputs the session takes
    info: dict[str, Any] = field(default_factory=dict)   # the caller's, carried through


@dataclass
class SimResult:
    key: str
    outputs: dict[str, np.ndarray]            # by ONNX output name, in the session's output order
    compile_seconds: float
    run_seconds: float
    cpu_nodes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    names = list(arrays)
    np.savez(path, __names__=np.array(names, dtype=object), **{f"a{i}": arrays[n] for i, n in enumerate(names)})


def _load(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=True) as z:
        names = list(z["__names__"])
        return {n: z[f"a{i}"] for i, n in enumerate(names)}


def run_job(job: SimJob) -> SimResult:
    """Compile (or load) ``job.model`` on the HTP simulator and run it once, here."""
    from . import qnn
    from .qnn_compile import off_htp

    target = qnn.soc(job.soc)
    extra = {}
    if job.profile_csv is not None:
        extra = {"profiling_level": "detailed", "profiling_file_path": str(Path(job.profile_csv).resolve())}
    t = time.perf_counter()
    sess = qnn.session(job.model, target, record_placement=job.placement, **extra)
    compile_s = time.perf_counter() - t
    cpu_nodes = len(off_htp(qnn.placement(sess))) if job.placement else None
    feeds = _load(job.feeds) if isinstance(job.feeds, str) else job.feeds
    if job.inputs_from_session:
        feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    t = time.perf_counter()
    outs = sess.run(None, feeds)
    run_s = time.perf_counter() - t
    del sess                                  # a profiling session writes its CSV when released
    return SimResult(job.key, dict(zip(names, outs)), compile_s, run_s, cpu_nodes, job.info)


def _worker(job: SimJob, out_path: str) -> SimResult:
    res = run_job(job)
    _save(Path(out_path), res.outputs)
    return replace(res, outputs={})           # the arrays travel as a file


_POOL_CONTEXT = None


def _context():
    global _POOL_CONTEXT
    if _POOL_CONTEXT is None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        _POOL_CONTEXT = multiprocessing.get_context(method)
        if method == "forkserver":
            _POOL_CONTEXT.set_forkserver_preload([__name__])
    return _POOL_CONTEXT


def run_jobs(jobs: list[SimJob], n: int = 1, on_done: Callable[[SimResult], None] | None = None,
             on_start: Callable[[SimJob], None] | None = None) -> list[SimResult]:
    """Run ``jobs`` (``n`` at a time in worker processes when ``n > 1``); results in the jobs' order."""
    if n <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            if on_start is not None:
                on_start(job)
            results.append(run_job(job))
            if on_done is not None:
                on_done(results[-1])
        return results
    with tempfile.TemporaryDirectory(prefix="fbqc_htp_jobs_") as tmp:
        sent = []
        for i, job in enumerate(jobs):
            if not isinstance(job.feeds, str):
                path = Path(tmp) / f"feeds{i}.npz"
                _save(path, job.feeds)
                job = replace(job, feeds=str(path))
            sent.append((job, str(Path(tmp) / f"out{i}.npz")))
        results: list[SimResult | None] = [None] * len(jobs)
        pool = ProcessPoolExecutor(max_workers=min(n, len(jobs)), mp_context=_context())
        try:
            pending = {}
            for i, (job, out) in enumerate(sent):
                if on_start is not None:
                    on_start(job)
                pending[pool.submit(_worker, job, out)] = i
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    res = fut.result()
                    results[i] = replace(res, outputs=_load(sent[i][1]))
                    if on_done is not None:
                        on_done(results[i])
        except BaseException:
            # Ctrl-C, SIGTERM or a failed job: stop the other simulator runs now rather than wait for them
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return results
