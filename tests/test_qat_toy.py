"""Shared pieces of the QAT tests (imported by test_qat_*.py): a toy model file that exports in a
fraction of a second, and a one-thread context for the shared 2-core CI machine."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TOY = '''
import torch

class Toy(torch.nn.Module):
    """Two residual MLP blocks and a final projection: layer names like a DiT's (blocks.N.…)."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
             for _ in range(2)])
        self.proj_out = torch.nn.Linear(16, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, scale):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        return self.proj_out(h) * scale

def model():
    return Toy().eval()

def example_inputs():
    return {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), "scale": torch.ones(4, 1)}
'''

TRAINING_DATA = '''

def training_data():
    g = torch.Generator().manual_seed(2)
    while True:
        yield {"x": torch.randn(4, 8, generator=g), "scale": torch.rand(4, 1, generator=g) + 0.5}
'''


#: fbqc.qat.train(..., **QUIET): no progress bar, no log lines
QUIET = dict(progress=False, log=lambda s: None)


def toy_file(directory: Path, with_data: bool = True) -> Path:
    path = Path(directory) / ("toy.py" if with_data else "toy_nodata.py")
    path.write_text(TOY + (TRAINING_DATA if with_data else ""))
    return path


@contextlib.contextmanager
def one_thread():
    """The CI machine has 2 shared cores: tiny models run much faster on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_toy_model_file_exports_and_its_data_matches(tmp_path):
    import fbqc
    from fbqc.data import _check_like

    program, mf = fbqc.export_model_file(toy_file(tmp_path))
    assert [n.meta["val"].shape for n in program.graph.output_node().args[0]] == [torch.Size([4, 8])]
    sample = next(iter(mf.call("training_data")))
    _check_like(sample, program.example_inputs, "toy sample")
