"""``deltahub pull DELTA``: download a delta repo into the Hub cache and print its folder."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  deltahub pull org/model-ft-delta
  deltahub pull org/model-ft-delta@v2 --verify
  HF_HUB_OFFLINE=1 deltahub pull org/model-ft-delta     # the cached copy, no network
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a delta repo to the cache and print its path",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("delta", metavar="DELTA", help="Hub repo id of a delta (org/name[@revision])")
    p.add_argument("--revision", help="branch, tag or commit (default: main, or the @revision in DELTA)")
    p.add_argument("--token", help="Hub token (default: $HF_TOKEN or the stored login)")
    p.add_argument("--verify", action="store_true", help="also read every tensor and check its checksum")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltahub import constants, hub, modelcard
    from deltahub.errors import BaseMismatchError
    from deltahub.sources import resolve_model
    from deltahub.store import DeltaReader

    resolved = resolve_model(args.delta, revision=args.revision, token=args.token, kind="delta")
    reader = DeltaReader(resolved.path)
    if args.verify:
        reader.verify()
    base = reader.config.base_model
    at = f"{base.id}@{base.revision}" if base.revision else base.id
    source = reader.config.finetuned_model.id
    print(f"{resolved.id}@{resolved.revision or 'local'}: delta of {source} over {at}", file=sys.stderr)
    if base.fingerprint and base.revision and modelcard.is_hub_id(base.id) and not constants.hf_offline():
        remote = hub.remote_fingerprint(base.id, revision=base.revision, token=args.token)
        if remote is not None and remote != base.fingerprint:
            raise BaseMismatchError(f"{resolved.id} records base fingerprint {base.fingerprint}, but {at} "
                                    f"on the Hub has {remote}: the delta does not belong to that base")
        if remote is not None:
            print(f"base {at}: weights match the delta's fingerprint (checked on the Hub, "
                  f"nothing downloaded)", file=sys.stderr)
    print(resolved.path)
    return 0
