"""``weights.bin``: every constant the C program reads, in one file with a documented layout.

Layout (little endian)::

    offset 0   char[8]   magic "FBQCWTS1"
           8   uint32    format version (1)
           12  uint32    number of tensors
           16  uint64    bytes after the header
           24  char[16]  model id: the first 16 hex digits of the SHA-256 of those bytes; model.c
                         carries the same id, so a program refuses another model's weights
           40  zeros up to 64
    then the tensors, each at an offset that is a multiple of 64 (``weights.json`` and the table in
    ``model.c`` list name, type, shape, offset and size).

Types: ``int4`` (quantized weights whose levels fit 4 bits) are packed two per byte, element 2i in
the low nibble of byte i and 2i+1 in the high nibble, two's complement (ONNX INT4 order); other
integers as int8/int16/int32/int64, float tensors as float32 (float64 where the graph computes in
float64), all little endian. So a W4 layer's file size shows ~4 bits per parameter.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbqc.errors import UserError

MAGIC = b"FBQCWTS1"
VERSION = 1
HEADER = 64
ALIGN = 64
LABELS = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64", torch.int32: "int32",
          torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}
ENUMS = {"float32": "FBQC_F32", "float64": "FBQC_F64", "int64": "FBQC_I64", "int32": "FBQC_I32",
         "int16": "FBQC_I16", "int8": "FBQC_I8", "uint8": "FBQC_U8", "bool": "FBQC_BOOL", "int4": "FBQC_INT4"}


@dataclass
class Entry:
    name: str
    tensor: torch.Tensor
    dtype: str                  # label in weights.json
    layer: str | None = None    # the quantized layer whose integer weight this is, if any
    offset: int = 0

    @property
    def payload(self) -> bytes:
        t = self.tensor.detach().contiguous()
        if self.dtype == "int4":
            v = t.reshape(-1).to(torch.int16).numpy()
            if v.size and (v.min() < -8 or v.max() > 7):
                raise UserError(f"--emit-c: weight {self.name} does not fit int4 ({v.min()}…{v.max()})")
            if v.size % 2:
                v = np.concatenate([v, np.zeros(1, dtype=v.dtype)])
            nib = (v & 0xF).astype(np.uint8)
            return (nib[0::2] | (nib[1::2] << 4)).tobytes()
        arr = t.numpy() if t.dtype != torch.bool else t.to(torch.uint8).numpy()
        return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()

    @property
    def numel(self) -> int:
        return self.tensor.numel()


class WeightTable:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._by_name: dict[str, int] = {}
        self.model_id = ""

    def index(self, name: str, tensor: torch.Tensor, *, int4: bool = False, layer: str | None = None) -> int:
        """Index of constant ``name`` (added on first use)."""
        if name in self._by_name:
            i = self._by_name[name]
            if int4 != (self.entries[i].dtype == "int4"):
                raise UserError(f"--emit-c: weight {name} is read both packed (int4) and unpacked")
            return i
        if tensor.dtype not in LABELS:
            raise UserError(f"--emit-c: weight {name} has type {tensor.dtype}, which the C program "
                            f"does not support")
        self.entries.append(Entry(name, tensor, "int4" if int4 else LABELS[tensor.dtype], layer))
        self._by_name[name] = len(self.entries) - 1
        return len(self.entries) - 1

    def entry(self, i: int) -> Entry:
        return self.entries[i]

    def layout(self) -> bytes:
        """Assign offsets and return the data region (everything after the header)."""
        data = bytearray()
        for e in self.entries:
            pad = (-(HEADER + len(data))) % ALIGN
            data += b"\0" * pad
            e.offset = HEADER + len(data)
            data += e.payload
        self.model_id = hashlib.sha256(bytes(data)).hexdigest()[:16]
        return bytes(data)

    def write(self, path: Path) -> dict[str, Any]:
        data = self.layout()
        header = MAGIC + struct.pack("<IIQ", VERSION, len(self.entries), len(data)) + self.model_id.encode()
        header += b"\0" * (HEADER - len(header))
        with open(path, "wb") as f:
            f.write(header)
            f.write(data)
        return self.describe(HEADER + len(data))

    def nbytes(self, e: Entry) -> int:
        return (e.numel + 1) // 2 if e.dtype == "int4" else e.tensor.numel() * e.tensor.element_size()

    def describe(self, file_bytes: int) -> dict[str, Any]:
        q = [e for e in self.entries if e.layer is not None]
        q_params = sum(e.numel for e in q)
        q_bytes = sum(self.nbytes(e) for e in q)
        return {
            "format": f"fbqc-weights-{VERSION}", "file_bytes": file_bytes, "header_bytes": HEADER,
            "alignment": ALIGN, "byte_order": "little", "model_id": self.model_id,
            "int4_packing": "two per byte: element 2i in the low nibble of byte i, 2i+1 in the high "
                            "nibble, two's complement",
            "quantized_weight_params": q_params, "quantized_weight_bytes": q_bytes,
            "bits_per_quantized_weight": 8 * q_bytes / max(q_params, 1),
            "tensors": [{"index": i, "name": e.name, "dtype": e.dtype, "shape": list(e.tensor.shape),
                         "offset": e.offset, "nbytes": self.nbytes(e), **({"layer": e.layer} if e.layer else {})}
                        for i, e in enumerate(self.entries)],
        }

    def c_table(self) -> list[str]:
        """Rows of the ``fbqc_weight_info`` table in model.c (call after :meth:`layout`)."""
        return [f'    {{"{e.name}", {ENUMS[e.dtype]}, {e.offset}, {self.nbytes(e)}, {e.numel}}},'
                for e in self.entries]
