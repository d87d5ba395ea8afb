"""Standalone C99 reference code for INTEGER programs (``fbqc compile --target cpu --emit-c``).

``emit_c(program, out_dir)`` writes ``c/*.c`` + headers, ``weights.bin`` (+ ``weights.json``),
``inputs.bin`` and a README; ``build``/``run`` compile and run it (``fbqc verify``, tests, benchmarks).
One emitter per op kind in ``ops/``, keyed by the ``OpOverload`` it handles (``registry.py``).
"""
from .files import DEFAULT_CFLAGS, build_command, emit_c, normalize_cflags
from .registry import supported_ops

__all__ = ["emit_c", "build_command", "normalize_cflags", "DEFAULT_CFLAGS", "supported_ops"]
