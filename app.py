"""The deltahub playground (Gradio), for a running deltahub server; talks to it over HTTP only.

    python app.py --server http://127.0.0.1:8000     # same as: deltahub ui --server URL

The code lives in deltahub/playground.py (so an installed package has it too): ``build_app(url,
api_key=None) -> gr.Blocks`` to mount with ``gr.mount_gradio_app``, ``launch(url, ...)`` to serve.
"""

from __future__ import annotations

import argparse
import sys

from deltahub.playground import build_app, launch

__all__ = ["build_app", "launch", "main"]


def main(argv: list[str] | None = None) -> int:
    """``deltahub ui``'s arguments and behaviour, without needing the rest of the CLI."""
    from deltahub.cli.ui import add_arguments, run
    from deltahub.errors import DeltahubError

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except DeltahubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
