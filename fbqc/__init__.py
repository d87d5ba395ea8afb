"""fbqc — the fractional-bit quantization compiler (FraQAT) for diffusion transformers.

    import fbqc
    from fbqc.passes import AnnotateLinears, InsertFakeQuant, Calibrate, Fold, LowerToInteger
    program = fbqc.export(model, example_inputs)                 # EXPORTED
    program = fbqc.PassManager([AnnotateLinears(bits=4), InsertFakeQuant(),
                                Calibrate(data)], verify_each=True)(program)   # FAKE_QUANT
    program.specs()                                             # QuantSpec per layer
"""
import os as _os
import sys as _sys

_CLI = _os.path.basename(_sys.argv[0]) == "fbqc" or _sys.argv[0].endswith(_os.path.join("fbqc", "cli.py"))
if _CLI:                                # the fbqc command: its Ctrl-C / SIGTERM handling from the start
    from .signals import install as _install_signals
    from .signals import interrupted_hook as _interrupted_hook
    _install_signals()
    _sys.excepthook = _interrupted_hook(_sys.excepthook)   # an interrupt that escapes every handler

try:                                    # importing torch takes seconds: a Ctrl-C then is no traceback
    from . import ops as _ops  # noqa: F401  registers every torch.ops.fbqc.* op
    from .errors import UserError
    from .frontend import export, export_model_file, load_model_file
    from .pass_infra import Pass, PassError, PassManager, PassResult, PostconditionError, PreconditionError
    from .program import Program
    from .spec import ActSpec, QuantSpec, WeightSpec
    from .stage import Stage
    from .stage_contract import VerificationError, verify
except KeyboardInterrupt:
    if not _CLI:
        raise                           # a library import: the caller's Ctrl-C to handle
    print("\ninterrupted", file=_sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = ["export", "export_model_file", "load_model_file", "Program", "Stage", "Pass", "PassResult",
           "PassManager", "PassError", "PreconditionError", "PostconditionError", "QuantSpec",
           "WeightSpec", "ActSpec", "verify", "VerificationError", "UserError", "__version__"]
