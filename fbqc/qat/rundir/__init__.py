"""The run directory (``fbqc train -o RUN``): what a run writes and what later commands read from it.

- :mod:`.checkpoint`: ``run.json``, ``checkpoint.pt`` (bit-exact resume), ``log.jsonl``, ``student.pt``.
- :mod:`.summary`: ``summary.json``, the end-of-training summary; :mod:`.plot`: ``loss.png``.
- :mod:`.profile`: ``profile/`` (``fbqc train --profile``).
- :mod:`.export`: ``fbqc export-diffusers RUN DIR``, the trained student as a diffusers checkpoint.
"""
