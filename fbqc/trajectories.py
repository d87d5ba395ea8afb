"""Captured teacher trajectories on disk (``fbqc capture`` writes them; calibration, training and
``fbqc eval`` read them).

A capture directory holds::

    manifest.json            kind "fbqc-capture", format 1 (rewritten atomically after every prompt):
                             model (file, opts, transformer class, weights_sha256), pipeline, scheduler
                             (class, config), steps, guidance, resolution, seed_offset, call (kwargs of
                             the pipeline call; static = the transformer's non-tensor arguments),
                             branches, prompts_file (path, sha256), requested, prompts (one entry per
                             finished prompt: prompt, seed, image, steps, timesteps, ...), complete,
                             records, bytes, timings
    shards/NNNNN.safetensors one per prompt, written atomically (temp file, then rename)
    shards/NNNNN.json        that prompt's entry (written after its shard: present = prompt finished)
    images/NNNNN.png         the teacher's image (the evaluation reference)
    .lock                    held while ``fbqc capture`` writes (one writer at a time)

One *record* is one transformer call of one guidance branch at one denoising step: its keyword
arguments exactly as the transformer received them (batch 1, dtypes kept) and its output (the
distillation target). Shard keys: ``{branch}/{key}`` for a tensor argument that is the same at every
step of the prompt (text embeddings: stored once per prompt), ``{branch}/{step:04d}/{key}`` for one
that changes, ``{branch}/{step:04d}/output`` for the output, and ``final_latents`` (what the VAE
decoder received). Nested arguments are flattened with ``.`` (``added_cond_kwargs.resolution``);
non-tensor leaves (``None``, numbers, strings, bools) are recorded once in the manifest's ``call``.
Records are numbered prompt by prompt, step by step, branch by branch (the order of
:meth:`Trajectories.records`). Shards and entries are deterministic (no timings; those are in the
manifest): the same inputs give byte-identical shards.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError
from .outputs import write_replacing

KIND = "fbqc-capture"
FORMAT = 1
MANIFEST = "manifest.json"
SHARDS, IMAGES = "shards", "images"
OUTPUT = "output"


class CaptureError(UserError):
    pass


# ---- keyword arguments <-> flat tensors + static values ------------------------------------------


def flatten_kwargs(kwargs: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor leaves by dotted path, non-tensor leaves by dotted path). Dicts nest; a list/tuple of
    tensors is not a transformer argument of the seed architectures and is refused by name."""
    tensors: dict[str, torch.Tensor] = {}
    static: dict[str, Any] = {}
    for k, v in kwargs.items():
        path = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[path] = v
        elif isinstance(v, dict):
            t, s = flatten_kwargs(v, path + ".")
            tensors.update(t)
            static.update(s)
            if not v:
                static[path] = {}
        elif v is None or isinstance(v, (bool, int, float, str)):
            static[path] = v
        else:
            raise CaptureError(f"transformer argument {path!r} is a {type(v).__name__}; fbqc capture "
                               f"records tensors, dicts of them and plain values (None, numbers, strings)")
    return tensors, static


def neutral_argument(key: str, value: Any) -> bool:
    """Dropping transformer argument ``key`` (dotted path) changes nothing the transformer computes:
    ``None``, ``return_dict``, a dict of such, or an attention mask of all ones. The one rule for every
    consumer that passes a program only its own inputs (calibration, training, ``fbqc eval``)."""
    leaf = key.rsplit(".", 1)[-1]
    if value is None or leaf == "return_dict":
        return True
    if isinstance(value, dict):
        return all(neutral_argument(f"{key}.{k}", v) for k, v in value.items())
    if isinstance(value, torch.Tensor) and "mask" in leaf:
        return bool((value == 1).all())
    return False


def describe_value(v: Any) -> str:
    """``tensor (1, 8) int64`` or the type's name, for messages about arguments."""
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    return type(v).__name__


def unflatten_kwargs(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_kwargs` (tensor and static leaves merged into one dict)."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


# ---- writing -------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"{index:05d}"


def write_json_atomic(path: Path, data: Any) -> None:
    write_replacing(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def shard_tensors(index: int, steps: list[dict[str, dict[str, Any]]],
                  final_latents: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(shard tensors by key, the entry fields they imply) for one prompt's records.

    ``steps[s][branch]`` = ``{"inputs": {dotted key: tensor (batch 1)}, "output": tensor}``. A key
    whose tensor is equal at every step (and there is more than one step) is stored once per branch.
    """
    if not steps:
        raise CaptureError(f"prompt {index}: the pipeline never called the transformer")
    branches = list(steps[0])
    keys = sorted(steps[0][branches[0]]["inputs"])
    for s, st in enumerate(steps):
        if list(st) != branches:
            raise CaptureError(f"prompt {index} step {s}: branches {list(st)}, step 0 had {branches}")
        for b in branches:
            if sorted(st[b]["inputs"]) != keys:
                raise CaptureError(f"prompt {index} step {s} branch {b}: tensor arguments "
                                   f"{sorted(st[b]['inputs'])}, step 0 had {keys}")
    first = {b: steps[0][b]["inputs"] for b in branches}
    per_prompt = [k for k in keys if len(steps) > 1 and all(
        torch.equal(st[b]["inputs"][k], first[b][k]) for st in steps for b in branches)]
    tensors: dict[str, torch.Tensor] = {}
    for b in branches:
        for key in per_prompt:
            tensors[f"{b}/{key}"] = first[b][key]
    timesteps = []
    for s, st in enumerate(steps):
        for b in branches:
            for key, v in st[b]["inputs"].items():
                if key not in per_prompt:
                    tensors[f"{b}/{s:04d}/{key}"] = v
            tensors[f"{b}/{s:04d}/{OUTPUT}"] = st[b]["output"]
        t = st[branches[-1]]["inputs"].get("timestep")
        timesteps.append(float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else None)
    if final_latents is not None:
        tensors["final_latents"] = final_latents
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fields = {"steps": len(steps), "branches": branches, "timesteps": timesteps, "per_prompt": per_prompt,
              "keys": keys}
    return tensors, fields


def write_prompt(directory: Path, index: int, entry: dict[str, Any],
                 steps: list[dict[str, dict[str, Any]]], final_latents: torch.Tensor | None) -> dict[str, Any]:
    """Write prompt ``index``'s shard, then its entry; returns the entry as stored.

    ``steps[s][branch]`` = ``{"inputs": {dotted key: tensor (batch 1)}, "output": tensor}``.
    ``entry``: prompt, seed, … (JSON, deterministic: no timings); ``steps``, ``branches``,
    ``timesteps``, ``per_prompt`` (the tensor keys stored once) and ``keys`` are added here.
    """
    directory = Path(directory)
    (directory / SHARDS).mkdir(parents=True, exist_ok=True)
    tensors, fields = shard_tensors(index, steps, final_latents)
    name = shard_name(index)
    path = directory / SHARDS / f"{name}.safetensors"
    def save(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o644)                           # safetensors creates 0600; shards are data to share

    write_replacing(path, save)
    entry = {**entry, "index": index, "shard": f"{SHARDS}/{name}.safetensors", **fields}
    write_json_atomic(directory / SHARDS / f"{name}.json", entry)
    return entry


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (kind and format filled in)."""
    write_json_atomic(Path(directory) / MANIFEST, {"kind": KIND, "format": FORMAT, **manifest})


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The capture manifest of ``directory``, or ``None`` when it holds none (or another kind of file)."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == KIND else None


def finished_prompts(directory: Path) -> dict[int, dict[str, Any]]:
    """Entries of the prompts whose shard and entry are both on disk (a rerun continues after them)."""
    out = {}
    for p in sorted((Path(directory) / SHARDS).glob("[0-9]*.json")):
        try:
            entry = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue                                   # not ours or torn: that prompt is redone
        if isinstance(entry, dict) and "shard" in entry and (Path(directory) / entry["shard"]).is_file():
            out[entry["index"]] = entry
    return out


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    prompt: int          # the prompt's index in the capture
    step: int            # denoising step, 0-based
    branch: str          # "cond" | "uncond" (classifier-free guidance halves) or "cond" alone
    timestep: float | None


class Trajectories:
    """A capture directory, read lazily and map-style: ``t[i]`` is record ``i``'s transformer keyword
    arguments (nested as the transformer received them), ``t.target(i)`` its recorded output."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise CaptureError(f"{self.dir} is not an fbqc capture (no {MANIFEST}; make one with fbqc capture)")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CaptureError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(self.manifest, dict) or self.manifest.get("kind") != KIND:
            raise CaptureError(f"{path} is not an fbqc capture manifest (kind {KIND!r} missing)")
        if self.manifest.get("format") != FORMAT:
            raise CaptureError(f"{path}: capture format {self.manifest.get('format')!r}, this fbqc reads {FORMAT}")
        self.prompts: list[dict[str, Any]] = self.manifest["prompts"]
        if not self.prompts:
            raise CaptureError(f"{self.dir}: the capture holds no finished prompt")
        self.static: dict[str, Any] = self.manifest.get("call", {}).get("static", {})
        self._records = [Record(p["index"], s, b, p["timesteps"][s])
                         for p in self.prompts for s in range(p["steps"]) for b in p["branches"]]
        self._by_index = {p["index"]: p for p in self.prompts}
        self._open: tuple[int, Any] | None = None

    # records
    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[Record]:
        return list(self._records)

    def record(self, i: int) -> Record:
        return self._records[i]

    @functools.cached_property
    def _position(self) -> dict[tuple[int, int, str], int]:
        return {(r.prompt, r.step, r.branch): i for i, r in enumerate(self._records)}

    def find(self, prompt: int, step: int, branch: str) -> int | None:
        """The index of the record of ``prompt``'s ``step`` and ``branch`` (None: not captured)."""
        return self._position.get((prompt, step, branch))

    def _shard(self, prompt: int):
        if self._open is None or self._open[0] != prompt:
            path = self.dir / self._by_index[prompt]["shard"]
            if not path.is_file():
                raise CaptureError(f"{self.dir}: shard {path.name} of prompt {prompt} is missing")
            self._open = (prompt, safe_open(str(path), framework="pt"))
        return self._open[1]

    def flat_inputs(self, i: int) -> dict[str, torch.Tensor]:
        """Record ``i``'s tensor arguments by dotted key (batch 1)."""
        r = self._records[i]
        entry, f = self._by_index[r.prompt], self._shard(r.prompt)
        return {k: f.get_tensor(f"{r.branch}/{k}" if k in entry["per_prompt"] else f"{r.branch}/{r.step:04d}/{k}")
                for k in entry["keys"]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return unflatten_kwargs({**self.static, **self.flat_inputs(i % len(self))})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def target(self, i: int) -> torch.Tensor:
        """Record ``i``'s recorded transformer output (the teacher's prediction)."""
        r = self._records[i]
        return self._shard(r.prompt).get_tensor(f"{r.branch}/{r.step:04d}/{OUTPUT}")

    def final_latents(self, prompt: int) -> torch.Tensor:
        return self._shard(prompt).get_tensor("final_latents")

    def image_path(self, prompt: int) -> Path:
        return self.dir / IMAGES / f"{shard_name(prompt)}.png"

    # selections
    def evenly(self, n: int) -> list[int]:
        """``n`` record indices spread evenly over denoising steps, prompts and branches (time-step-aware
        calibration). Pick ``k`` is in round ``r = k // S`` (``S`` steps); within a round the steps come in
        bit-reversed order (0, S/2, S/4, 3S/4, …), so any prefix — ``n < S`` included — spans the whole
        schedule; each step is used ``≈ n/S`` times. A step's ``r``-th use takes prompt
        ``(r·stride + s) mod P`` (a stride prime to ``P``: every prompt within ``P`` rounds, different
        prompts for different steps) and branch ``(r + r // P + s) mod B`` (cond and uncond alternate
        from the first round, and all ``P·B`` pairs of a step come before any repeats). Fewer than ``n``
        when the capture holds fewer records (the caller warns)."""
        steps = max(p["steps"] for p in self.prompts)
        width = max(steps - 1, 0).bit_length()
        order = [s for s in (int(f"{j:0{width}b}"[::-1], 2) if width else 0 for j in range(2 ** width))
                 if s < steps]
        P = len(self.prompts)
        stride = next(q for q in (7919, 7907, 7901, 1) if math.gcd(q, P) == 1)
        chosen: list[int] = []
        seen = set()
        k = 0
        limit = min(n, len(self._records))
        while len(chosen) < limit and k < 4 * len(self._records) + n:
            r, s = divmod(k, steps)
            s = order[s]
            p = self.prompts[(r * stride + s) % P]
            b = p["branches"][(r + r // P + s) % len(p["branches"])]
            i = self.find(p["index"], min(s, p["steps"] - 1), b)
            if i is not None and i not in seen:
                seen.add(i)
                chosen.append(i)
            k += 1
        if len(chosen) < limit:                          # fill from the rest in order
            chosen += [i for i in range(len(self._records)) if i not in seen][:limit - len(chosen)]
        return chosen
