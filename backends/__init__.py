"""The backends that ship with fbqc (``cpu``, ``htp``) and the contract every backend implements.

The contract is declared in :mod:`fbqc.backends.base`; the registry that finds plugins (these and
out-of-tree ones, through the ``fbqc.backends`` entry-point group) is :mod:`fbqc.plugins`.
"""
from .base import (Artifact, Backend, Describes, LoadedArtifact, NoOptions, NodeSupport, Profiles,
                   SupportReport, Verifies, option)

__all__ = ["Backend", "Verifies", "Profiles", "Describes", "LoadedArtifact", "SupportReport", "NodeSupport",
           "Artifact", "NoOptions", "option"]
