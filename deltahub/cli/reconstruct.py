"""``deltahub reconstruct``: delta + base -> an ordinary transformers model folder."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  deltahub reconstruct ./chat-delta --output ./chat            # base as recorded in the delta
  deltahub reconstruct ./chat-delta --base ./llama-base --output ./chat
  deltahub reconstruct org/chat-delta --output ./chat --push me/chat-full   # and upload it
"""


def register(sub) -> None:
    p = sub.add_parser("reconstruct", help="rebuild the full fine-tune from a delta and its base",
                       description="Apply a delta to its base and write the fine-tune as a normal "
                                   "transformers model folder (safetensors, config, tokenizer).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("delta", metavar="DELTA", help="delta folder or Hub id")
    p.add_argument("--base", metavar="B", default=None,
                   help="base model folder or Hub id (default: the base recorded in the delta)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write the model to")
    p.add_argument("--push", metavar="REPO", default=None,
                   help="also upload the reconstructed model to this Hub model repo")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the stored login)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltahub.reconstruct import reconstruct

    out = reconstruct(args.delta, args.output, base=args.base, token=args.token)
    print(f"wrote {out}")
    if args.push:
        from deltahub.push import push_reconstructed

        print(push_reconstructed(out, args.delta, args.push, token=args.token).url)
    return 0
