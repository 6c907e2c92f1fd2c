"""Peak memory of ``deltahub compress`` on a ~300M-parameter synthetic Llama pair (CPU).

Builds a random base (realistic scales: linear weights N(0, 0.02), norms 1) and a "fine-tune" =
base + N(0, 1e-3) deltas, both bf16 safetensors in 2 shards each (index.json), then runs the
compressor under ``/usr/bin/time -v`` and compares its maximum resident set size with the sum of
the two models' file sizes (target: < 0.6x).

    python benchmarks/bench_compress_memory.py --workdir /tmp/bench-mem \
        [--method obs] [--calibration-samples 32] [--seq-len 256] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
              num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
              tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
                                          "lm_head.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], delta_std: float | None) -> None:
    """Base (delta_std None) or base + N(0, delta_std) fine-tune, in 2 bf16 shards."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from deltahub import toy

    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for s, part in enumerate(halves):
        tensors = {}
        for j, name in enumerate(part):
            g = torch.Generator().manual_seed(1000 + names.index(name))
            shape = shapes[name]
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            if delta_std is not None:
                g2 = torch.Generator().manual_seed(5000 + j + 100000 * s)
                w += torch.randn(shape, generator=g2) * delta_std
            tensors[name] = w.to(torch.bfloat16)
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = LlamaConfig(**CONFIG)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(str(folder))
    toy.make_tokenizer(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/deltahub-bench-mem")
    ap.add_argument("--method", default="obs")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--calibration-samples", default="32")
    ap.add_argument("--seq-len", default="256")
    ap.add_argument("--out", default=None, help="write the result JSON here too")
    args = ap.parse_args()
    work = Path(args.workdir)
    shapes = tensor_shapes(CONFIG)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    base, ft, delta = work / "base", work / "finetuned", work / "delta"
    if not (base / "config.json").exists():
        write_model(base, shapes, None)
    if not (ft / "config.json").exists():
        write_model(ft, shapes, 1e-3)
    shutil.rmtree(delta, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", str(Path(sys.executable).with_name("deltahub")), "compress",
           "--base", str(base), "--finetuned", str(ft), "--output", str(delta), "--method", args.method,
           "--bits", args.bits, "--calibration-samples", args.calibration_samples, "--seq-len", args.seq_len]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"compress failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", proc.stderr).group(1)
    models = folder_bytes(base) + folder_bytes(ft)
    result = {
        "what": "peak RSS of deltahub compress on a synthetic Llama pair (CPU)",
        "command": " ".join(cmd[2:]), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
        "parameters": n_params, "model_files_bytes_sum": models, "peak_rss_bytes": peak_kb * 1024,
        "peak_over_sum": round(peak_kb * 1024 / models, 3), "target_max": 0.6, "wall_clock": wall,
        "compress_output": proc.stdout.strip().splitlines()[-1],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
