"""Embedded Hub-compatible server (file-backed) for air-gapped clusters and tests.

The unmodified huggingface_hub client (0.36 and 2.x) works against it with ``HF_ENDPOINT`` set to
its URL and ``HF_HUB_DISABLE_XET=1``. See docs/LOCALHUB.md for routes, tokens and storage layout.
"""

from .auth import Token, parse_token
from .server import LocalHub, serve
from .storage import Storage

__all__ = ["LocalHub", "Storage", "Token", "parse_token", "serve"]
