"""``deltahub demo``: embedded Hub + tiny base + fine-tunes -> push -> reconstruct -> serve + playground,
fully offline. The first run trains the tiny models (about a minute on 2 cores); later runs reuse
them and the Hub storage (re-pushing then makes no new commits)."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  deltahub demo                          # everything, then serve until Ctrl-C
  deltahub demo --no-serve               # stop after push + reconstruct
  deltahub demo --fresh --serve-port 9000 --ui-port 9001
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole workflow offline on tiny models: push, reconstruct, serve",
                       description=__doc__, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="models, Hub storage and caches "
                        "(default: $DELTAHUB_CACHE/demo or $HF_HOME/deltahub/demo)")
    p.add_argument("--fresh", action="store_true", help="start from an empty workdir (retrains the models)")
    p.add_argument("--no-serve", dest="serve", action="store_false",
                   help="stop after push and reconstruct (no server, no playground)")
    p.add_argument("--hub-port", type=int, default=0,
                   help="port of the embedded Hub (default: any free port)")
    p.add_argument("--serve-port", type=int, default=8080, help="port of deltahub serve (default: 8080)")
    p.add_argument("--ui-port", type=int, default=7860, help="port of the playground (default: 7860)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from deltahub.demo import Demo, DemoOptions, demo_root

    root = Path(args.workdir).expanduser() if args.workdir else demo_root()
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    Demo(DemoOptions(root=root, hub_port=args.hub_port, serve=args.serve, serve_port=args.serve_port,
                     ui_port=args.ui_port)).run()
    return 0
