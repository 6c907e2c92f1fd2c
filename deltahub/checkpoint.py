"""Read the tensors of a Hugging Face model folder one at a time from memory-mapped safetensors.

``Checkpoint(folder)`` parses the safetensors headers (a single ``model.safetensors`` or a sharded
``model.safetensors.index.json``) without loading any data. ``get(name)`` maps just that tensor's
byte range; the mapping is released when the returned tensor is freed, so streaming a model
layer by layer keeps the resident memory at about one layer. Pickle-only folders are refused.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from deltahub.errors import ModelSourceError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def weight_files(folder: str | os.PathLike) -> list[str]:
    """Names of the safetensors files holding a folder's weights, as transformers loads them:
    the files of ``model.safetensors.index.json``'s weight_map, else ``model.safetensors``, else
    every top-level ``*.safetensors``. Sorted. ModelSourceError when there are none."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelSourceError(f"{index}: malformed safetensors index ({e})") from None
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    found = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if found:
        return found
    if not folder.is_dir():
        raise ModelSourceError(f"{folder}: no such model folder")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelSourceError(
            f"{folder} has only pickle weights ({', '.join(pickles[:3])}); deltahub reads safetensors only "
            "(load it with transformers and save_pretrained(..., safe_serialization=True))")
    raise ModelSourceError(f"{folder}: no model weights (*.safetensors) found")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range [start, end)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header. ModelSourceError naming the file if it is malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelSourceError(f"{path}: not a readable safetensors file ({e})") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[rec["dtype"]]
            shape = tuple(int(s) for s in rec["shape"])
            b, e = (int(x) for x in rec["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelSourceError(f"{path}: bad header entry for {name!r} ({err})") from None
        nbytes = prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if e - b != nbytes or b < 0 or base + e > size:
            raise ModelSourceError(f"{path}: tensor {name!r} lies outside the file; truncated?")
        out[name] = TensorInfo(path, dtype, shape, base + b, base + e)
    return out


class Checkpoint:
    """The weights of a model folder, readable tensor by tensor. Shape: get(name) -> stored dtype."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.infos: dict[str, TensorInfo] = {}
        for fname in self.files:
            path = self.folder / fname
            if not path.is_file():
                raise ModelSourceError(f"{path}: missing (listed in {INDEX_NAME})")
            self.infos.update(read_header(path))
        index = self.folder / INDEX_NAME
        if index.is_file():
            for name, fname in json.loads(index.read_text())["weight_map"].items():
                info = self.infos.get(name)
                if info is None or info.file.name != fname:
                    raise ModelSourceError(f"{index}: {name!r} is not in {fname}")

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def file_bytes(self) -> int:
        """Total size of the weight files."""
        return sum((self.folder / f).stat().st_size for f in self.files)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise ModelSourceError(f"{self.folder}: no tensor {name!r}") from None

    def get(self, name: str, *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> torch.Tensor:
        """Tensor ``name``, memory-mapped (copy-on-write: writing to it never touches the file),
        converted to ``dtype``/``device`` if given (a copy whenever either differs)."""
        info = self._info(name)
        if info.numel == 0:
            t = torch.empty(info.shape, dtype=info.dtype)
        else:
            offset = info.start - info.start % mmap.ALLOCATIONGRANULARITY
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), info.end - offset, offset=offset, access=mmap.ACCESS_COPY)
            t = torch.frombuffer(mm, dtype=info.dtype, count=info.numel,
                                 offset=info.start - offset).reshape(info.shape)
        if dtype is not None or device is not None:
            t = t.to(dtype=dtype or t.dtype, device=device or "cpu")
        return t

    def config(self) -> dict:
        """The folder's config.json as a dict."""
        path = self.folder / "config.json"
        try:
            return json.loads(path.read_text())
        except OSError:
            raise ModelSourceError(f"{path}: missing; {self.folder} is not a transformers model "
                                   "folder") from None
        except ValueError as e:
            raise ModelSourceError(f"{path}: not valid JSON ({e})") from None
