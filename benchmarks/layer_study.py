"""Layer-level study of the obs codec on real SmolLM2-135M inputs (CPU, a few minutes).

The figures the quality notes quote about single layers come from here: held-out relative
layer-output error ||X (Δ - Δ̂)ᵀ|| / ||X Δᵀ|| of

* obs (with its saliency mask, ``mask="obs"``, pinned here since the default became "auto") with
  and without group act-order (``act_order`` option),
* the 2:4 choice by OBS saliency (w² / U_jj², what obs's saliency mask does) vs the joint OBS
  cost of pruning each pair (2 x 2 blocks of the inverse Hessian) — an experimental variant that
  is not shipped,
* obs vs dare vs rtn on gradient-like ("aligned") deltas, and obs with DARE's random mask,
* at one bit per weight (dense): obs (error feedback) vs rtn vs bitdelta, with the share of stored
  signs that differ from sign(Δ),

and the entropy of the 2:4 patterns obs chooses, conditioned on the input column group, against
what zstd stores for ``meta``. Inputs: the base model and training tokens that
``benchmarks/quality/prepare_data.py`` lays out under benchmarks/quality/data/.

    python benchmarks/layer_study.py --out docs/benchmarks/layer_study.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from deltahub import format as fmt
from deltahub.codecs import CodecSettings, get_codec
from deltahub.codecs.base import fake_quant, keep_two_of_four, search_scales
from deltahub.codecs.obs import inverse_cholesky

DATA = Path(__file__).resolve().parent / "quality" / "data"
LAYERS = ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj",
          "model.layers.20.mlp.gate_proj", "model.layers.20.self_attn.o_proj")
KEPT_PAIRS = list(itertools.combinations(range(4), 2))


def layer_inputs(base: Path, tokens: Path, seqs: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Inputs [seqs * seq_len, K] of every layer in LAYERS on the first tokens of ``tokens``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(tokens)[: seqs * seq_len].astype("int64")).view(seqs, seq_len)
    acts: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str):
        return lambda _m, args: acts.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    for name in LAYERS:
        model.get_submodule(name).register_forward_pre_hook(recorder(name))
    with torch.no_grad():
        model.model(ids)
    return {n: torch.cat(a) for n, a in acts.items()}


def pair_choice_obs(w: torch.Tensor, u: torch.Tensor, bits: int, joint: bool) -> torch.Tensor:
    """The obs column loop (one scale per row, no lazy blocks) with the 2:4 pair chosen by
    saliency (joint=False) or by the joint OBS cost w_Pᵀ [H_F⁻¹]_PP⁻¹ w_P of the pruned pair P."""
    n, k = w.shape
    w = w.clone()
    diag = torch.diag(u)
    scale = search_scales(w, keep_two_of_four(w.square() / diag.square()), bits,
                          torch.zeros(k, dtype=torch.int64), 1)[:, 0]
    out = torch.zeros(n, k)
    for i in range(0, k, 4):
        if joint:
            block = u[i:i + 4, i:i + 4]
            hinv = block.T @ block  # [H_F⁻¹] of the group's 4 columns, F = columns >= i
            costs = []
            for kept in KEPT_PAIRS:
                pruned = [j for j in range(4) if j not in kept]
                wp = w[:, [i + j for j in pruned]]
                costs.append(((wp @ torch.linalg.inv(hinv[pruned][:, pruned])) * wp).sum(1))
            best = torch.stack(costs, 1).argmin(1)
            keep = torch.zeros(n, 4, dtype=torch.bool)
            for p, (j0, j1) in enumerate(KEPT_PAIRS):
                keep[best == p, j0] = True
                keep[best == p, j1] = True
        else:
            keep = keep_two_of_four(w[:, i:i + 4].square() / diag[i:i + 4].square())
        for j in range(4):
            c = i + j
            _, q = fake_quant(w[:, c], scale, bits)
            q = q * keep[:, j]
            out[:, c] = q
            w[:, c:] -= ((w[:, c] - q) / u[c, c])[:, None] * u[c, c:][None, :]
    return out


def rel_error(delta: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((approx - delta) @ x.T).norm() / (delta @ x.T).norm())


def pattern_bits(meta: torch.Tensor, n: int, k: int) -> dict[str, float]:
    """Bits per dense weight of the 2:4 positions: entropy given the column group, and zstd -3."""
    pos = fmt.unpack_bits(meta, 2).view(n, -1, 2).long()
    pattern = pos[..., 0] * 4 + pos[..., 1]  # [n, groups]
    h = 0.0
    for g in range(pattern.shape[1]):
        p = torch.bincount(pattern[:, g], minlength=16).float()
        p = p[p > 0] / p.sum()
        h -= float((p * p.log2()).sum())
    stored = len(zstandard.ZstdCompressor(level=3).compress(meta.numpy().tobytes()))
    return {"conditional_entropy": h / pattern.shape[1] / 4, "zstd": 8 * stored / (n * k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="layer_study.json")
    ap.add_argument("--rows", type=int, default=128, help="output rows of each synthetic delta")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    acts = layer_inputs(DATA / "base", DATA / "carry1" / "tokens" / "python-docs_train.npy", 32, 512)
    rows = []
    for name, x in acts.items():
        x_cal, x_test = x[:8192], x[8192:]  # Hessian from 16 sequences, error on the other 16
        h = 2 * x_cal.T @ x_cal / x_cal.shape[0]
        k = h.shape[0]
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        laplace = torch.distributions.Laplace(0.0, 1.0).sample((a.rows, k)) * 1e-3
        mix = torch.randn(a.rows, 512, generator=g)
        aligned = mix @ x_cal[torch.randint(0, x_cal.shape[0], (512,), generator=g)]
        aligned = aligned / aligned.std() * 1e-3  # rows are combinations of inputs, like gradients
        u, _ = inverse_cholesky(h.clone(), k, 0.01)
        for bits in (4, 2):
            s = CodecSettings(bits, "2:4", None)
            sal = CodecSettings(bits, "2:4", None, {"mask": "obs"})  # the saliency mask, not auto's
            obs = get_codec("obs")(sal)
            plain = get_codec("obs")(CodecSettings(bits, "2:4", None, {"act_order": False, "mask": "obs"}))
            packed = obs.compress(laplace, h)
            row = {
                "layer": name, "bits": bits,
                "act_order": rel_error(laplace, obs.decompress(packed), x_test),
                "natural_order": rel_error(laplace, plain.decompress(plain.compress(laplace, h)), x_test),
                "pair_by_saliency": rel_error(laplace, pair_choice_obs(laplace, u, bits, False), x_test),
                "pair_by_joint_obs": rel_error(laplace, pair_choice_obs(laplace, u, bits, True), x_test),
                "patterns_bits_per_weight": pattern_bits(packed.parts["meta"], a.rows, k),
            }
            for codec in ("obs", "dare", "rtn"):
                c = get_codec(codec)(sal if codec == "obs" else s)
                approx = c.decompress(c.compress(aligned, h if codec == "obs" else None))
                row[f"aligned_{codec}"] = rel_error(aligned, approx, x_test)
            rnd = get_codec("obs")(CodecSettings(bits, "2:4", None, {"mask": "random"}))
            approx = rnd.decompress(rnd.compress(aligned, h))
            row["aligned_obs_random_mask"] = rel_error(aligned, approx, x_test)
            print(json.dumps(row), flush=True)
            rows.append(row)
        one = {"layer": name, "bits": 1, "sparsity": "none"}
        for codec in ("obs", "rtn", "bitdelta"):
            c = get_codec(codec)(CodecSettings(1, "none", None))
            approx = c.decompress(c.compress(aligned, h if codec == "obs" else None))
            one[f"aligned_{codec}"] = rel_error(aligned, approx, x_test)
            one[f"sign_flips_{codec}"] = float((approx.sign() != aligned.sign()).float().mean())
        print(json.dumps(one), flush=True)
        rows.append(one)
    result = {
        "what": "held-out relative layer-output error of synthetic deltas on real SmolLM2-135M inputs",
        "command": "python benchmarks/layer_study.py --out " + a.out,
        "date": time.strftime("%Y-%m-%d"), "device": f"CPU ({platform.machine()}, 2 threads)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1), "rows": rows,
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
