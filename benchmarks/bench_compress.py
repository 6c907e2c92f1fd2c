"""Compression speed of ``deltahub compress`` (obs, 2:4, 4-bit) on a synthetic pair.

    # GPU: a Llama-2-7B-shaped pair (random base, small Gaussian delta), 128 x 2048 calibration
    python benchmarks/bench_compress.py --shape llama-2-7b --device cuda --out $OUT
    # CPU: SmolLM2-135M-shaped pair, from the real base when data/base exists (prepare_data.py)
    python benchmarks/bench_compress.py --shape smollm2-135m --device cpu --samples 128 --seq-len 512

The pair is generated first in a child process (random bf16 weights, std 0.02; fine-tune = base +
N(0, delta_std²), written as sharded safetensors with a byte-level tokenizer), then compressed in
this process, so the peak host memory reported (ru_maxrss) is the compressor's alone.
``--layers N`` builds the shape with N decoder layers only; the JSON then also gives the
projection to the full depth (measured time + missing layers x mean time per layer).
``phases_seconds`` says where the time goes (exclusive times; the device is synchronised around
each timed call): ``embed`` (layer-0 inputs), ``load_layer``, ``hessian_pass`` (a layer forward
with the Hessian accumulation hooks), ``forward`` (the layer forward on the compressed weights:
``hessian_pass - forward`` estimates the accumulation), ``lm_head_hessian``, ``codec`` (compress
calls), ``dequant_out`` (Δ̂ for the next layers' weights), ``io_read`` (tensors from the
checkpoints to the device), ``lossless`` (zstd), ``write`` (the rest of the delta writer) and
``other`` (the remainder of the run).
Writes ``compress_speed_<shape>_<device>.json`` into --out and prints a summary. ``--merge-into
docs/benchmarks/quality.json`` (with the result JSON given by ``--result``, or this run's) fills
that file's ``compress_speed`` entry.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-family configs (no download needed)
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
REAL_BASE = Path(__file__).resolve().parent / "quality" / "data" / "base"


def make_pair(shape: str, layers: int | None, root: Path, delta_std: float, seed: int, device: str) -> dict:
    """Write root/base and root/finetuned; returns timing info."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from deltahub.toy import make_tokenizer

    t0 = time.time()
    kw = dict(
        SHAPES[shape],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, dtype="bfloat16")
    real = shape == "smollm2-135m" and layers is None and (REAL_BASE / "model.safetensors").is_file()
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        skeleton = LlamaForCausalLM(cfg)
    names = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(seed)
    real_state = None
    if real:
        from safetensors.torch import load_file

        real_state = load_file(str(REAL_BASE / "model.safetensors"))
    shard_limit = 2 << 30
    for which in ("base", "finetuned"):
        (root / which).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(str(root / which))
        make_tokenizer(root / which)
    index: dict[str, str] = {}
    shards: list[tuple[dict, dict]] = [({}, {})]
    size = 0
    for name, shp in names.items():
        if real_state is not None:
            w = real_state[name].to(device)
        elif len(shp) == 1:
            w = torch.ones(shp, dtype=torch.bfloat16, device=device)
        else:
            w = (torch.randn(shp, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        if len(shp) == 1:
            ft = w
        else:
            ft = (w.float() + torch.randn(shp, generator=gen, device=device) * delta_std).to(torch.bfloat16)
        nbytes = w.numel() * 2
        if size + nbytes > shard_limit and shards[-1][0]:
            shards.append(({}, {}))
            size = 0
        shards[-1][0][name] = w.cpu()
        shards[-1][1][name] = ft.cpu()
        size += nbytes
    n = len(shards)
    for i, (b, f) in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        for which, part in (("base", b), ("finetuned", f)):
            save_file(part, str(root / which / fname), metadata={"format": "pt"})
            index.update({k: fname for k in part})
        shards[i] = ({}, {})
    for which in ("base", "finetuned"):
        (root / which / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index})
        )
    params = sum(torch.Size(s).numel() for s in names.values())
    return {
        "params": params,
        "layers": cfg.num_hidden_layers,
        "real_base": real,
        "seconds": round(time.time() - t0, 1),
        "bytes_per_model": sum((root / "base" / f).stat().st_size for f in set(index.values())),
    }


class _OutOfTime(Exception):
    """--budget-s passed: the run stops after the current layer."""


class PhaseTimer:
    """Exclusive wall time per phase of wrapped functions (nested calls count for the innermost)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.stack: list[list[float]] = []  # [start, time spent in nested timed calls]
        self.undo: list[tuple[object, str, object]] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)
        timer = self

        def timed(*a, **kw):
            timer.stack.append([timer._now(), 0.0])
            try:
                return fn(*a, **kw)
            finally:
                start, nested = timer.stack.pop()
                took = timer._now() - start
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + took - nested
                if timer.stack:
                    timer.stack[-1][1] += took

        self.undo.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, fn in reversed(self.undo):
            setattr(owner, attr, fn)
        self.undo.clear()


def _timed_phases(timer: PhaseTimer) -> None:
    import deltahub.compress as dc
    from deltahub import lossless, store
    from deltahub.codecs import get_codec
    from deltahub.codecs.base import Codec
    from deltahub.layerwise import LayerwiseModel

    for attr, phase in (("embed", "embed"), ("load_layer", "load_layer"), ("layer_hessians", "hessian_pass"),
                        ("run_layer", "forward"), ("lm_head_hessian", "lm_head_hessian")):
        timer.wrap(LayerwiseModel, attr, phase)
    for name in ("obs", "rtn"):
        timer.wrap(get_codec(name), "compress", "codec")
    timer.wrap(Codec, "decompress", "dequant_out")
    timer.wrap(dc._Compressor, "_ft", "io_read")
    timer.wrap(dc._Compressor, "_base", "io_read")
    timer.wrap(lossless, "encode", "lossless")
    timer.wrap(store.DeltaWriter, "add", "write")
    timer.wrap(store.DeltaWriter, "finish", "write")


def run_compress(root: Path, args) -> dict:
    from deltahub.compress import CompressConfig, compress
    from deltahub.layerwise import LayerwiseModel

    stamps: list[float] = []
    original = LayerwiseModel.release_layer

    def release_layer(self, i):  # time stamp at the end of every decoder layer
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        print(f"layer {i} done at {stamps[-1] - t0:.1f} s", flush=True)
        if args.budget_s and stamps[-1] - t0 > args.budget_s and i + 1 < self.n_layers:
            raise _OutOfTime
        return original(self, i)

    LayerwiseModel.release_layer = release_layer
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = CompressConfig(
        method="obs",
        bits=4,
        sparsity="2:4",
        calibration_samples=args.samples,
        seq_len=args.seq_len,
        device=args.device,
        lossless="zstd",
    )
    timer = PhaseTimer(args.device.startswith("cuda"))
    _timed_phases(timer)
    t0 = time.perf_counter()
    dcfg = None
    try:
        dcfg = compress(root / "base", root / "finetuned", root / "delta", cfg, progress=False)
    except _OutOfTime:
        print(f"--budget-s {args.budget_s} reached after {len(stamps)} layers: stopped", flush=True)
    finally:
        total = time.perf_counter() - t0
        timer.restore()
        LayerwiseModel.release_layer = original
    per_layer = [b - a for a, b in itertools.pairwise(stamps)]
    phases = {k: round(v, 2) for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    phases["other"] = round(total - sum(timer.seconds.values()), 2)
    return {
        "seconds": round(total, 2),
        "layers_done": len(stamps),
        "stopped_early": dcfg is None,
        "calibration_precision": "tf32 matmuls (forward, Hessian) on cuda; codec float32"
        if args.device.startswith("cuda") else "float32",
        "layer_seconds": [round(x, 3) for x in per_layer],
        "mean_layer_seconds": round(sum(per_layer) / len(per_layer) if per_layer
                                    else (stamps[0] - t0 if stamps else 0.0), 3),
        "phases_seconds": phases,
        "hessian_accumulate_est_s": round(phases.get("hessian_pass", 0) - phases.get("forward", 0), 2),
        "first_layer_end_s": round(stamps[0] - t0, 2) if stamps else None,
        "after_last_layer_s": round(t0 + total - stamps[-1], 2) if stamps else None,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "payload_bytes": dcfg.stats["payload_bytes"] if dcfg else None,
        "ratio_vs_bf16": dcfg.stats["ratio_vs_bf16"] if dcfg else None,
    }


def merge_into(quality_json: Path, speed: dict) -> None:
    """Set ``compress_speed`` of the quality benchmark's results file from a speed result."""
    q = json.loads(quality_json.read_text())
    q["compress_speed"] = {
        "shape": speed["shape"],
        "device": speed["device"],
        "seconds": speed["projected_full_seconds"],
        "measured_seconds": speed["seconds"],
        "layers_measured": speed["layers_built"],
        "layers_full": speed["layers_full"],
        "mean_layer_seconds": speed["mean_layer_seconds"],
        "peak_gpu_bytes": speed["peak_gpu_bytes"],
        "peak_host_rss_bytes": speed["peak_host_rss_bytes"],
        "calibration": speed["calibration"],
        "method": f"{speed['method']} {speed['bits']}-bit {speed['sparsity']}",
        "note": "seconds = measured run + (layers_full - layers_measured) x mean_layer_seconds"
        if speed["layers_built"] < speed["layers_full"]
        else "measured end to end",
        "command": speed["command"],
        "date": speed["date"],
    }
    quality_json.write_text(json.dumps(q, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--delta-std", type=float, default=1e-3)
    ap.add_argument("--work", default="/tmp/deltahub-bench-compress")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--merge-into",
        default=None,
        metavar="QUALITY_JSON",
        help="fill compress_speed of this quality.json from the result",
    )
    ap.add_argument(
        "--result", default=None, metavar="JSON", help="with --merge-into: an earlier result, no run"
    )
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop after the layer that passes this many seconds of compression (the JSON "
                         "then projects the rest from the mean time per layer, lm_head/finish excluded)")
    ap.add_argument("--make-pair-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge_into and args.result:
        merge_into(Path(args.merge_into), json.loads(Path(args.result).read_text()))
        return
    root = Path(args.work)
    gen_device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.make_pair_only:
        info = make_pair(args.shape, args.layers, root, args.delta_std, 0, gen_device)
        (root / "pair.json").write_text(json.dumps(info))
        return
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    cmd = [
        sys.executable,
        __file__,
        "--make-pair-only",
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--work",
        str(root),
        "--delta-std",
        str(args.delta_std),
    ]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    subprocess.run(cmd, check=True)
    pair = json.loads((root / "pair.json").read_text())
    res = run_compress(root, args)
    full_layers = SHAPES[args.shape]["num_hidden_layers"]
    missing = full_layers - res["layers_done"]
    import transformers

    import deltahub

    out = {
        "shape": args.shape,
        "layers_built": pair["layers"],
        "layers_full": full_layers,
        "method": "obs",
        "bits": 4,
        "sparsity": "2:4",
        "calibration": [args.samples, args.seq_len],
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "pair": pair,
        **res,
        "projected_full_seconds": round(res["seconds"] + missing * res["mean_layer_seconds"], 1),
        "command": "python benchmarks/bench_compress.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deltahub": deltahub.__version__,
            "python": platform.python_version(),
        },
    }
    name = f"compress_speed_{args.shape}_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(out, indent=1) + "\n")
    if args.merge_into:
        merge_into(Path(args.merge_into), out)
    gib = 2**30
    print(
        f"{args.shape} ({pair['layers']}/{full_layers} layers) on {out['device']}: "
        f"compress {res['seconds']} s "
        f"(pair made in {pair['seconds']} s), {res['mean_layer_seconds']} s/layer, projected full depth "
        f"{out['projected_full_seconds']} s; peak GPU "
        f"{(res['peak_gpu_bytes'] or 0) / gib:.1f} GiB, "
        f"peak host {res['peak_host_rss_bytes'] / gib:.1f} GiB; "
        f"ratio {res['ratio_vs_bf16']}x"
    )
    print("phases (s): " + ", ".join(f"{k} {v}" for k, v in res["phases_seconds"].items()))


if __name__ == "__main__":
    main()
