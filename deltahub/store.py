"""Reading and writing a delta folder: ``delta_config.json`` + safetensors shard(s).

Each part of each PackedTensor is stored under the key ``"{tensor}.{part}"``. Parts that the
lossless stage shrinks are stored as uint8 zstd frames; the rest keep their dtype and shape, so
any safetensors reader can open the file. ``delta_config.json`` records, per key, where it is,
its encoding, frame table and CRC-32 of the raw bytes; reading checks all of it.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltahub import __version__, lossless
from deltahub.errors import DeltaFormatError
from deltahub.format import FORMAT_VERSION, PackedTensor, QuantLayout

CONFIG_NAME = "delta_config.json"
FORMAT_NAME = "deltahub-delta"
DEFAULT_SHARD_BYTES = 4 << 30

_DTYPES = {
    "int32": torch.int32, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int64": torch.int64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from_bytes(raw: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return buf.view(_DTYPES[dtype]).reshape(shape)


@dataclass
class ModelRef:
    """A model as a delta refers to it: Hub id or local path, revision, weights fingerprint."""

    id: str
    revision: str | None = None
    fingerprint: str | None = None


@dataclass
class DeltaConfig:
    """Contents of ``delta_config.json`` (see docs/FORMAT.md)."""

    base_model: ModelRef
    finetuned_model: ModelRef
    architectures: list[str]
    compression: dict[str, Any]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = f"deltahub {__version__}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = CONFIG_NAME) -> DeltaConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DeltaFormatError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise DeltaFormatError(f"{source}: not a deltahub delta config (no 'format': '{FORMAT_NAME}')")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise DeltaFormatError(
                f"{source}: delta format version {version!r} is not supported by deltahub {__version__} "
                f"(reads version {FORMAT_VERSION}); upgrade deltahub or re-compress"
            )
        try:
            d["base_model"] = ModelRef(**d["base_model"])
            d["finetuned_model"] = ModelRef(**d["finetuned_model"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise DeltaFormatError(f"{source}: malformed delta config ({e})") from None

    def group_summary(self) -> dict[str, dict[str, Any]]:
        """Per tensor group: codec settings, tensor count and stored bytes before/after lossless."""
        out: dict[str, dict[str, Any]] = {}
        for name, t in self.tensors.items():
            g = out.setdefault(t["group"], {"codec": t["codec"], "kind": t["kind"], **(t.get("layout") or {}),
                                            "tensors": 0, "raw_bytes": 0, "stored_bytes": 0})
            g["tensors"] += 1
            for part in t["parts"]:
                s = self.storage[f"{name}.{part}"]
                g["raw_bytes"] += s["raw_bytes"]
                g["stored_bytes"] += s["stored_bytes"]
        return out


class DeltaWriter:
    """Streams PackedTensors into shards; ``finish`` writes the config last (its presence marks a
    complete delta)."""

    def __init__(self, folder: str | os.PathLike, *, lossless_codec: str = "zstd",
                 level: int = lossless.DEFAULT_LEVEL, frame_bytes: int = lossless.DEFAULT_FRAME_BYTES,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if lossless_codec not in ("zstd", "none"):
            raise DeltaFormatError(f"lossless stage must be 'zstd' or 'none', got {lossless_codec!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lossless = lossless_codec
        self.level = level
        self.frame_bytes = frame_bytes
        self.max_shard_bytes = max_shard_bytes
        self.tensors: dict[str, dict[str, Any]] = {}
        self.storage: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[str] = []

    def add(self, name: str, packed: PackedTensor, *, group: str) -> None:
        if name in self.tensors:
            raise DeltaFormatError(f"tensor {name!r} added twice")
        entry: dict[str, Any] = {"kind": packed.kind, "shape": list(packed.shape), "codec": packed.codec,
                                 "group": group, "parts": sorted(packed.parts)}
        if packed.layout is not None:
            entry["layout"] = packed.layout.to_dict()
        if packed.info:
            entry["info"] = packed.info
        self.tensors[name] = entry
        for part, t in packed.parts.items():
            self._add_array(f"{name}.{part}", t)

    def _add_array(self, key: str, t: torch.Tensor) -> None:
        raw = tensor_bytes(t)
        rec: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "raw_bytes": len(raw),
                               "crc32": zlib.crc32(raw)}
        enc = (lossless.encode(raw, level=self.level, frame_bytes=self.frame_bytes)
               if self.lossless == "zstd" else lossless.Encoded(raw, "raw", (), self.frame_bytes))
        if enc.encoding == "raw":
            stored = t.detach().to("cpu").contiguous()
        else:
            stored = torch.frombuffer(bytearray(enc.data), dtype=torch.uint8)
            rec.update(frames=list(enc.frames), frame_bytes=enc.frame_bytes)
        rec.update(encoding=enc.encoding, stored_bytes=len(enc.data))
        self.storage[key] = rec
        self._pending[key] = stored
        self._pending_bytes += len(enc.data)
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        fname = f"delta-{len(self._shards) + 1:05d}.safetensors"
        tmp = self.folder / (fname + ".tmp")
        save_file(self._pending, str(tmp), metadata={"format": FORMAT_NAME})
        os.replace(tmp, self.folder / fname)
        for key in self._pending:
            self.storage[key]["file"] = fname
        self._shards.append(fname)
        self._pending = {}
        self._pending_bytes = 0

    def finish(self, config: DeltaConfig) -> DeltaConfig:
        """Flush the last shard and write ``delta_config.json``; returns the completed config."""
        self._flush()
        if len(self._shards) == 1:  # a single shard is simply delta.safetensors
            os.replace(self.folder / self._shards[0], self.folder / "delta.safetensors")
            for rec in self.storage.values():
                rec["file"] = "delta.safetensors"
        config.tensors = self.tensors
        config.storage = self.storage
        tmp = self.folder / (CONFIG_NAME + ".tmp")
        tmp.write_text(config.to_json())
        os.replace(tmp, self.folder / CONFIG_NAME)
        return config


def is_delta_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


class DeltaReader:
    """Validating reader of a delta folder. Every error is a DeltaFormatError naming the file."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise DeltaFormatError(f"{cfg_path}: missing; {self.folder} is not a deltahub delta")
        self.config = DeltaConfig.from_json(cfg_path.read_text(), source=str(cfg_path))
        self._handles: dict[str, Any] = {}
        for fname in sorted({s.get("file", "") for s in self.config.storage.values()}):
            if not fname or "/" in fname or "\\" in fname or fname.startswith("."):
                raise DeltaFormatError(f"{cfg_path}: invalid shard file name {fname!r}")
            if not (self.folder / fname).is_file():
                raise DeltaFormatError(f"{self.folder / fname}: missing (listed in {CONFIG_NAME})")

    def names(self) -> list[str]:
        return list(self.config.tensors)

    def _handle(self, fname: str) -> Any:
        if fname not in self._handles:
            path = self.folder / fname
            try:
                self._handles[fname] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise DeltaFormatError(
                    f"{path}: unreadable safetensors file ({e}); truncated or corrupted?"
                ) from None
        return self._handles[fname]

    def read_array(self, key: str) -> torch.Tensor:
        rec = self.config.storage.get(key)
        if rec is None:
            raise DeltaFormatError(f"{self.folder / CONFIG_NAME}: no stored array {key!r}")
        path = self.folder / rec["file"]
        try:
            stored = self._handle(rec["file"]).get_tensor(key)
        except DeltaFormatError:
            raise
        except Exception as e:
            raise DeltaFormatError(f"{path}: cannot read {key!r} ({e}); truncated or corrupted?") from None
        try:
            if rec["encoding"] == "raw":
                raw = tensor_bytes(stored)
                if stored.dtype != _DTYPES[rec["dtype"]] or list(stored.shape) != rec["shape"]:
                    raise ValueError(f"stored as {stored.dtype} {list(stored.shape)}, config says "
                                     f"{rec['dtype']} {rec['shape']}")
            else:
                raw = lossless.decode(tensor_bytes(stored), rec["encoding"], rec["frames"],
                                      rec["frame_bytes"], rec["raw_bytes"])
        except Exception as e:
            raise DeltaFormatError(f"{path}: {key!r} is corrupted ({e})") from None
        if zlib.crc32(raw) != rec["crc32"]:
            raise DeltaFormatError(f"{path}: checksum mismatch for {key!r}; the file is corrupted")
        return tensor_from_bytes(raw, rec["dtype"], rec["shape"])

    def read(self, name: str) -> PackedTensor:
        """The PackedTensor stored for parameter ``name`` (on the CPU)."""
        entry = self.config.tensors.get(name)
        if entry is None:
            raise DeltaFormatError(f"{self.folder / CONFIG_NAME}: no tensor {name!r}")
        parts = {p: self.read_array(f"{name}.{p}") for p in entry["parts"]}
        layout = QuantLayout.from_dict(entry["layout"]) if entry.get("layout") else None
        try:
            return PackedTensor(entry["kind"], tuple(entry["shape"]), parts, codec=entry.get("codec", ""),
                                layout=layout, info=entry.get("info", {}))
        except Exception as e:
            raise DeltaFormatError(
                f"{self.folder / CONFIG_NAME}: tensor {name!r} is inconsistent ({e})"
            ) from None

    def verify(self) -> None:
        """Read and check every stored array."""
        for key in self.config.storage:
            self.read_array(key)
