"""Errors a user can fix. The CLI prints their message as one line (traceback only with --debug)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix (file, node, op, flag)."""


class ModelFileError(UserError):
    pass


class ExportError(UserError):
    pass


class ArtifactError(UserError):
    pass
