"""fbqc passes. Each declares the stage it requires and produces; ``PASSES`` lists the default
pipeline's, in order. ``LoadTrainedState`` is not one of them: ``fbqc compile RUN_DIR`` inserts it
after InsertFakeQuant to load a trained QAT student.

    from fbqc.passes import AnnotateLinears, InsertFakeQuant, Calibrate, Fold, LowerToInteger
    from fbqc import PassManager
    program = PassManager([AnnotateLinears(bits=4.5), InsertFakeQuant(), Calibrate(data),
                           Fold(), LowerToInteger()], verify_each=True)(program)
"""
from .annotate import DEFAULT_INCLUDE, AnnotateLinears
from .calibrate import Calibrate, RangeObserver
from .fold import Fold
from .insert_fake_quant import InsertFakeQuant
from .load_trained_state import LoadTrainedState
from .lower import LowerToInteger

#: the default pipeline's passes, in order (``fbqc list-passes``)
PASSES = (AnnotateLinears, InsertFakeQuant, Calibrate, Fold, LowerToInteger)

__all__ = ["AnnotateLinears", "InsertFakeQuant", "Calibrate", "RangeObserver", "Fold",
           "LowerToInteger", "LoadTrainedState", "PASSES", "DEFAULT_INCLUDE"]
