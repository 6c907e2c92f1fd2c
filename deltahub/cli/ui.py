"""``deltahub ui --server URL``: the Gradio playground for a running deltahub (or any
OpenAI-compatible) server: pick a variant, chat, compare variants side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deltahub.errors import DeltahubError

EPILOG = """examples:
  deltahub ui --server http://127.0.0.1:8080
  deltahub ui --server http://gpu-box:8080 --api-key-file ~/.deltahub-key --host 0.0.0.0 --port 7860
  python app.py --server http://127.0.0.1:8080        # the same, from a checkout
"""

DEFAULT_SERVER = "http://127.0.0.1:8080"  # deltahub serve's default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER,
                   help=f"base URL of the deltahub server (default: {DEFAULT_SERVER})")
    p.add_argument("--api-key", default=None, help="Bearer token if the server was started with --api-key")
    p.add_argument("--api-key-file", type=Path, help="read the API key from this file (keeps it out of `ps`)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port of the playground (default: 7860)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="open the Gradio playground for a running server",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key and args.api_key_file:
        raise DeltahubError("give --api-key or --api-key-file, not both")
    if not args.api_key_file:
        return args.api_key or None
    try:
        key = args.api_key_file.expanduser().read_text().strip()
    except OSError as e:
        raise DeltahubError(f"--api-key-file {args.api_key_file}: {e.strerror}") from e
    if not key:
        raise DeltahubError(f"--api-key-file {args.api_key_file} is empty")
    return key


def run(args: argparse.Namespace) -> int:
    from deltahub.playground import launch

    api_key = _api_key(args)
    print(f"playground for {args.server} on http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
    launch(args.server, api_key, host=args.host, port=args.port, block=True)
    return 0
