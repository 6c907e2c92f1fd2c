"""``deltahub hub serve``: run the embedded Hub-compatible server in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from deltahub import constants
from deltahub.errors import DeltahubError

EXAMPLES = """examples:
  deltahub hub serve                                   # open server on 127.0.0.1:8900
  deltahub hub serve --root /data/hub --port 8900 \\
      --token alice:write:hf_alice --token ci:read:hf_ci
  # then, in the client's environment:
  export HF_ENDPOINT=http://127.0.0.1:8900 HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_alice

token specs: USER:ROLE:SECRET (ROLE = read | write), USER:SECRET (write), SECRET (user "local",
write). Without any token every request may read and write; with tokens, anonymous requests may
only read public repos. See docs/LOCALHUB.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    hub = subparsers.add_parser(
        "hub",
        help="run an embedded Hugging Face Hub-compatible server",
        description="An embedded, file-backed Hub that the huggingface_hub client works against "
        "(HF_ENDPOINT=<url>, HF_HUB_DISABLE_XET=1).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = hub.add_subparsers(dest="hub_command", metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a Hub from a folder",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--root", help="storage folder (default: <deltahub cache>/localhub)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8900, help="port (default: %(default)s; 0 = any)")
    serve.add_argument(
        "--token", action="append", default=[], metavar="SPEC", help="USER:ROLE:SECRET (repeatable)"
    )
    serve.add_argument("--token-file", help="file with one token spec per line ('#' comments)")
    serve.add_argument("--quiet", action="store_true", help="do not log each request")
    serve.set_defaults(func=run)
    hub.set_defaults(func=lambda args: hub.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    from deltahub.localhub.auth import Auth, read_token_file
    from deltahub.localhub.server import make_server

    tokens = list(args.token)
    if args.token_file:
        try:
            tokens += read_token_file(args.token_file)
        except OSError as e:
            raise DeltahubError(f"cannot read --token-file {args.token_file}: {e}") from None
    auth = Auth(tokens)  # validates the specs before binding
    root = args.root or str(constants.cache_dir() / "localhub")
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s")
    try:
        server = make_server(root, args.host, args.port, auth.tokens)
    except OSError as e:
        raise DeltahubError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = server.server_address[:2]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    mode = f"{len(auth.tokens)} token(s)" if auth.tokens else "open mode: no token needed, anyone may write"
    print(f"deltahub hub: serving {root} at {url} ({mode})", flush=True)
    print(f"  export HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1", flush=True)
    if auth.open and host not in ("127.0.0.1", "localhost", "::1"):
        print("  warning: open mode on a non-loopback interface; use --token", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
