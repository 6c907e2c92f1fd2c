"""Compression methods for weight deltas: a plain registry, ``name -> Codec subclass``.

    codec = get_codec("obs")(CodecSettings(bits=4, sparsity="2:4"))
    packed = codec.compress(delta, hessian)

See ``deltahub.codecs.base`` for the interface. A new method adds one line to ``CODECS``.
"""

from __future__ import annotations

from deltahub.codecs.base import Codec, CodecSettings
from deltahub.codecs.bitdelta import BitDeltaCodec
from deltahub.codecs.dare import DareCodec
from deltahub.codecs.lowrank import LowRankCodec
from deltahub.codecs.obs import ObsCodec
from deltahub.codecs.rtn import RtnCodec
from deltahub.errors import CodecError

CODECS: dict[str, type[Codec]] = {
    "obs": ObsCodec,
    "rtn": RtnCodec,
    "bitdelta": BitDeltaCodec,
    "dare": DareCodec,
    "lowrank": LowRankCodec,
}

DEFAULT_CODEC = "obs"


def get_codec(name: str) -> type[Codec]:
    """The codec class registered as ``name``; CodecError listing the known names otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown compression method {name!r}; known: {', '.join(sorted(CODECS))}") from None


__all__ = ["CODECS", "DEFAULT_CODEC", "Codec", "CodecError", "CodecSettings", "get_codec"]
