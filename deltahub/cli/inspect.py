"""``deltahub inspect``: what a delta holds, per tensor group, and how small it is."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  deltahub inspect ./chat-delta
  deltahub inspect ./chat-delta --json
"""
# keys of a recorded group's settings shown in the table; the rest are codec options
LAYOUT_KEYS = ("codec", "bits", "sparsity", "group_size")


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a delta's codecs, sizes and base fingerprint",
                       description="Show per tensor group the codec, bits, sparsity, codec options (as "
                                   "recorded, e.g. obs's mask as resolved) and bytes before/after the "
                                   "lossless stage, the ratio vs the fine-tune in bf16, and the base.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("delta", metavar="DELTA", help="delta folder or Hub id")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def summary(folder) -> dict:
    """The facts ``inspect`` prints, as a dict (also used for --json)."""
    from deltahub.store import DeltaReader

    cfg = DeltaReader(folder).config
    groups = cfg.group_summary()
    recorded = cfg.compression.get("groups") or {}
    for name, g in groups.items():  # the codec options as recorded (e.g. obs's mask as resolved)
        options = {k: v for k, v in (recorded.get(name) or {}).items() if k not in LAYOUT_KEYS}
        if options:
            g["options"] = options
    payload = sum(g["stored_bytes"] for g in groups.values())
    packed = sum(g["raw_bytes"] for g in groups.values())
    bf16 = cfg.stats.get("finetuned_bf16_bytes")
    return {
        "path": str(folder), "format_version": cfg.format_version, "created_by": cfg.created_by,
        "base_model": vars(cfg.base_model), "finetuned_model": vars(cfg.finetuned_model),
        "architectures": cfg.architectures, "method": cfg.compression.get("method"),
        "lossless": cfg.compression.get("lossless"), "calibration": cfg.compression.get("calibration"),
        "tie_word_embeddings": cfg.tie_word_embeddings, "groups": groups, "payload_bytes": payload,
        "packed_bytes": packed, "finetuned_bf16_bytes": bf16,
        "ratio_vs_bf16": round(bf16 / payload, 3) if bf16 and payload else None,
    }


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def run(args: argparse.Namespace) -> int:
    from deltahub.sources import resolve_model

    info = summary(resolve_model(args.delta, kind="delta").path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    base, ft = info["base_model"], info["finetuned_model"]
    print(f"delta      {info['path']} (format v{info['format_version']}, {info['created_by']})")
    print(f"base       {base['id']}{'@' + base['revision'] if base['revision'] else ''}")
    print(f"           fingerprint {base['fingerprint'] or 'not recorded'}")
    print(f"fine-tune  {ft['id']}{'@' + ft['revision'] if ft['revision'] else ''}")
    print(f"method     {info['method']}, lossless {info['lossless']}"
          + (", tied embeddings" if info["tie_word_embeddings"] else ""))
    print()
    row = "{:<10} {:<7} {:>4} {:>8} {:>6} {:>7} {:>14} {:>14}"
    print(row.format("group", "codec", "bits", "sparsity", "group", "tensors", "before lossless", "stored"))
    for name, g in sorted(info["groups"].items()):
        print(row.format(name, g["codec"], g.get("bits", "-"), g.get("sparsity", "-"),
                         g.get("group_size") or ("row" if "bits" in g else "-"), g["tensors"],
                         _mb(g["raw_bytes"]), _mb(g["stored_bytes"])))
    for name, g in sorted(info["groups"].items()):
        if g.get("options"):
            opts = ", ".join(f"{k} {'-' if v is None else v}" for k, v in g["options"].items())
            print(f"{name + ' options':<18} {opts}")
    ratio = info["ratio_vs_bf16"]
    print(f"\ntotal      payload {_mb(info['payload_bytes'])} (packed {_mb(info['packed_bytes'])}); "
          f"fine-tune in bf16 {_mb(info['finetuned_bf16_bytes'])}; "
          f"ratio {'-' if ratio is None else f'{ratio:.2f}x'}")
    return 0
