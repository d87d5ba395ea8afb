"""Ctrl-C and SIGTERM (``timeout``, CI, Slurm) end every command the same clean way.

:func:`install` makes SIGTERM raise :class:`Stop`, handled like SIGINT's ``KeyboardInterrupt``, so
temporary directories are removed (``fbqc.outputs.staging``) and the CLI exits with one line (130 for SIGINT, 143 for
SIGTERM). :class:`StopAtStepEnd` lets a training loop finish its step and save a checkpoint first.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

#: the signal that interrupted this process (the CLI's exit code is 128 + it)
received: int | None = None


class Stop(BaseException):
    """A command stopped by a signal: SIGTERM (SIGINT stays ``KeyboardInterrupt``), or a loop that
    finished its step first; the message says what was saved and how to continue. Not a
    ``KeyboardInterrupt`` on purpose: CPython ends a process with SIGINT, whatever the exit code the
    program chose, once a ``KeyboardInterrupt`` has passed through certain C-API calls (pybind11's
    ``exec`` inside torch does), so SIGTERM could otherwise end as "killed by SIGINT"."""


def _raise(signum, frame):
    global received
    received = signum
    if signum == signal.SIGTERM:
        raise Stop()
    raise KeyboardInterrupt


def _unraisable(default):
    """A ``sys.unraisablehook``: an interrupt raised where Python cannot propagate it (a weakref or
    import-lock callback: Python prints "Exception ignored … Traceback" and goes on) is delivered again,
    so it lands in ordinary code and ends the command as any Ctrl-C does; anything else goes to ``default``."""

    def hook(unraisable):
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Stop)) and received is not None:
            # from another thread, a moment later: a handler run inside this hook would be ignored too
            threading.Timer(0.01, os.kill, (os.getpid(), received)).start()
            return
        default(unraisable)

    hook.fbqc = True
    return hook


def install() -> None:
    """SIGTERM behaves as SIGINT, and both are remembered in :data:`received` (a library may turn the
    ``KeyboardInterrupt`` into an error of its own: diffusers' lazy imports do). Main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
        signal.signal(signal.SIGINT, _raise)
        if not getattr(sys.unraisablehook, "fbqc", False):
            sys.unraisablehook = _unraisable(sys.unraisablehook)


def exit_code() -> int:
    return 128 + (received or signal.SIGINT)


def interrupted_hook(default):
    """A ``sys.excepthook`` for the fbqc command: a Ctrl-C / SIGTERM that escaped every handler (one
    that lands while ``fbqc.cli`` imports click or the backends, before its own handler exists) is
    one line and exit status 130 / 143, not a traceback; any other exception goes to ``default``.
    The stack has already unwound (``with`` blocks ran), so the process ends at once."""

    def hook(kind, value, tb):
        if not issubclass(kind, (KeyboardInterrupt, Stop)):
            return default(kind, value, tb)
        print("\ninterrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(exit_code())

    return hook


class StopAtStepEnd:
    """While active, the first SIGINT/SIGTERM only sets :attr:`signum` (the loop stops at the end of
    its step); a second one interrupts at once."""

    def __init__(self, say=lambda s: print(s, file=sys.stderr)) -> None:
        self.signum: int | None = None
        self.say = say
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame):
        global received
        received = signum
        if self.signum is not None:
            _raise(signum, frame)
        self.signum = signum
        self.say("stopping after this step (saving a checkpoint); interrupt again to stop at once")

    def __enter__(self) -> "StopAtStepEnd":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
