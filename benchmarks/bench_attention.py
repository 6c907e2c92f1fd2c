"""Decode attention over the paged KV cache on a CUDA GPU -> attention.json + attention.png.

Usage: python benchmarks/bench_attention.py [--out DIR]   (on the device; kernels/attention.py)

For D decode sequences of one context length each (blocks of 16 tokens, shuffled over the cache as
the block manager hands them out), times ``kernels.attention.paged_decode_attention`` (one Triton
launch; where (sequence, kv head) pairs are few, the context split over several programs per pair
and a second launch adding the parts; ``one_pass_us``: unsplit) and the float32 torch reference
the engine ran before it (``reference.paged_decode_attention``: gather the blocks, two einsums,
softmax; up to 64 Ki cached tokens), each as a CUDA graph of one call per cache over 4-16 caches
that L2 cannot hold together, median of 7 replays. Bytes = the K and V rows the sequences hold
(+ q and out); % of the copy bandwidth measured in the same run. Shapes: Llama-2-7B (32 heads of
128, no GQA) and a GQA layout (32 query heads over 8 kv heads of 128), bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from deltahub.kernels import reference
from deltahub.kernels.attention import auto_splits, paged_decode_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sbmm import ceilings, graph_time_us, run_header, save_result

SHAPES = {"llama-2-7b": (32, 32, 128), "gqa-8": (32, 8, 128)}  # name: (H, Hkv, Dh)
BATCHES = [1, 8, 32, 64]
CONTEXTS = [512, 2048, 8192]
BLOCK = 16
L2_BYTES = 60 << 20


def make_case(h, hkv, dh, d, n, gen):
    """Sets of (q, caches, block tables, lengths) for d sequences of n cached tokens, as many as
    make twice L2 (4 to 16)."""
    per = -(-n // BLOCK)
    cache_bytes = 2 * d * per * BLOCK * hkv * dh * 2
    sets = []
    for _ in range(min(16, max(4, -(-2 * L2_BYTES // cache_bytes)))):
        n_blocks = d * per
        kc = torch.randn(n_blocks, BLOCK, hkv, dh, device="cuda", generator=gen, dtype=torch.bfloat16)
        vc = torch.randn(n_blocks, BLOCK, hkv, dh, device="cuda", generator=gen, dtype=torch.bfloat16)
        tables = torch.randperm(n_blocks, device="cuda", generator=gen).view(d, per).to(torch.int32)
        q = torch.randn(d, h, dh, device="cuda", generator=gen, dtype=torch.bfloat16)
        sets.append((q, kc, vc, tables, torch.full((d,), n, device="cuda")))
    return sets


def run_case(name, h, hkv, dh, d, n, gen, copy_gbps) -> dict:
    """One row: the kernel's time, the reference's (up to 64 Ki cached tokens: it gathers the
    context in float32, 4x the cache), bytes and % of copy, and the kernel's error."""
    sets = make_case(h, hkv, dh, d, n, gen)
    scale = dh**-0.5
    q, kc, vc, bt, cl = sets[0]
    got = paged_decode_attention(q, kc, vc, bt, cl, scale)
    want = reference.paged_decode_attention(q, kc, vc, bt, cl, scale)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    t_kernel = graph_time_us([lambda s=s: paged_decode_attention(*s, scale) for s in sets])
    t_one = graph_time_us([lambda s=s: paged_decode_attention(*s, scale, splits=1) for s in sets])
    t_ref = None
    if d * n <= 32 * 2048:
        t_ref = graph_time_us([lambda s=s: reference.paged_decode_attention(*s, scale) for s in sets])
    nbytes = 2 * d * n * hkv * dh * 2 + 2 * q.numel() * 2
    return {
        "shape": name,
        "heads": [h, hkv, dh],
        "D": d,
        "context": n,
        "splits": auto_splits(d, hkv, dh, bt.shape[1] * BLOCK, None, q.device),
        "time_us": round(t_kernel, 2),
        "one_pass_us": round(t_one, 2),
        "reference_us": t_ref and round(t_ref, 1),
        "speedup_vs_reference": t_ref and round(t_ref / t_kernel, 1),
        "bytes": nbytes,
        "pct_copy_bw": round(100 * nbytes / t_kernel / 1e3 / copy_gbps, 1),
        "max_rel_err": round(err, 5),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    t0 = time.time()
    copy_gbps, _ = ceilings()
    print(f"copy {copy_gbps:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (h, hkv, dh) in SHAPES.items():
        for n in CONTEXTS:
            for d in BATCHES:
                if d * n <= 64 * 2048:  # up to 2 GiB of cache per set
                    rows.append(run_case(name, h, hkv, dh, d, n, gen, copy_gbps))
                    print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()
    result = {
        **run_header("bench_attention.py", argv),
        "copy_gbps": round(copy_gbps, 1),
        "block_size": BLOCK,
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
    }
    save_result(args.out, "attention", result, plot)
    return 0


def plot(rows, path) -> None:
    """% of copy bandwidth against the context, one line per (shape, D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(12, 4.5), sharey=True)
    for ax, name in zip(axes, SHAPES, strict=True):
        for d in BATCHES:
            pts = sorted((r["context"], r["pct_copy_bw"]) for r in rows if r["shape"] == name and r["D"] == d)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"D = {d}")
        ax.set(xscale="log", xlabel="context (tokens)", title=name, ylim=(0, 110))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("% of copy bandwidth (K and V bytes)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
