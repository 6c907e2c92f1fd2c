"""``deltahub compress``: (base, fine-tune) -> a delta folder."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXAMPLES = """examples:
  deltahub compress --base ./llama-base --finetuned ./llama-chat --output ./chat-delta
  deltahub compress --base B --finetuned F --output D --bits 2 --sparsity 2:4 --device cuda
  deltahub compress --base B --finetuned F --output D --method rtn --bits 8 --sparsity none
  deltahub compress --base B --finetuned F --output D --codec-option mask=obs --device cuda
"""


def add_compress_options(parser: argparse.ArgumentParser) -> None:
    """The codec/calibration options, shared by ``compress`` and ``push``."""
    parser.add_argument("--method", default="obs",
                        help="codec: obs (default, calibrated), rtn, bitdelta (sign x scale, 1 bit), "
                             "dare (random 2:4 drop + rtn) or lowrank (SVD, 2 bits per weight)")
    parser.add_argument("--bits", type=int, default=4, help="bits per kept value: 2, 3, 4 or 8 (default 4)")
    parser.add_argument("--sparsity", default="2:4", help="2:4 (default) or none")
    parser.add_argument("--vocab-bits", type=int, default=None, metavar="B",
                        help="bits of the embedding and lm_head deltas (default: --bits)")
    parser.add_argument("--vocab-sparsity", default=None, metavar="S",
                        help="sparsity of the embedding and lm_head deltas (default: --sparsity); "
                             "'none' keeps them dense (in small models they are a large share)")
    parser.add_argument("--codec-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a codec-specific option, repeatable; values are JSON (numbers, true/false) "
                             "or plain text, e.g. obs: mask=auto|random|obs (the 2:4 mask; auto, the "
                             "default: random (DARE's, kept values doubled) at >= 3 bits, saliency at "
                             "<= 2 bits, the better one measured at each), damp=0.01, act_order=false, "
                             "rescale=true; dare: p=0.5, seed=0")
    parser.add_argument("--group-size", type=int, default=None, metavar="N",
                        help="inputs per scale (power of two >= 32); default one scale per output row")
    parser.add_argument("--calibration-samples", type=int, default=128, metavar="N",
                        help="calibration sequences for obs (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, metavar="N",
                        help="tokens per calibration sequence (default 512)")
    parser.add_argument("--calibration-data", metavar="FILE", default=None,
                        help="text or JSON Lines ('text' field) file; default: a built-in English text set")
    parser.add_argument("--distill-steps", type=int, default=0, metavar="N",
                        help="after compressing, tune the scales for N steps so that base + delta "
                             "matches the fine-tune's logits on the calibration text (default 0: off; "
                             "100 is typical)")
    parser.add_argument("--distill-per-row", action="store_true",
                        help="distill one factor per stored scale (row / group) instead of one per "
                             "matrix (the default, better in our measurements)")
    parser.add_argument("--lossless", default="zstd", help="lossless stage: zstd (default) or none")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def codec_options(pairs: list[str]) -> dict[str, Any]:
    """``["mask=random", "damp=0.1"]`` -> ``{"mask": "random", "damp": 0.1}`` (JSON values, else
    text); UsageError for an item without ``=`` or a key given twice."""
    from deltahub.errors import UsageError

    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--codec-option must be KEY=VALUE, got {item!r}")
        if key in out:
            raise UsageError(f"--codec-option {key} given twice")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def compress_config(args: argparse.Namespace):
    """CompressConfig from the options of ``add_compress_options``."""
    from deltahub.compress import CompressConfig

    return CompressConfig(method=args.method, bits=args.bits, sparsity=args.sparsity,
                          group_size=args.group_size, options=codec_options(args.codec_option),
                          calibration_samples=args.calibration_samples, seq_len=args.seq_len,
                          calibration_data=args.calibration_data, lossless=args.lossless, device=args.device,
                          distill_steps=args.distill_steps, distill_per_row=args.distill_per_row,
                          vocab_bits=args.vocab_bits, vocab_sparsity=args.vocab_sparsity)


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a full fine-tune into a delta over its base",
                       description="Compress a full fine-tune into a small delta over its base model "
                                   "(2:4 pruning + low-bit quantization + lossless stage).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="B", help="base model: local folder or Hub id")
    p.add_argument("--finetuned", required=True, metavar="F", help="fine-tuned model: local folder or Hub id")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write the delta to")
    add_compress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltahub.compress import compress

    dcfg = compress(args.base, args.finetuned, args.output, compress_config(args))
    st = dcfg.stats
    print(f"wrote {args.output}: {len(dcfg.tensors)} tensors, payload {st['payload_bytes'] / 1e6:.2f} MB, "
          f"{st['ratio_vs_bf16']:.2f}x smaller than the fine-tune in bf16 ({st['seconds']:.0f} s)")
    return 0
