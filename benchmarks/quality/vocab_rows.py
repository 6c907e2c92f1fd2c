"""Probe (GPU): how much of a fine-tune's vocabulary delta the model needs, row by row.

Question behind it (issue 4's 12x target for obs 2-bit 2:4): SmolLM2-135M's tied embedding is 21 %
of the weights, and its delta is stored like every other matrix (~1.6 bits per weight at 2-bit
2:4). If the delta concentrates on few rows (tokens the domain uses), storing only the top rows
would cut the vocabulary's bytes several-fold. For each fine-tune (trained as run_quality.py
does) this measures:

- the share of ||Δ_E||² in the top f of rows (rows ranked by ||Δ_E[r]||), and in the rows of the
  tokens that occur in the domain's training text;
- held-out domain perplexity of the fine-tune with its embedding delta kept only on those rows
  (exact values elsewhere in the model), and of the obs 2-bit 2:4 reconstruction with its
  embedding delta cut the same way (rows ranked by the exact delta);
- the payload that row-sparse vocabulary storage would have: the delta's stored bytes with the
  embedding's scaled by f, plus 4 bytes per kept row id (an estimate, no such format exists).

Usage (one H200, after a call that carried data/carry1, with carry data/carry2; as run_quality.py):
    python benchmarks/quality/vocab_rows.py --carry1 C1 --carry2 C2 --out $OUT --work /tmp/dv
Writes vocab_rows.json into --out.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_quality as rq  # noqa: E402

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
OBS2 = ("obs 2-bit 2:4", "obs", 2, "2:4", {})


def _embedding(model):
    return model.get_input_embeddings().weight


def probe_worker(domain: str, a: dict) -> dict:
    """One fine-tune: compress it with obs 2-bit 2:4 (run_quality's codec_worker), then the row
    shares and perplexities above."""
    import torch

    from deltahub.evaluate import load_model, load_reconstructed, perplexity
    from deltahub.store import DeltaReader

    row = rq.codec_worker(domain, OBS2, a, {})
    rq._setup_worker(a["threads"])
    ft = Path(a["work"]) / "finetunes" / domain
    delta = Path(a["work"]) / "deltas" / domain / OBS2[0].replace(" ", "_").replace("/", "_")
    ids = rq._tokens(f"{domain}_heldout", Path(a["tokens"]))[: a["eval_tokens"]]
    train = rq._tokens(f"{domain}_train", Path(a["tokens"]))

    def ppl(m) -> float:
        return perplexity(m, ids, seq_len=a["eval_seq_len"])[0]

    base_e = _embedding(load_model(a["base"], "cpu")).detach().float()
    model = load_model(ft, a["device"])
    emb = _embedding(model)
    ft_e = emb.detach().float().cpu()
    d = ft_e - base_e
    energy = d.pow(2).sum(1)
    order = torch.argsort(energy, descending=True)
    v = energy.numel()
    seen = torch.zeros(v, dtype=torch.bool)
    seen[train[train < v].unique()] = True
    out = {
        "domain": domain,
        "vocab": v,
        "ppl_finetune": ppl(model),
        "train_tokens_distinct": int(seen.sum()),
        "energy_in_train_rows": float(energy[seen].sum() / energy.sum()),
        "fractions": list(FRACTIONS),
        "energy_top": [],
        "ppl_exact_top": [],
        "ppl_obs2_top": [],
        "payload_estimate_bytes": [],
    }

    def keep_rows(mask: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
        """The base embedding plus dd on the rows of mask, on emb's device and dtype."""
        return (base_e + dd * mask[:, None]).to(emb.device, emb.dtype)

    masks = []
    for f in FRACTIONS:
        m = torch.zeros(v, dtype=torch.bool)
        m[order[: max(1, round(f * v))]] = True
        masks.append(m)
        out["energy_top"].append(float(energy[m].sum() / energy.sum()))
    @torch.no_grad()
    def cut(m, dd: torch.Tensor, key: str) -> None:
        """Perplexity of m with its embedding delta dd kept on each mask's rows, then on ``seen``."""
        w = _embedding(m)
        for mask in masks:
            w.copy_(keep_rows(mask, dd))
            out[f"ppl_{key}_top"].append(ppl(m))
        w.copy_(keep_rows(seen, dd))
        out[f"ppl_{key}_train_rows"] = ppl(m)

    cut(model, d, "exact")
    del model
    rec = load_reconstructed(delta, a["base"], a["device"])
    cut(rec, _embedding(rec).detach().float().cpu() - base_e, "obs2")
    cfg = DeltaReader(delta).config
    # stored bytes per part ("<tensor>.<part>"); the vocabulary matrix: the embedding (tied: the
    # lm_head's too), else the lm_head
    vocab = [n for n in cfg.tensors if n.endswith("embed_tokens.weight") or n == "lm_head.weight"]
    emb_bytes = sum(r["stored_bytes"] for p, r in cfg.storage.items() if p.rsplit(".", 1)[0] in vocab)
    total = sum(r["stored_bytes"] for r in cfg.storage.values())
    for f, m in zip(FRACTIONS, masks, strict=True):
        out["payload_estimate_bytes"].append(int(total - emb_bytes + f * emb_bytes + 4 * int(m.sum())))
    out["vocab_tensors"] = vocab
    out["finetuned_bf16_bytes"] = cfg.stats["finetuned_bf16_bytes"]
    out["obs2_payload_bytes"] = row["payload_bytes"]
    out["obs2_ppl_domain"] = row["ppl_domain"]
    out["vocab_stored_bytes"] = emb_bytes
    return out


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"


def main() -> None:
    ap = rq.parser()  # the benchmark's flags and training / evaluation defaults (--settings unused)
    ap.description = __doc__.split("\n")[0]
    ap.set_defaults(work="/tmp/deltahub-vocab-rows")
    a = ap.parse_args()
    rq.smoke_sizes(a)
    t0 = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base, manifest = rq.prepare_base(a, work)
    domains = a.domains.split(",") if a.domains else manifest["domains"]
    shared = rq.shared_settings(a, base, work, manifest)
    result = {
        "command": "python benchmarks/quality/vocab_rows.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": _device_name(a.device),
        "versions": rq.versions(),
        "settings": shared,
        "finetunes": [],
        "probes": [],
    }
    pool = ProcessPoolExecutor(max_workers=len(domains), mp_context=get_context("spawn"))
    result["finetunes"] = list(pool.map(rq.finetune_worker, domains, [shared] * len(domains)))
    result["probes"] = list(pool.map(probe_worker, domains, [shared] * len(domains)))
    result["wall_s"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab_rows.json").write_text(json.dumps(result, indent=1) + "\n")
    for p in result["probes"]:
        print(p["domain"], "ft", round(p["ppl_finetune"], 3), "obs2", round(p["obs2_ppl_domain"], 3),
              "train rows", p["train_tokens_distinct"], round(p["energy_in_train_rows"], 3), flush=True)
        for i, f in enumerate(p["fractions"]):
            print(f"  top {f:4.2f}: energy {p['energy_top'][i]:.3f} exact {p['ppl_exact_top'][i]:.3f} "
                  f"obs2 {p['ppl_obs2_top'][i]:.3f} ratio "
                  f"{p['finetuned_bf16_bytes'] / p['payload_estimate_bytes'][i]:.2f}", flush=True)


if __name__ == "__main__":
    main()
