"""Pass infrastructure: ``Pass``, ``PassResult``, ``PassManager`` and the errors they raise.

A pass declares the stage(s) it ``requires`` and the stage it ``produces``, and whether it works
``in_place``. The infrastructure — not the pass — checks the stage precondition, copies the program
for functional passes, checks that a functional pass did not touch its input, stamps the new stage,
and (in a ``PassManager``) times each pass, verifies after it (``verify_each``) and prints the graph
after each change (``print_after_change``). Instruments observe passes without the passes knowing
(progress bars, logging), as in TVM's ``PassContext``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterable, Sequence, TextIO

from .memory import peak_rss_mb
from .program import PassRecord, Program
from .stage import Stage


class PassError(RuntimeError):
    """A pass failed; the message names the pass and the reason."""

    def __init__(self, pass_name: str, reason: str):
        super().__init__(f"pass {pass_name}: {reason}")
        self.pass_name, self.reason = pass_name, reason


class PreconditionError(PassError):
    pass


class PostconditionError(PassError):
    pass


@dataclass
class PassResult:
    program: Program
    modified: bool


class Pass:
    """Base class. Subclasses set ``requires``/``produces`` and implement :meth:`run`."""

    requires: Stage | tuple[Stage, ...] = Stage.EXPORTED
    produces: Stage = Stage.EXPORTED
    in_place: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def required_stages(self) -> tuple[Stage, ...]:
        return self.requires if isinstance(self.requires, tuple) else (self.requires,)

    # hooks ------------------------------------------------------------------------------------
    def check_ensures(self, program: Program) -> None:
        """Postconditions on the pass's output program (already stamped with ``produces``);
        raise :class:`PostconditionError`."""

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # driver -----------------------------------------------------------------------------------
    def __call__(self, program: Program) -> PassResult:
        if program.stage not in self.required_stages():
            want = " or ".join(str(s) for s in self.required_stages())
            raise PreconditionError(self.name, f"needs a {want} program, got {program.stage}")
        before = None if self.in_place else program.graph_fingerprint()
        work = program if self.in_place else program.copy()
        result = self.run(work)
        if not isinstance(result, PassResult):
            raise PostconditionError(self.name, f"run() returned {type(result).__name__}, not PassResult")
        if before is not None and program.graph_fingerprint() != before:
            raise PostconditionError(self.name, "declared functional (in_place=False) but changed its input")
        result.program.stage = self.produces
        if result.modified:
            result.program.recompile()
        self.check_ensures(result.program)
        return result

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({fields})"


class Instrument:
    """Observes a PassManager run (progress bars, logs). Both hooks are optional."""

    def before_pass(self, p: Pass, program: Program) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, record: PassRecord) -> None: ...


class PassManager:
    """Runs an ordered list of passes (one explicit list per pipeline, no pairwise constraints)."""

    def __init__(self, passes: Sequence[Pass], *, verify_each: bool = False,
                 print_after_change: bool | TextIO = False,
                 instruments: Iterable[Instrument] = ()):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.print_after_change = print_after_change
        self.instruments = list(instruments)

    def __call__(self, program: Program) -> Program:
        from .stage_contract import verify  # local: the verifier imports the pass-independent IR only

        if self.verify_each:
            verify(program, after="(input)")
        for p in self.passes:
            for ins in self.instruments:
                ins.before_pass(p, program)
            start = time.perf_counter()
            result = p(program)
            record = PassRecord(p.name, "/".join(str(s) for s in p.required_stages()), str(p.produces),
                                result.modified, time.perf_counter() - start, peak_rss_mb())
            program = result.program
            program.history.append(record)
            if self.verify_each:
                verify(program, after=p.name)
            if result.modified and self.print_after_change:
                stream = sys.stdout if self.print_after_change is True else self.print_after_change
                print(f"// ----- after {p.name} ({program.stage}) -----", file=stream)
                print(program.graph_module.print_readable(print_output=False), file=stream)
            for ins in self.instruments:
                ins.after_pass(p, result, record)
        return program
