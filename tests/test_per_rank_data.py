"""Per-rank data (issue 18, part 3): with N processes each one makes, reads and stages only its own
samples of every global batch — for the data-free default, a map-style ``training_data()``, captured
trajectories (``--data``, with ``--teacher-cache``'s recorded targets) and a stream ``training_data()``
(which every process iterates to keep its order, collating only its own samples).

Two gloo processes (one torchrun launch runs all four sources through ``train_model_file``, what each
``fbqc train --nproc 2`` process runs) against one process on the same sources: every process writes
``FBQC_DATA_TRACE`` lines — ``keep INDEX DIGEST`` per sample it stages, ``make``/``read`` per sample the
data-free default makes or per record a capture reads — and the map-style model file logs its own
``__getitem__`` calls per process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fbqc.captured_data import CapturedTraining, Selector
from fbqc.qat.model_file import train_model_file
from fbqc.trajectories import Trajectories
from test_captured_data import MODEL, make_capture
from test_qat_toy import one_thread

STEPS, BATCH, RANKS = 3, 4, 2
SETTINGS = {"schedule": "8:1,4:2", "steps": STEPS, "lr": 1e-3, "batch": BATCH, "strategy": "ddp"}

MAP_STYLE = '''

class Logged:
    """Map-style (len + getitem): every sample made is logged with the process that made it."""
    def __len__(self):
        return 7                                           # finite: cycles (3 steps × 4 samples > 7)
    def __getitem__(self, i):
        import os
        with open(f"{os.environ['FBQC_TEST_MADE']}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(f"{i}\\n")
        g = torch.Generator().manual_seed(100 + i)
        return {"hidden_states": torch.randn(1, TOKENS, 8, generator=g),
                "encoder_hidden_states": torch.randn(1, 3, 6, generator=g), "timestep": torch.tensor([10.0 * i])}

def training_data():
    return Logged()
'''

STREAM = '''

def training_data():
    g = torch.Generator().manual_seed(7)
    i = 0
    while True:
        yield {"hidden_states": torch.randn(1, TOKENS, 8, generator=g),
               "encoder_hidden_states": torch.randn(1, 3, 6, generator=g), "timestep": torch.tensor([10.0 * i])}
        i += 1
'''

DRIVER = '''
import json, os, sys
import torch, torch.distributed as dist
from fbqc.qat.model_file import train_model_file

torch.set_num_threads(1)
dist.init_process_group("gloo")                 # joined by each run (fbqc does not tear it down)
cases, settings = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rank0 = os.environ["RANK"] == "0"
for name, (model, extra) in cases.items():
    os.environ["FBQC_DATA_TRACE"] = f"trace-{name}-two"
    os.environ["FBQC_TEST_MADE"] = f"made-{name}-two"
    train_model_file(model, f"{name}-two", progress=False, report=False, nproc=2, **settings, **extra,
                     log=(lambda s: print(s, flush=True)) if rank0 else (lambda s: None))
dist.destroy_process_group()
'''


def events(path: Path, event: str) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    rows = (line.split() for line in path.read_text().splitlines())
    return [(int(i), detail) for e, i, detail in rows if e == event]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_each_process_makes_reads_and_stages_only_its_own_samples(tmp_path, monkeypatch):
    (tmp_path / "free.py").write_text(MODEL)
    (tmp_path / "mapped.py").write_text(MODEL + MAP_STYLE)
    (tmp_path / "streamed.py").write_text(MODEL + STREAM)
    cap = make_capture(tmp_path / "cap", tmp_path / "free.py", prompts=2, steps=3)     # 12 records
    cases = {"free": ("free.py", {}), "mapped": ("mapped.py", {}), "streamed": ("streamed.py", {}),
             "captured": ("free.py", {"data_dir": str(cap.resolve()), "teacher_cache": True})}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "driver.py").write_text(DRIVER)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={RANKS}", "driver.py", json.dumps(cases), json.dumps(SETTINGS)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)             # torchrun and its workers: one group to end
    try:
        monkeypatch.chdir(tmp_path)               # meanwhile: one process on the same sources
        with one_thread():
            for name, (model, extra) in cases.items():
                monkeypatch.setenv("FBQC_DATA_TRACE", f"trace-{name}-one")
                monkeypatch.setenv("FBQC_TEST_MADE", f"made-{name}-one")
                train_model_file(model, f"{name}-one", progress=False, report=False, nproc=1, **SETTINGS, **extra)
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:                      # a failure here: end the processes this test started
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 0, err[-3000:]

    per, used = BATCH // RANKS, STEPS * BATCH
    # rank r's samples of the endless stream; the data thread prefetches a few batches past the last step
    own = {r: [s * BATCH + r * per + k for s in range(STEPS + 8) for k in range(per)] for r in range(RANKS)}

    def only_own(r: int, indices: list[int]) -> bool:
        return len(indices) >= STEPS * per and indices == own[r][:len(indices)]

    records = CapturedTraining(Selector(Trajectories(cap), {}, "--data"), seed=0)
    for name in cases:
        one = [e for e in events(tmp_path / f"trace-{name}-one.0", "keep") if e[0] < used]
        assert [i for i, _ in one] == list(range(used)), name                   # the global batches, in order
        kept = {r: events(tmp_path / f"trace-{name}-two.{r}", "keep") for r in range(RANKS)}
        assert all(only_own(r, [i for i, _ in kept[r]]) for r in range(RANKS)), name   # only its own staged
        kept = {r: [e for e in kept[r] if e[0] < used] for r in range(RANKS)}
        assert not set(kept[0]) & set(kept[1])                                  # disjoint, and together
        assert sorted(kept[0] + kept[1]) == one, name                            # the one process's samples
        made = {r: [i for i, _ in events(tmp_path / f"trace-{name}-two.{r}", "make")] for r in range(RANKS)}
        read = {r: events(tmp_path / f"trace-{name}-two.{r}", "read") for r in range(RANKS)}
        if name == "free":                      # the data-free default: map-style, only its own made
            assert all(only_own(r, made[r]) for r in range(RANKS))
        if name == "mapped":                    # the model file's __getitem__: only its own indices
            calls = {r: [int(x) for x in (tmp_path / f"made-{name}-two.{r}").read_text().split()]
                     for r in range(RANKS)}
            assert all(len(calls[r]) >= STEPS * per and calls[r] == [i % 7 for i in own[r][:len(calls[r])]]
                       for r in range(RANKS)), calls
        if name == "captured":                  # only its own records (and their teacher outputs) read
            assert all(only_own(r, [i for i, _ in read[r]]) for r in range(RANKS))
            assert all(int(rec) == records.record_index(i) for r in range(RANKS) for i, rec in read[r])
            assert sorted(records.record_index(i) for i in range(12)) == list(range(12))  # an epoch: all
        else:
            assert not read[0] and not read[1]
        if name != "free":
            assert not made[0] and not made[1]
        run = json.loads((tmp_path / f"{name}-two" / "run.json").read_text())
        split = run["data_split"]
        assert [(s["from_step"], s["processes"], s["per_process"], s["map_style"]) for s in split] == \
            [(0, 2, "samples", name != "streamed")], name
        assert f"data: {split[0]['note']}" in out and "only its own 2 of the 4 samples" in split[0]["note"]
        a, b = losses(tmp_path / f"{name}-one"), losses(tmp_path / f"{name}-two")
        assert len(a) == len(b) == STEPS and b == pytest.approx(a, rel=1e-4), name   # same data, same math
