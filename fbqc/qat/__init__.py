"""Scheduled fractional-bit QAT with knowledge distillation (FraQAT, DESIGN.md §5).

    import fbqc, fbqc.qat
    from fbqc.passes import AnnotateLinears, InsertFakeQuant
    teacher, _ = fbqc.export_model_file("examples/sana.py")                   # EXPORTED, frozen
    student = fbqc.PassManager([AnnotateLinears(bits=4), InsertFakeQuant()])(teacher)
    result = fbqc.qat.train(student, teacher, data=None, schedule="fractional", steps=200, out="runs/x")
    result.summary, result.program                                           # trained FAKE_QUANT program

``fbqc train MODEL_FILE`` and ``fbqc compile RUN_DIR`` are the command-line forms (:mod:`fbqc.qat.run`).
"""
from .load import LoadTrainedState
from .ops import fake_quant_act_dynamic
from .schedule import NAMED, Phase, Schedule, split_steps
from .student import bits_buffers, set_bits, training_view
from .config import TrainConfig
from .train import TrainResult, kd_loss, train, train_modules

__all__ = ["train", "train_modules", "TrainConfig", "TrainResult", "Schedule", "Phase", "NAMED", "split_steps",
           "bits_buffers", "set_bits", "training_view", "kd_loss", "fake_quant_act_dynamic",
           "LoadTrainedState"]
