"""Scheduled fractional-bit QAT with knowledge distillation (FraQAT, DESIGN.md §5).

    import fbqc, fbqc.qat
    from fbqc.passes import AnnotateLinears, InsertFakeQuant
    teacher, _ = fbqc.export_model_file("examples/sana.py")                   # EXPORTED, frozen
    student = fbqc.PassManager([AnnotateLinears(bits=4), InsertFakeQuant()])(teacher)
    result = fbqc.qat.train(student, teacher, data=None, schedule="fractional", steps=200, out="runs/x")
    result.summary, result.program                                           # trained FAKE_QUANT program

Where things are::

    train.py        the training loop: train() (the program student), train_modules() (the module
                    student), kd_loss; one loop for both students
    config.py       TrainConfig: the settings of one run (fbqc train's flags) and their checks
    schedule.py     the bit-width schedules as data (fractional, integer, simple, direct, continuous,
                    NAME@SHARE, custom phases BITS:PARTS and ramps FROM..TO:PARTS)
    bit_change.py   what happens at a bit change: the remedies (--rewarm, --moments), the diagnostics
                    (loss spike, recovery, AdamW moments, weights crossing levels: weight_codes, level_flips)
    preflight.py    fbqc train's checks that run before anything is deleted or exported
    model_file.py   the command-line level: fbqc train MODEL_FILE -o RUN, fbqc compile RUN
    students/       what is trained: program.py (the FAKE_QUANT program), modules.py (the eager
                    model with the specs applied), adapters.py (the loop's view of either)
    parallel/       data-parallel training on one host: dist.py (torchrun, DDP/FSDP2, full state),
                    shards.py (FSDP2's optimizer step and clipping on the local shards)
    rundir/         the run directory: checkpoint.py (run.json, checkpoints, log, student.pt),
                    summary.py, plot.py (loss.png), profile.py (--profile), export.py
                    (fbqc export-diffusers)

Elsewhere: the fake-quant ops the students run are in :mod:`fbqc.ops`; the sample streams the loop
consumes in :mod:`fbqc.data`; the pass that loads a trained student into a freshly compiled program
is :class:`fbqc.passes.LoadTrainedState`.
"""
from fbqc.ops.dynamic import fake_quant_act_dynamic
from fbqc.passes.insert_fake_quant import bits_buffers

from .config import TrainConfig
from .schedule import NAMED, Phase, Schedule, split_steps
from .students.program import set_bits, training_view
from .train import TrainResult, kd_loss, train, train_modules

__all__ = ["train", "train_modules", "TrainConfig", "TrainResult", "Schedule", "Phase", "NAMED", "split_steps",
           "bits_buffers", "set_bits", "training_view", "kd_loss", "fake_quant_act_dynamic"]
