"""``deltahub push FT``: compress a fine-tune into a delta and publish it as a Hub repo."""

from __future__ import annotations

import argparse

from deltahub.cli.compress import add_compress_options, compress_config

EXAMPLES = """examples:
  deltahub push org/model-ft                      # base from the card's base_model -> org/model-ft-delta
  deltahub push org/model-ft@v2 --base org/model --repo-id me/model-ft-2bit --bits 2
  deltahub push ./my-finetune --base org/model --private --token hf_...
  HF_ENDPOINT=http://127.0.0.1:8900 HF_HUB_DISABLE_XET=1 deltahub push org/model-ft   # a private Hub

The delta repo id defaults to <FT>-delta (for a local folder: <your user>/<folder name>-delta).
Re-pushing an unchanged delta makes no new commit.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="compress a fine-tune and publish the delta on the Hub",
                       description=__doc__, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("finetuned", metavar="FT", help="fine-tune: Hub id (org/name[@revision]) or local folder")
    p.add_argument("--base", metavar="BASE", default=None,
                   help="base model (Hub id or folder); default: the fine-tune card's base_model")
    p.add_argument("--repo-id", default=None, metavar="ID",
                   help="delta repo to create/update (default: <FT>-delta)")
    p.add_argument("--private", action="store_true", help="create the delta repo as private")
    p.add_argument("--revision", default=None, metavar="R",
                   help="branch of the delta repo to push to (default main)")
    p.add_argument("--token", default=None, metavar="T",
                   help="Hub token (default: $HF_TOKEN or the stored login)")
    p.add_argument("--commit-message", default=None, metavar="M", help="commit message of the upload")
    p.add_argument("--evaluate", action="store_true",
                   help="evaluate the reconstructed model and put the quality table in the model card")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out text (.txt, .jsonl or .npy ids) for --evaluate (implies it)")
    add_compress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltahub.push import push

    if args.eval_data and not args.evaluate:
        args.evaluate = True
    out = push(args.finetuned, base=args.base, repo_id=args.repo_id, private=args.private,
               revision=args.revision, token=args.token, commit_message=args.commit_message,
               compress_config=compress_config(args), run_evaluation=args.evaluate, eval_data=args.eval_data)
    state = f"commit {out.commit[:12]}" if out.changed else f"unchanged, no new commit (at {out.commit[:12]})"
    print(f"{out.url} ({state})")
    return 0
