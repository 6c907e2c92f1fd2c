"""The lossless stage: a byte string cut into independently decodable zstd frames.

Frames are standard zstd (with content checksums), so the CPU decodes them with ``zstandard``
and a GPU can decode all frames of a tensor in parallel with nvCOMP's Zstd codec.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

DEFAULT_FRAME_BYTES = 1 << 20
DEFAULT_LEVEL = 3
MIN_GAIN = 0.02  # skip the stage where it saves less than this fraction


@dataclass(frozen=True)
class Encoded:
    """Result of ``encode``: the stored bytes and how to read them back.

    ``frames`` holds the compressed size of each frame (empty when stored raw).
    """

    data: bytes
    encoding: str  # "zstd" | "raw"
    frames: tuple[int, ...]
    frame_bytes: int


def encode(raw: bytes, *, level: int = DEFAULT_LEVEL, frame_bytes: int = DEFAULT_FRAME_BYTES,
           min_gain: float = MIN_GAIN, threads: int = 2) -> Encoded:
    """Compress ``raw`` in frames of ``frame_bytes``; keep it raw if that saves < ``min_gain``."""
    if not raw:
        return Encoded(raw, "raw", (), frame_bytes)
    chunks = [raw[i : i + frame_bytes] for i in range(0, len(raw), frame_bytes)]

    def one(chunk: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=level, write_checksum=True,
                                        write_content_size=True).compress(chunk)

    if len(chunks) > 1 and threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            frames = list(pool.map(one, chunks))
    else:
        frames = [one(c) for c in chunks]
    total = sum(len(f) for f in frames)
    if total > len(raw) * (1 - min_gain):
        return Encoded(raw, "raw", (), frame_bytes)
    return Encoded(b"".join(frames), "zstd", tuple(len(f) for f in frames), frame_bytes)


def decode(data: bytes | memoryview, encoding: str, frames: tuple[int, ...] | list[int],
           frame_bytes: int, raw_bytes: int) -> bytes:
    """Inverse of ``encode``. Raises zstandard.ZstdError or ValueError on corrupt input."""
    if encoding == "raw":
        if len(data) != raw_bytes:
            raise ValueError(f"expected {raw_bytes} raw bytes, found {len(data)}")
        return bytes(data)
    if encoding != "zstd":
        raise ValueError(f"unknown encoding {encoding!r}")
    if sum(frames) != len(data):
        raise ValueError(f"frame table covers {sum(frames)} bytes, stored {len(data)}")
    dctx = zstandard.ZstdDecompressor()
    out = bytearray()
    pos = 0
    for size in frames:
        want = min(frame_bytes, raw_bytes - len(out))
        out += dctx.decompress(bytes(data[pos : pos + size]), max_output_size=want)
        pos += size
    if len(out) != raw_bytes:
        raise ValueError(f"decoded {len(out)} bytes, expected {raw_bytes}")
    return bytes(out)
