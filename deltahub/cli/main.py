"""Entry point of the ``deltahub`` command. Command modules are imported on use only for their
parser; heavy libraries (torch, transformers, the server) are imported inside the commands."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from deltahub import __version__, constants
from deltahub.errors import DeltahubError

# Each module under deltahub.cli listed here defines register(subparsers) -> None.
COMMAND_MODULES = [
    "compress",
    "reconstruct",
    "inspect",
    "push",
    "pull",
    "serve",
    "ui",
    "hub",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltahub",
        description="Compress full fine-tunes into deltas over their base, share them on the Hub, "
        "serve many at once.",
    )
    parser.add_argument("--version", action="version", version=f"deltahub {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"deltahub.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DeltahubError as e:
        if constants.debug():
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # unexpected: still one line unless debugging
        if constants.debug():
            raise
        print(f"error: {type(e).__name__}: {e} (set DELTAHUB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
