"""Directories fbqc writes, and the rules that keep a user's data safe.

- **Kinds.** Each command writes one kind of directory (compile: an artifact, train: a run, eval: an
  evaluation, export-diffusers: a diffusers checkpoint; ``fbqc capture`` resumes into its directory and
  keeps its own rules, :mod:`fbqc.capture`, under the same lock). A directory is
  recognised as fbqc's own by its marker file *and* by holding nothing else than that kind writes.
- **--force** replaces an existing directory only when it is of the command's own kind, or empty —
  never anything else, never the current directory or one above it — and only after every check of
  the command has passed (callers call :func:`check_writable` early and replace late).
- **Staging.** Results are written to a hidden temporary sibling and renamed into place; a temporary
  directory left by a killed run (its owner process is gone) is removed by the next run into the same
  output.
- **One writer.** :func:`output_lock` holds an exclusive ``flock`` beside the output for the whole
  command: a second fbqc writing the same directory gets a clear error instead of a silent loss.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

#: kind → (marker file, the entries that kind may hold besides hidden temporary files)
KINDS: dict[str, tuple[str, frozenset[str] | None]] = {
    "artifact": ("manifest.json", None),                 # None: the manifest's "files" + known folders
    "run": ("run.json", frozenset({"run.json", "checkpoint.pt", "log.jsonl", "loss.png", "student.pt",
                                   "summary.json", "profile"})),
    "eval": ("eval.json", frozenset({"eval.json", "report.html", "images"})),
    "diffusers": ("fbqc_quant.json", None),              # save_pretrained's files
}
_ARTIFACT_FOLDERS = frozenset({"c"})                     # cpu --emit-c sources
_STAGING_MARK = ".fbqc-staging"                          # inside every temporary directory: its owner's pid


class OutputError(UserError):
    pass


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_replacing(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to the hidden ``.NAME.tmp`` beside ``path`` (fbqc's own: :func:`_hidden_tmp`), then
    rename it over ``path``: a reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _hidden_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def foreign_entry(directory: Path, kind: str) -> str | None:
    """Why ``directory`` is not an fbqc ``kind`` directory (None: it is one, and holds nothing else)."""
    marker, allowed = KINDS[kind]
    data = _json(directory / marker)
    if data is None:
        return f"no fbqc {marker}"
    if kind == "artifact" and not ("fbqc" in data and "backend" in data and "files" in data):
        return f"{marker} is not an fbqc artifact manifest"
    if kind == "run" and not ("source" in data and "format" in data):
        return f"{marker} is not an fbqc run description"
    if kind == "artifact":
        allowed = frozenset({marker, *data.get("files", {})}) | _ARTIFACT_FOLDERS
    elif kind == "diffusers":
        allowed = None
    for entry in sorted(os.listdir(directory)):
        if _hidden_tmp(entry):
            continue
        if allowed is not None and entry not in allowed:
            return f"it holds {entry!r}, which fbqc did not write there"
        if allowed is None and not (entry == marker or entry.endswith((".json", ".safetensors", ".bin"))):
            return f"it holds {entry!r}, which fbqc did not write there"
    return None


def _protected(out: Path) -> str | None:
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        return "it is the current directory or one above it"
    if target == Path.home().resolve() or target == Path(target.anchor):
        return "it is a home or root directory"
    return None


def check_writable(out: Path, force: bool, kind: str = "artifact") -> None:
    """Fail early (before minutes of work, before anything is deleted) if ``out`` cannot be written
    or, with ``force``, is not fbqc's own ``kind`` directory."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"output path {out} exists and is not a directory; choose another -o")
        if any(out.iterdir()) or not force:
            if not force:
                raise OutputError(f"output directory {out} exists; pass --force to replace it")
            why = _protected(out) or foreign_entry(out, kind)
            if why:
                raise OutputError(f"--force will not replace {out}: {why}. --force replaces only an fbqc "
                                  f"{kind} directory; choose another -o (or move {out} away yourself)")
        elif (why := _protected(out)):
            raise OutputError(f"cannot write into {out}: {why}; choose another -o")
    _check_parent(out)


def _check_parent(out: Path) -> None:
    probe = Path(out).resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write {out}: {probe} is not a directory (choose another -o)")
    if not os.access(probe, os.W_OK):
        raise OutputError(f"cannot write {out}: {probe} is not writable (choose another -o)")


def remove_own(out: Path, kind: str) -> None:
    """Delete ``out`` if (checked again, now) it is an fbqc ``kind`` directory or empty; else refuse.
    The directory is first renamed aside, so a crash leaves either it or nothing, never half of it."""
    out = Path(out)
    if not out.exists():
        return
    if any(out.iterdir()):
        why = _protected(out) or foreign_entry(out, kind)
        if why:
            raise OutputError(f"will not delete {out}: {why}")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.resolve().parent))
    os.replace(out, aside / out.name)
    shutil.rmtree(aside)


# ---- the one-writer lock ---------------------------------------------------------------------------

_held: dict[Path, int] = {}


def _lock_path(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.fbqc-lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (re-entrant within this process); another holder → error."""
    path = _lock_path(out)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    _check_parent(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"another fbqc process is writing {out} (lock {path}); wait for it to "
                                  f"finish or choose another -o") from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino     # not unlinked by a releasing holder
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# ---- staging ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Temporary directories of earlier runs into ``out`` whose process is gone (killed): removed.
    Only directories carrying fbqc's staging mark are touched."""
    out = Path(out).resolve()
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        mark = p / _STAGING_MARK
        if p.is_dir() and not p.is_symlink():
            try:
                pid = int(mark.read_text().strip())
            except (OSError, ValueError):
                if p.name.startswith(f".{out.name}.old.") and not any(x.name != out.name for x in p.iterdir()):
                    pid = -1                                 # an interrupted remove_own
                else:
                    continue
            if pid == -1 or (pid != os.getpid() and not _alive(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def staging(out: Path, force: bool, kind: str = "artifact") -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out`` (which must be
    fbqc's own ``kind`` directory when it exists), else it is deleted."""
    out = Path(out)
    with output_lock(out):
        check_writable(out, force, kind)
        parent = out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        (tmp / _STAGING_MARK).write_text(str(os.getpid()))
        try:
            yield tmp
            (tmp / _STAGING_MARK).unlink()
            _set_modes(tmp)
            remove_own(out, kind)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _set_modes(directory: Path) -> None:
    """mkdtemp makes 0700; the result gets the modes the user's umask gives a new directory/file."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if os.access(p, os.X_OK) else 0o666) & ~umask)
