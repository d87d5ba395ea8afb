"""LoadTrainedState: put a trained student's weights into a freshly built FAKE_QUANT program.

Used by ``fbqc compile RUN_DIR`` between InsertFakeQuant and Calibrate: the program was re-exported
from the run's model file and annotated with the run's flags (so its bits buffers already hold the
schedule's final bit-widths); this pass swaps in the trained parameters and checks that the run's
bits agree with the annotation. Calibration then runs on the trained student.
"""
from __future__ import annotations

import torch

from fbqc.pass_infra import Pass, PassError, PassResult
from fbqc.program import Program
from fbqc.spec import QUANT
from fbqc.stage import Stage

from .insert_fake_quant import bits_buffers


class LoadTrainedState(Pass):
    """Load a trained student's parameters (fbqc train) into the FAKE_QUANT program."""

    requires = Stage.FAKE_QUANT
    produces = Stage.FAKE_QUANT

    def __init__(self, state: dict[str, torch.Tensor], source: str = "trained state"):
        self.state, self.source = state, source

    def __repr__(self) -> str:
        return f"LoadTrainedState({self.source})"

    def run(self, program: Program) -> PassResult:
        gm = program.graph_module
        params = dict(gm.named_parameters())
        missing = [k for k in params if k not in self.state]
        if missing:
            raise PassError(self.name, f"{self.source} has no tensor for parameter(s) {missing[:3]}"
                                       f"{' …' if len(missing) > 3 else ''}: the run was trained on "
                                       f"another model or preset")
        for name, p in params.items():
            t = self.state[name]
            if t.shape != p.shape:
                raise PassError(self.name, f"{self.source}: {name} is {tuple(t.shape)}, the model has "
                                           f"{tuple(p.shape)}")
            *path, leaf = name.split(".")
            setattr(gm.get_submodule(".".join(path)), leaf,
                    torch.nn.Parameter(t.to(p.dtype).clone(), requires_grad=p.requires_grad))
        specs = {n.meta[QUANT].layer: n.meta[QUANT] for n in program.quantized_nodes()}
        for layer, buf in bits_buffers(program).items():
            key = next((k for k, v in gm.named_buffers() if v is buf), None)
            trained = self.state.get(key) if key else None
            want = specs[layer].weight.bits
            if trained is not None and float(trained) != want:
                raise PassError(self.name, f"{self.source}: layer {layer} ended training at "
                                           f"{float(trained):g} bits, the annotation says {want:g}")
        program.info["trained"] = self.source
        return PassResult(program, True)
