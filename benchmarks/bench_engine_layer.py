"""GPU benchmark: one Llama-2-7B decoder layer's projections as the engine runs them, with and
without a step's ``SlotShare`` (the grouping of tokens by slot and the permuted inputs made once
per step instead of once per projection; server/models/slot_share.py).

Usage: python benchmarks/bench_engine_layer.py [--out DIR] [--bits 4 2]

Seven ``DeltaLinear`` layers of 7B shapes (bf16) hold random packed 2:4 deltas (4- and 2-bit) in
S = 32 slots, repacked into the GPU slot layout as the engine does; the two RMSNorms hold a
weight delta per slot, as full fine-tunes have. The layer runs the model's data flow (q, k, v read
the input norm's output; o reads q, standing in for attention; the MLP, the engine's own module,
reads the second norm's output: gate, up, then down on act(g) * u), for B tokens zipf-spread over
N deltas. With a share the norms and act(g) * u write the permuted copy the projections read in
the same launch (kernels/norm_act.py), so only o's input is permuted on its own. For each case:
the whole layer as a CUDA graph (GPU time: the base GEMMs alone; every token base-only through
the delta layers with and without a share; per-projection plans; shared), the same eagerly
(wall time per layer, as the engine runs today: launch-bound; shared and per-call repetitions
alternate), the CUDA kernels per layer (torch profiler), and the floor: base weights plus the N
deltas' packed bytes at the copy bandwidth measured in the same run. The share knows the batch's
slots (``used``), as the runner's does. Writes engine_layer.json and engine_layer.png under --out
(default docs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from deltahub.kernels import act_mul, rms_norm
from deltahub.kernels._common import graph_time_ms
from deltahub.server.models.delta_linear import DeltaLinear, DeltaRMSNorm
from deltahub.server.models.llama import MLP
from deltahub.server.models.slot_share import SlotShare

from deltahub.format import PackedTensor, QuantLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sbmm import ceilings, random_stack, run_header, save_result, zipf_slots

PROJ = {  # name: (in, out), Llama-2-7B
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (4096, 11008),
    "up": (4096, 11008),
    "down": (11008, 4096),
}
SLOTS = 32
CASES = [(1, 1), (8, 4), (32, 16), (32, 32), (64, 32)]  # (B tokens, N deltas)


def build(bits: int, gen: torch.Generator) -> tuple[dict, int]:
    """The seven layers with a random delta in every slot, the two norms (a random weight delta per
    slot) and the MLP module over gate / up / down -> (layers, packed bytes of one slot's 7)."""
    lay = QuantLayout(bits, "2:4")
    layers, one_slot = {}, 0
    for name in ("in_norm", "post_norm"):
        norm = DeltaRMSNorm(4096, 1e-5, SLOTS, torch.bfloat16, torch.device("cuda"))
        norm.weight.data.fill_(1.0)
        for s in range(SLOTS):
            d = PackedTensor(
                "dense", (4096,), {"delta": 0.01 * torch.randn(4096, generator=gen, device="cuda")}
            )
            if s == 0:
                norm.prepare({"weight": d}, name)
            norm.write_slot(s, {"weight": d})
        layers[name] = norm
    for name, (k, n) in PROJ.items():
        lin = DeltaLinear(k, n, False, SLOTS, torch.bfloat16, torch.device("cuda"))
        lin.weight.data.normal_(0, 0.02, generator=gen)
        st = random_stack(SLOTS, n, k, lay, gen)
        for s in range(SLOTS):
            p = PackedTensor("qlinear", (n, k), {nm: v[s] for nm, v in st.items()}, layout=lay)
            if s == 0:
                lin.prepare({"weight": p}, name)
            lin.write_slot(s, {"weight": p})
        pool = next(iter(lin.pools()["weight"].q.values()))
        one_slot += pool["dw"][0].numel() * 2 + pool["scales"][0].numel() * 4
        layers[name] = lin
        del st
    cfg = SimpleNamespace(hidden_size=4096, intermediate_size=11008, mlp_bias=False, hidden_act="silu")
    mlp = MLP(cfg, SLOTS, torch.bfloat16, torch.device("meta"))  # its own weights never allocated
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = layers["gate"], layers["up"], layers["down"]
    layers["mlp"] = mlp
    torch.cuda.synchronize()
    return layers, one_slot


def layer_fn(layers: dict, x: torch.Tensor, slot_idx: torch.Tensor, used):
    """One decoder layer without attention, in the model's order. ``used``: the slots the batch
    uses (a new SlotShare per call, i.e. per step, as the runner makes it), or None: no share."""

    def run() -> torch.Tensor:
        share = None if used is None else SlotShare(used=used)
        xn = layers["in_norm"](x, slot_idx, share)
        q = layers["q"](xn, slot_idx, share)
        layers["k"](xn, slot_idx, share)
        layers["v"](xn, slot_idx, share)
        h = x + layers["o"](q, slot_idx, share)
        return h + layers["mlp"](layers["post_norm"](h, slot_idx, share), slot_idx, share)

    return run


def gemm_fn(layers: dict, x: torch.Tensor):
    """The same data flow through the base weights alone (no delta machinery; the norms' and
    act(g) * u's kernels without deltas or permuted copies)."""

    def run() -> torch.Tensor:
        w = {name: layers[name].weight for name in PROJ}
        xn, _ = rms_norm(x, layers["in_norm"].weight, 1e-5)
        q = F.linear(xn, w["q"])
        F.linear(xn, w["k"])
        F.linear(xn, w["v"])
        h = x + F.linear(q, w["o"])
        hn, _ = rms_norm(h, layers["post_norm"].weight, 1e-5)
        a, _ = act_mul(F.linear(hn, w["gate"]), F.linear(hn, w["up"]), "silu")
        return h + F.linear(a, w["down"])

    return run


def eager_ms(fns, reps: int = 50) -> list[float]:
    """Median wall time (ms) of each fn() followed by a device sync, the fns taking turns."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(reps + 2):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if r >= 2:
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def kernels_per_call(fn) -> int:
    """CUDA kernels one call launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_cases(layers, bits, one_slot, base_bytes, copy_gbps) -> list[dict]:
    """The rows of one layout (``bits``) over CASES."""
    rows = []
    for b, nd in CASES:
        x = torch.randn(b, 4096, device="cuda", dtype=torch.bfloat16) * 0.5
        host = zipf_slots(b, nd)
        slot_idx, used = host.long().cuda(), frozenset(host.tolist())
        base_idx = torch.full_like(slot_idx, SLOTS)
        per_call, shared = layer_fn(layers, x, slot_idx, None), layer_fn(layers, x, slot_idx, used)
        a, want = shared().float(), per_call().float()  # split-K pieces add in any order
        diff = ((a - want).abs().max() / want.abs().max()).item()
        if not diff < 3e-2:
            raise AssertionError(f"shared and per-call layers differ: max rel diff {diff:.3g}")
        row = {
            "B": b,
            "N": nd,
            "bits": bits,
            "max_rel_diff_shared_vs_per_call": round(diff, 5),
            "floor_us": round((base_bytes + nd * one_slot) / copy_gbps / 1e3, 1),
            "graph_gemm_only_us": round(graph_time_ms(gemm_fn(layers, x)) * 1e3, 1),
            "graph_base_only_per_call_us": round(graph_time_ms(layer_fn(layers, x, base_idx, None)) * 1e3, 1),
            "graph_base_only_us": round(graph_time_ms(layer_fn(layers, x, base_idx, frozenset())) * 1e3, 1),
            "graph_per_call_us": round(graph_time_ms(per_call) * 1e3, 1),
            "graph_shared_us": round(graph_time_ms(shared) * 1e3, 1),
        }
        eager = eager_ms([per_call, shared])
        row["eager_per_call_us"], row["eager_shared_us"] = (round(t * 1e3, 1) for t in eager)
        row["kernels_per_call"] = kernels_per_call(per_call)
        row["kernels_shared"] = kernels_per_call(shared)
        row["graph_pct_of_floor"] = round(100 * row["floor_us"] / row["graph_shared_us"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=[2, 4])
    args = ap.parse_args(argv)
    t_start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbps, bf16_tflops = ceilings()
    print(f"ceilings: copy {copy_gbps:.0f} GB/s, bf16 GEMM {bf16_tflops:.0f} TFLOP/s", flush=True)
    base_bytes = sum(k * n * 2 for k, n in PROJ.values())
    rows, packed = [], {}
    for bits in args.bits:
        layers, packed[bits] = build(bits, gen)
        with torch.inference_mode():
            rows += run_cases(layers, bits, packed[bits], base_bytes, copy_gbps)
        del layers
        torch.cuda.empty_cache()
    result = {
        **run_header("bench_engine_layer.py", argv),
        "copy_gbps": round(copy_gbps, 1),
        "bf16_tflops": round(bf16_tflops, 1),
        "slots": SLOTS,
        "layer": "Llama-2-7B projections (q, k, v, o, gate, up, down), bf16, 2:4 deltas",
        "packed_bytes_per_delta": packed,
        "base_bytes": base_bytes,
        "rows": rows,
        "wall_s": round(time.time() - t_start, 1),
    }
    save_result(args.out, "engine_layer", result, plot)
    return 0


def plot(rows, path) -> None:
    """Bars per case (log time), one panel per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("floor_us", "floor (bytes at copy speed)"),
        ("graph_gemm_only_us", "base GEMMs alone (graph)"),
        ("graph_base_only_per_call_us", "all tokens base-only, no share (graph)"),
        ("graph_shared_us", "shared plan + x (graph)"),
        ("graph_per_call_us", "per-projection plan + x (graph)"),
        ("eager_shared_us", "shared (eager)"),
        ("eager_per_call_us", "per-projection (eager)"),
    ]
    layouts = sorted({r["bits"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(layouts), figsize=(7 * len(layouts), 4.5), squeeze=False)
    w = 0.8 / len(keys)
    for ax, bits in zip(axes[0], layouts, strict=True):
        sub = [r for r in rows if r["bits"] == bits]
        for i, (key, label) in enumerate(keys):
            ax.bar([j + i * w for j in range(len(sub))], [r[key] for r in sub], w, label=label)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(sub))], [f"B={r['B']}\nN={r['N']}" for r in sub])
        ax.set_ylabel("µs per decoder layer")
        ax.set_yscale("log")
        ax.set_title(f"One 7B layer's projections, {bits}-bit 2:4 deltas")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
