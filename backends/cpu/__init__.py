"""The ``cpu`` backend: the golden reference for integer semantics."""
from .backend import CpuBackend

__all__ = ["CpuBackend"]
