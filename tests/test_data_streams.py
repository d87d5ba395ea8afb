"""Map-style sample streams (fbqc.data.SamplesAround, the examples' SeededSamples) and the per-process
shares the training loop takes of them (also fbqc.data)."""
from __future__ import annotations

import itertools

import pytest
import torch

from fbqc import data as S
from fbqc.data import ENDLESS, SamplesAround, samples_around, sample_seed
from fbqc.frontend import load_model_file

EXAMPLE = {"x": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 4 + 1,
           "t": torch.tensor([5]), "one": torch.tensor([2.0])}


def test_samples_around_is_map_style_and_order_free():
    s = SamplesAround(EXAMPLE, seed=3)
    assert S.indexed(s) and len(s) == ENDLESS
    first = list(itertools.islice(samples_around(EXAMPLE, seed=3), 4))
    for i in (3, 0, 2, 1):                                   # any order, same samples
        assert torch.equal(s[i]["x"], first[i]["x"])
    assert not torch.equal(first[0]["x"], first[1]["x"])
    assert not torch.equal(SamplesAround(EXAMPLE, seed=4)[0]["x"], first[0]["x"])
    g = torch.Generator().manual_seed(sample_seed(3, 2))   # sample i: Normal(mean, std) from its own seed
    x = EXAMPLE["x"]
    assert torch.equal(s[2]["x"], torch.randn(2, 3, generator=g) * x.std() + x.mean())
    assert s[1]["t"] is EXAMPLE["t"] and s[1]["one"] is EXAMPLE["one"]      # kept as given
    with pytest.raises(IndexError):
        s[-1]


def test_shares_split_each_batch_like_one_process():
    data = list(range(7))                                    # finite: cycles
    one = S.batches(S.cycle(lambda: data, 3), 4)
    ranks = [S.shares(data, 3, 4, lo, lo + 2) for lo in (0, 2)]
    for _ in range(5):
        assert next(one) == next(ranks[0]) + next(ranks[1])
    assert not S.indexed({"a": 1}) and not S.indexed(iter(data)) and S.indexed(data)
    with pytest.raises(ValueError, match="no samples"):
        next(S.shares([], 0, 2, 0, 1))


def test_example_streams_are_map_style():
    from pathlib import Path

    mf = load_model_file(Path(__file__).resolve().parents[1] / "examples" / "sana.py")
    data = mf.call("training_data")
    assert S.indexed(data)
    it = list(itertools.islice(iter(data), 3))
    assert all(torch.equal(it[i]["encoder_hidden_states"], data[i]["encoder_hidden_states"]) for i in range(3))
    ex = mf.call("example_inputs")
    assert set(ex) == set(data[0]) and all(ex[k].shape == data[0][k].shape for k in ex)


def _global(data, start, batch, steps):
    one = S.batches(S.cycle(lambda: data, start), batch)
    return [S.collate(next(one)) for _ in range(steps)]


@pytest.mark.parametrize("batch,size", [(4, 2), (6, 3), (1, 2), (3, 2), (1, 4), (5, 4)])
def test_each_process_share_is_its_rows_of_the_global_batch(batch, size):
    """Whatever the batch and the process count: the processes' parts (map-style made by index, or kept
    from the stream) concatenate to the one process's global batch, and a process makes only the
    samples holding its rows (whole samples of its own when the count divides the batch)."""
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, 3, generator=g), "t": torch.tensor([float(i)] * 4)} for i in range(7)]
    made: dict[int, list[int]] = {}

    class Logged(list):
        def __getitem__(self, i):
            made.setdefault(rank, []).append(i)
            return list.__getitem__(self, i)

    steps, start = 4, 3
    want = _global(data, start, batch, steps)
    parts = {}
    for rank in range(size):
        share = S.Share.of(batch, size, rank, S.batch_rows(data[0]))
        assert share.whole == (batch % size == 0)
        m = S.shares(Logged(data), start, batch, share.first, share.stop)
        s = S.stream_shares(lambda: iter(data), start, batch, share.first, share.stop)
        parts[rank] = []
        for _ in range(steps):
            a, b = share.take(S.collate(next(m))), share.take(S.collate(next(s)))
            assert all(torch.equal(a[k], b[k]) for k in a)                  # map-style = the stream's order
            parts[rank].append(a)
        assert len(made[rank]) == steps * (share.stop - share.first) <= steps * (-(-batch // size) + 1)
    for step in range(steps):
        for k in ("x", "t"):
            assert torch.equal(torch.cat([parts[r][step][k] for r in range(size)]), want[step][k])
    if batch % size == 0:                                                   # disjoint whole samples
        assert sorted(i for r in made for i in made[r]) == sorted((start + j) % 7 for j in range(steps * batch))


def test_a_batch_whose_rows_do_not_split_is_one_line_naming_the_fix():
    from fbqc.errors import UserError

    with pytest.raises(UserError, match="multiple of --nproc"):
        S.Share.of(3, 2, 0, 1)
    assert "only its own 2 of the 4 samples" in S.Share.of(4, 2, 1, 1).describe(True)
    assert "split by rows" in S.Share.of(1, 2, 1, 4).describe(False)
    assert S.Share.of(1, 2, 1, 4).rows == (2, 4)                          # the one sample, its last 2 rows
    s = S.Share.of(3, 2, 1, 4)                                              # 12 rows: 6..11 = samples 1, 2
    assert (s.first, s.stop, s.rows) == (1, 3, (2, 8))


def test_inputs_without_a_batch_dimension_are_shared_not_concatenated():
    """FLUX's img_ids / txt_ids have no batch dimension: a batch of samples keeps one copy, and a process's
    rows are cut from the batched tensors only (before, collate concatenated them into (2·64, 3))."""
    from fbqc.errors import UserError

    def sample(i):
        g = torch.Generator().manual_seed(i)
        return {"hidden_states": torch.randn(1, 64, 4, generator=g), "timestep": torch.tensor([float(i)]),
                "img_ids": torch.arange(64 * 3.0).reshape(64, 3), "txt_ids": torch.zeros(8, 3),
                "guidance": None}

    one = [sample(i) for i in range(4)]
    assert S.batched(one[0]) == {"hidden_states", "timestep"} and S.batch_rows(one[0]) == 1
    b = S.collate(one)
    assert b["hidden_states"].shape == (4, 64, 4) and b["timestep"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert b["img_ids"] is one[0]["img_ids"] and b["txt_ids"].shape == (8, 3) and b["guidance"] is None
    share = S.Share.of(2, 2, 1, S.batch_rows(one[0]))                 # 2 samples over 2 processes: whole
    assert (share.first, share.stop) == (1, 2) and share.take(S.collate(one[1:2]))["img_ids"].shape == (64, 3)
    rows = S.Share.of(1, 2, 1, 4)                                      # hidden_states of 4 rows, split 2 + 2
    x = {**one[0], "hidden_states": torch.randn(4, 64, 4), "timestep": torch.arange(4.0)}
    got = rows.take(x)
    assert got["hidden_states"].shape == (2, 64, 4) and got["timestep"].tolist() == [2.0, 3.0]
    assert got["img_ids"].shape == (64, 3)                             # shared: never cut into rows
    from fbqc.qat.parallel.dist import World, shard_batch

    cut = shard_batch(S.collate(one[:2]), World(1, 2, 1, False))
    assert cut["hidden_states"].shape == (1, 64, 4) and cut["img_ids"].shape == (64, 3)
    different = [one[0], {**one[1], "img_ids": one[1]["img_ids"] + 1}]
    with pytest.raises(UserError, match=r"input 'img_ids' \(64, 3\) has no batch dimension .* differs"):
        S.collate(different)


def test_flux_trains_two_samples_per_process(tmp_path):
    """`fbqc train examples/flux_schnell.py --batch 2` (one process, the module student): before, collate
    concatenated img_ids / txt_ids and the forward failed ("size of tensor a (72) must match … (144)")."""
    import json

    from click.testing import CliRunner
    from conftest import example

    from fbqc.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(example("flux_schnell")), "--preset", "tiny", "--batch", "2",
                                  "--steps", "2", "--schedule", "direct", "--strategy", "ddp", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(x["loss"] > 0 for x in rows)


def test_prefetch_keeps_the_order_and_its_thread_stops_when_closed():
    import itertools
    import threading

    from fbqc.data import prefetch

    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    def threads():
        return {t for t in threading.enumerate() if t.name == "fbqc-prefetch"}

    before = threads()                  # another test's, if any
    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    ours = threads() - before
    assert len(ours) == 1
    it.close()                          # what the training loop does at its end
    assert not next(iter(ours)).is_alive()
    assert len(made) <= 5 + 2 + 2       # at most the queue's depth (and the item in hand) ahead

    def failing():
        yield 1
        raise ValueError("bad sample 1")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad sample 1"):
        next(it)
