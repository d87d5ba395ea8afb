"""Every check of ``fbqc train`` that can run before anything is deleted or exported (DESIGN.md §1:
``--force`` replaces a run only after the command's checks have passed)."""
from __future__ import annotations

from pathlib import Path

from fbqc.errors import UserError
from fbqc.frontend import REQUIRED, load_model_file


def check_train_command(model_file: str | Path, opts, schedule: str | None, steps: int | None,
                        bits: float | None) -> None:
    """The schedule parses, the model file imports and defines what training needs (accepting the
    given options; its example_inputs() is made), and the layer regexes compile; raises :class:`UserError` naming the problem."""
    from fbqc.pipeline import build_passes

    from .schedule import Schedule

    try:
        Schedule.parse(schedule or "fractional", steps or 1000, bits)
    except ValueError as e:
        raise UserError(f"--schedule {schedule or 'fractional'}: {e}") from None
    mf = load_model_file(model_file, preset=opts.preset, checkpoint=opts.checkpoint)
    for name in REQUIRED:
        mf.check(name)
    mf.call("example_inputs")                                # the options are valid (e.g. --preset)
    try:
        build_passes(opts, data=(), progress=False)          # compiles --include/--exclude/--layer-bits/--a16
    except ValueError as e:
        raise UserError(str(e)) from None
