"""fbqc passes. Each declares the stage it requires and produces; ``PASSES`` lists them in order.

    from fbqc.passes import AnnotateLinears, InsertFakeQuant, Calibrate, Fold, LowerToInteger
    from fbqc import PassManager
    program = PassManager([AnnotateLinears(bits=4.5), InsertFakeQuant(), Calibrate(data),
                           Fold(), LowerToInteger()], verify_each=True)(program)
"""
from .annotate import DEFAULT_INCLUDE, AnnotateLinears
from .calibrate import Calibrate, RangeObserver
from .fold import Fold
from .insert_fake_quant import InsertFakeQuant
from .lower import LowerToInteger

#: the default pipeline's passes, in order (``fbqc list-passes``)
PASSES = (AnnotateLinears, InsertFakeQuant, Calibrate, Fold, LowerToInteger)

__all__ = ["AnnotateLinears", "InsertFakeQuant", "Calibrate", "RangeObserver", "Fold",
           "LowerToInteger", "PASSES", "DEFAULT_INCLUDE"]
