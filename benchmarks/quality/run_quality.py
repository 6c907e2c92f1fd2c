"""The quality benchmark: real fine-tunes of SmolLM2-135M-Instruct, every codec, held-out perplexity.

One re-runnable command on one GPU (see README.md beside this file for the two device calls that
carry the data there):

    python benchmarks/quality/run_quality.py --out $OUT

1. Reassembles the GGUF carried in two halves (data/carry1 + data/carry2), converts it to a bf16
   base (checking the weights fingerprint recorded by prepare_data.py).
2. Fine-tunes the base on each domain (full parameters, AdamW, bf16 autocast, fp32 master
   weights; saved in bf16), in parallel processes.
3. Compresses every fine-tune with every codec setting through ``deltahub.compress`` and evaluates
   the reconstructed model (``deltahub.evaluate``) on its domain's held-out text and on general
   text; jobs run in a pool of processes sharing the GPU.
4. Writes quality.json (rows + fine-tune summary + command/date/device/versions), quality.png and
   quality_table.md into --out, after every finished job (a run cut short keeps what it has).
   Every row carries ``run`` (the run's start time, also top-level).
5. With ``--merge-into FILE`` (e.g. docs/benchmarks/quality.json), also writes FILE's results
   with the pairs (fine-tune, setting label) this run measured replaced by its rows, under
   --out/merged/ with FILE's names (``merge_results``); ``--render RUN.json --merge-into FILE``
   does the same for an earlier run's file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = HERE / "data"

# (label, method, bits, sparsity, options); "lowrank" gets its budget from "obs 2-bit 2:4".
# obs rows without a "mask" option follow obs's default, mask="auto": the random 2:4 mask at >= 3
# bits, the saliency mask at <= 2. Runs before that default (quality.json's run 3 ... run 9)
# measured "obs 4-bit 2:4", "obs 3-bit 2:4" and "obs 4-bit 2:4 + scale distillation" with the
# saliency mask, now the "saliency mask" rows of ABLATIONS; each new row records its "mask".
SETTINGS = [
    ("obs 2-bit 2:4", "obs", 2, "2:4", {}),
    ("obs 1-bit 2:4", "obs", 1, "2:4", {}),  # near bitdelta's bytes: the equal-size comparison
    ("obs 4-bit 2:4", "obs", 4, "2:4", {}),
    ("obs 3-bit 2:4", "obs", 3, "2:4", {}),
    ("obs 4-bit dense", "obs", 4, "none", {}),
    ("rtn 4-bit 2:4", "rtn", 4, "2:4", {}),
    ("rtn 2-bit 2:4", "rtn", 2, "2:4", {}),
    ("bitdelta", "bitdelta", 1, "none", {}),
    ("bitdelta + scale distillation", "bitdelta", 1, "none", {"distill": True}),
    ("obs 2-bit 2:4 + scale distillation", "obs", 2, "2:4", {"distill": True}),
    ("obs 4-bit 2:4 + scale distillation", "obs", 4, "2:4", {"distill": True}),
    ("obs 1-bit 2:4 + scale distillation", "obs", 1, "2:4", {"distill": True}),  # vs bitdelta + distill
    ("dare p=0.5 (2:4) 4-bit", "dare", 4, "2:4", {"p": 0.5}),
    ("dare p=0.5 (2:4) 2-bit", "dare", 2, "2:4", {"p": 0.5}),
    ("lowrank @ obs 2-bit 2:4 bytes", "lowrank", 0, "none", {"budget_of": "obs 2-bit 2:4"}),
    # third session's ablation winner (docs/benchmarks/quality_ablations.json)
    ("obs 2-bit 2:4 rescale", "obs", 2, "2:4", {"rescale": True}),
]
# Ablations of obs, run only when named in --settings: damping, calibration size, group scales.
# The 4-bit 2:4 obs ablations below were measured with the saliency mask, the default then: they
# pin {"mask": "obs"} so that their labels keep that meaning.
ABLATIONS = [
    # the saliency 2:4 mask at >= 3 bits (the default until mask="auto"; SETTINGS' rows now random)
    ("obs 4-bit 2:4 saliency mask", "obs", 4, "2:4", {"mask": "obs"}),
    ("obs 4-bit 2:4 saliency mask + scale distillation", "obs", 4, "2:4", {"mask": "obs", "distill": True}),
    ("obs 3-bit 2:4 saliency mask", "obs", 3, "2:4", {"mask": "obs"}),
    # the random mask spelled out (SETTINGS' 4-bit rows until mask="auto"; the same as
    # "obs 4-bit 2:4" and "obs 4-bit 2:4 + scale distillation" now): keeps older JSONs' labels
    ("obs 4-bit 2:4 random mask", "obs", 4, "2:4", {"mask": "random"}),
    ("obs 4-bit 2:4 random mask + scale distillation", "obs", 4, "2:4", {"mask": "random", "distill": True}),
    ("obs 4-bit 2:4 damp 0.1", "obs", 4, "2:4", {"mask": "obs", "damp": 0.1}),
    ("obs 4-bit 2:4 calib 512", "obs", 4, "2:4", {"mask": "obs", "calib_samples": 512}),
    ("obs 4-bit 2:4 g128", "obs", 4, "2:4", {"mask": "obs", "group_size": 128}),
    ("obs 4-bit 2:4 no act-order", "obs", 4, "2:4", {"mask": "obs", "act_order": False}),
    ("obs 2-bit 2:4 damp 0.1", "obs", 2, "2:4", {"damp": 0.1}),
    ("obs 2-bit 2:4 calib 512", "obs", 2, "2:4", {"calib_samples": 512}),
    # run 2 saw distillation overfit its 64 x 256 tokens: 4x the text, same steps
    ("obs 4-bit 2:4 + scale distillation (256 samples)", "obs", 4, "2:4",
     {"mask": "obs", "distill": True, "distill_samples": 256}),
    ("dare p=0.5 (2:4) 4-bit + scale distillation", "dare", 4, "2:4", {"p": 0.5, "distill": True}),
    # session 3: the 2:4 mask's loss dominates (3-bit ~ 4-bit); is it obs's shrinkage, the
    # embedding's 2:4, or distillation's small training set?
    ("obs 4-bit 2:4 rescale", "obs", 4, "2:4", {"mask": "obs", "rescale": True}),
    ("obs 4-bit 2:4 vocab 4-bit dense", "obs", 4, "2:4", {"mask": "obs", "vocab_sparsity": "none"}),
    ("obs 4-bit 2:4 vocab 4-bit dense + scale distillation (256 samples)", "obs", 4, "2:4",
     {"mask": "obs", "vocab_sparsity": "none", "distill": True, "distill_samples": 256}),
    ("obs 4-bit 2:4 rescale + scale distillation (256 samples)", "obs", 4, "2:4",
     {"mask": "obs", "rescale": True, "distill": True, "distill_samples": 256}),
    ("obs 4-bit 2:4 + scale distillation (256 samples 300 steps)", "obs", 4, "2:4",
     {"mask": "obs", "distill": True, "distill_samples": 256, "distill_steps": 300}),
    ("obs 2-bit 2:4 + scale distillation (256 samples)", "obs", 2, "2:4",
     {"distill": True, "distill_samples": 256}),
    # DARE's random mask + obs's quantization with error feedback (mask fixed)
    ("obs 2-bit 2:4 random mask", "obs", 2, "2:4", {"mask": "random"}),
    ("obs 2-bit 2:4 random mask + scale distillation", "obs", 2, "2:4", {"mask": "random", "distill": True}),
    ("dare p=0.5 (2:4) 2-bit + scale distillation", "dare", 2, "2:4", {"p": 0.5, "distill": True}),
    # bitdelta's bytes (1 bit per weight, dense) with obs's per-row scales and error feedback
    ("obs 1-bit dense", "obs", 1, "none", {}),
    ("obs 1-bit dense + scale distillation", "obs", 1, "none", {"distill": True}),
    # the same bytes without error feedback (is feedback what loses to bitdelta at 1 bit?)
    ("rtn 1-bit dense", "rtn", 1, "none", {}),
    ("rtn 1-bit dense + scale distillation", "rtn", 1, "none", {"distill": True}),
    # session 4: between the two, feedback damped (damp x mean diag(H) added to H; 0.01 by default)
    ("obs 1-bit dense damp 1", "obs", 1, "none", {"damp": 1.0}),
    ("obs 1-bit dense damp 1 + scale distillation", "obs", 1, "none", {"damp": 1.0, "distill": True}),
    ("obs 1-bit dense damp 10 + scale distillation", "obs", 1, "none", {"damp": 10.0, "distill": True}),
    ("obs 1-bit dense damp 100 + scale distillation", "obs", 1, "none", {"damp": 100.0, "distill": True}),
    # runs 6-7: undistilled, every 1-bit variant ~ bitdelta; distilled, per-row factors lose. Next:
    # bitdelta's granularity (one factor per matrix) or its learning rate for the per-row codecs
    ("obs 1-bit dense + scale distillation per matrix", "obs", 1, "none",
     {"distill": True, "distill_per_matrix": True}),
    ("rtn 1-bit dense + scale distillation per matrix", "rtn", 1, "none",
     {"distill": True, "distill_per_matrix": True}),
    ("obs 1-bit dense + scale distillation lr 0.02", "obs", 1, "none",
     {"distill": True, "distill_lr": 0.02, "distill_per_matrix": False}),
    ("obs 2-bit 2:4 + scale distillation per matrix", "obs", 2, "2:4",
     {"distill": True, "distill_per_matrix": True}),
]
# Distillation trains one factor per matrix unless a row sets distill_per_matrix False: the library
# default since run 8 (per matrix won at 1 and 2 bits). Runs 3-7 trained one factor per row for
# every codec but bitdelta (the default then); each row's "distill" record says which.
# run options, not codec options
RUN_OPTIONS = ("distill", "distill_samples", "distill_steps", "distill_per_matrix", "distill_lr", "budget_of",
               "calib_samples", "group_size", "vocab_bits", "vocab_sparsity")


# ---------------------------------------------------------------------------------------------
# workers (run in child processes)


def _setup_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _tokens(name: str, tokens_dir: Path):
    import numpy as np
    import torch

    return torch.from_numpy(np.load(tokens_dir / f"{name}.npy").astype("int64"))


def finetune_worker(domain: str, a: dict) -> dict:
    """Train one fine-tune, save it in bf16, evaluate it; returns its summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltahub.evaluate import load_model, perplexity

    _setup_worker(a["threads"])
    t0 = time.time()
    dev = torch.device(a["device"])
    out = Path(a["work"]) / "finetunes" / domain
    src = Path(a["finetunes_from"]) / domain if a.get("finetunes_from") else None
    if src is not None and (src / "config.json").is_file():  # the same weights as an earlier run
        shutil.copytree(src, out)
        m = load_model(out, dev)
        res = {"domain": domain, "reused_from": str(src), "folder": str(out)}
        for which in (domain, a["general"]):
            ids = _tokens(f"{which}_heldout", Path(a["tokens"]))[: a["eval_tokens"]]
            key = f"ppl_{'domain' if which == domain else 'general'}"
            res[key] = perplexity(m, ids, seq_len=a["eval_seq_len"])[0]
        return res
    torch.manual_seed(a["seed"])
    data = _tokens(f"{domain}_train", Path(a["tokens"]))
    model = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float32).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps, warm = a["steps"], max(1, a["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    g = torch.Generator().manual_seed(a["seed"])
    L, B = a["seq_len"], a["batch"]
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - L - 1, (B,), generator=g)
        x = torch.stack([data[s : s + L] for s in starts.tolist()]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(a["base"]).save_pretrained(str(out))
    del model, opt
    train_s = time.time() - t0
    m = load_model(out, dev)
    res = {
        "domain": domain,
        "steps": steps,
        "lr": a["lr"],
        "batch": B,
        "seq_len": L,
        "train_tokens_seen": steps * B * L,
        "train_tokens_unique": int(data.numel()),
        "loss_first10": sum(losses[:10]) / len(losses[:10]),
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(train_s, 1),
        "folder": str(out),
    }
    for which in (domain, a["general"]):
        ids = _tokens(f"{which}_heldout", Path(a["tokens"]))[: a["eval_tokens"]]
        res[f"ppl_{'domain' if which == domain else 'general'}"] = perplexity(
            m, ids, seq_len=a["eval_seq_len"]
        )[0]
    return res


def eval_base_worker(a: dict, names: list[str]) -> dict:
    """Perplexity of the base on every held-out set."""
    from deltahub.evaluate import load_model, perplexity

    _setup_worker(a["threads"])
    m = load_model(a["base"], a["device"])
    return {
        n: perplexity(
            m, _tokens(f"{n}_heldout", Path(a["tokens"]))[: a["eval_tokens"]], seq_len=a["eval_seq_len"]
        )[0]
        for n in names
    }


def codec_worker(domain: str, setting: tuple, a: dict, extra: dict) -> dict:
    """Compress one fine-tune with one setting, evaluate the reconstruction; returns a row."""
    import torch

    from deltahub.compress import CompressConfig, compress
    from deltahub.evaluate import load_reconstructed, perplexity

    _setup_worker(a["threads"])
    label, method, bits, sparsity, options = setting
    opts = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    if method == "lowrank":
        opts["bits_per_weight"] = extra["bits_per_weight"]
    ft = Path(a["work"]) / "finetunes" / domain
    delta = Path(a["work"]) / "deltas" / domain / label.replace(" ", "_").replace("/", "_")
    cfg = CompressConfig(
        method=method,
        bits=bits if method in ("obs", "rtn") else max(bits, 2),
        sparsity=sparsity,
        group_size=options.get("group_size"),
        calibration_samples=options.get("calib_samples", a["calib_samples"]),
        seq_len=a["calib_seq_len"],
        calibration_data=str(Path(a["calib"]) / f"{domain}.txt"),
        device=a["device"],
        options=opts,
        vocab_bits=options.get("vocab_bits"),
        vocab_sparsity=options.get("vocab_sparsity"),
    )
    t0 = time.time()
    dcfg = compress(a["base"], ft, delta, cfg, progress=False)
    if method == "lowrank" and "payload_bytes" in extra:
        # equal bytes *after* the lossless stage: bf16 factors shrink under zstd, so rescale the
        # budget until the stored size lands within 2 % below the target (ranks are integers)
        for _ in range(3):
            got = dcfg.stats["payload_bytes"]
            if 0.98 * extra["payload_bytes"] <= got <= extra["payload_bytes"]:
                break
            opts["bits_per_weight"] *= 0.99 * extra["payload_bytes"] / got
            cfg = dataclasses.replace(cfg, options=dict(opts))
            dcfg = compress(a["base"], ft, delta, cfg, progress=False)
    distill = None
    if options.get("distill"):
        from deltahub.distill import distill_scales

        distill = distill_scales(
            delta,
            base=a["base"],
            finetuned=ft,
            calibration_data=cfg.calibration_data,
            steps=options.get("distill_steps", a["distill_steps"]),
            samples=options.get("distill_samples", 64),
            per_matrix=options.get("distill_per_matrix", True),
            lr=options.get("distill_lr"),
            device=a["device"],
        )
        from deltahub.store import DeltaReader

        dcfg = DeltaReader(delta).config
        stored = sum(r["stored_bytes"] for r in dcfg.storage.values())
        dcfg.stats["payload_bytes"] = stored
        dcfg.stats["ratio_vs_bf16"] = dcfg.stats["finetuned_bf16_bytes"] / stored
    seconds = time.time() - t0
    model = load_reconstructed(delta, a["base"], a["device"])
    dom_ids = _tokens(f"{domain}_heldout", Path(a["tokens"]))[: a["eval_tokens"]]
    ppl_d = perplexity(model, dom_ids, seq_len=a["eval_seq_len"])[0]
    ppl_g = perplexity(
        model,
        _tokens(f"{a['general']}_heldout", Path(a["tokens"]))[: a["eval_tokens"]],
        seq_len=a["eval_seq_len"],
    )[0]
    ppl_exact_emb = None
    if method == "obs" and sparsity == "2:4":  # diagnostic: how much of the loss is the embedding's
        from safetensors import safe_open

        emb = model.get_input_embeddings().weight
        with safe_open(str(ft / "model.safetensors"), "pt") as f:
            name = next(n for n in f.keys() if n.endswith("embed_tokens.weight"))  # noqa: SIM118
            with torch.no_grad():
                emb.copy_(f.get_tensor(name).to(emb.device, emb.dtype))
        ppl_exact_emb = perplexity(model, dom_ids, seq_len=a["eval_seq_len"])[0]
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    st = dcfg.stats
    matrix_params = sum(math.prod(t["shape"]) for t in dcfg.tensors.values() if t["kind"] != "dense")
    return {
        "codec": label,
        "method": method,
        "bits": bits if method != "lowrank" else None,
        "sparsity": sparsity if method != "lowrank" else None,
        "options": {**opts, **{k: options[k] for k in RUN_OPTIONS if k in options and k != "budget_of"}},
        # obs's 2:4 mask as used (its default "auto" resolved; None: dense or another codec)
        "mask": ((dcfg.compression.get("groups") or {}).get("linear") or {}).get("mask"),
        "payload_bytes": st["payload_bytes"],
        "ratio": round(st["finetuned_bf16_bytes"] / st["payload_bytes"], 3),
        "ppl_domain": ppl_d,
        "ppl_general": ppl_g,
        "ppl_domain_exact_embedding": ppl_exact_emb,
        "compress_seconds": round(seconds, 1),
        "bits_per_matrix_weight": 8 * st["payload_bytes"] / matrix_params,
        "distill": distill,
    }


# ---------------------------------------------------------------------------------------------
# reporting


def versions() -> dict:
    import torch
    import transformers

    import deltahub

    return {
        "deltahub": deltahub.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


def _f(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def ordered_rows(result: dict) -> list[dict]:
    """Rows by fine-tune, then in SETTINGS order (jobs finish in any order)."""
    doms = [f["domain"] for f in result["finetunes"]]
    labels = [s[0] for s in SETTINGS + ABLATIONS]

    def key(r: dict) -> tuple:
        return (
            doms.index(r["finetune"]) if r["finetune"] in doms else len(doms),
            labels.index(r["codec"]) if r["codec"] in labels else len(labels),
        )

    return sorted(result["rows"], key=key)


def _exact_emb(r: dict) -> str:
    """Diagnostic column: the reconstruction with the fine-tune's own (tied) embedding."""
    x = r.get("ppl_domain_exact_embedding")
    return "–" if x is None else f"{100 * (x / r['ppl_domain_original'] - 1):+.2f} %"


def markdown(result: dict) -> str:
    lines = [
        "| fine-tune | codec | payload | ratio vs bf16 | ppl domain (fine-tune → reconstructed) | "
        "rel. increase | ppl general | rel. increase, fine-tune's embedding |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ordered_rows(result):
        lines.append(
            f"| {r['finetune']} | {r['codec']} | {r['payload_bytes'] / 1e6:.2f} MB | {r['ratio']:.2f}× | "
            f"{r['ppl_domain_original']:.3f} → {r['ppl_domain']:.3f} | {100 * r['rel_increase']:+.2f} % | "
            f"{r['ppl_general']:.3f} | {_exact_emb(r)} |"
        )
    lines += [
        "",
        "| fine-tune | steps × batch × seq | base ppl (domain) | fine-tune ppl (domain) | "
        "base ppl (general) | fine-tune ppl (general) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for f in result["finetunes"]:
        lines.append(
            f"| {f['domain']} | "
            + ("reused | " if "reused_from" in f else f"{f['steps']} × {f['batch']} × {f['seq_len']} | ")
            + f"{_f(f.get('ppl_domain_base'))} | {_f(f['ppl_domain'])} | {_f(f.get('ppl_general_base'))} | "
            f"{_f(f['ppl_general'])} |"
        )
    if result.get("merged_runs"):
        first = f"{result.get('date')}, `{result.get('command')}`"
        lines += ["", f"Rows without a `run` field in the JSON: the file's own run ({first})."]
        lines += [
            f"Merged run {e['run']} ({len(e['added']) + len(e['replaced'])} rows, "
            f"{len(e['replaced'])} replaced): "
            + ", ".join(e["labels"])
            + f"; `{e['command']}`."
            for e in result["merged_runs"]
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [f["domain"] for f in result["finetunes"]]
    fig, axes = plt.subplots(1, max(1, len(domains)), figsize=(4.2 * max(1, len(domains)), 4), squeeze=False)
    methods = sorted({r["codec"] for r in result["rows"]})
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    for ax, d in zip(axes[0], domains, strict=False):
        for r in (r for r in result["rows"] if r["finetune"] == d):
            ax.scatter(r["ratio"], 100 * r["rel_increase"], color=colors[r["codec"]], label=r["codec"], s=28)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(1.0, color="grey", lw=0.6, ls="--")
        ax.set_title(d)
        ax.set_xlabel("compression ratio vs bf16 fine-tune")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity increase vs fine-tune (%)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"deltahub codecs on SmolLM2-135M-Instruct fine-tunes ({result['device']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path, stem: str = "quality") -> None:
    """``<stem>.json``, ``<stem>_table.md`` and ``<stem>.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / f"{stem}.json")
    (out / f"{stem}_table.md").write_text(markdown(result))
    try:
        plot(result, out / f"{stem}.png")
    except Exception as e:  # the JSON is what matters
        print("plot failed:", e, flush=True)


def merge_results(old: dict, new: dict) -> dict:
    """``old`` (a results file) with every (fine-tune, codec label) pair that ``new`` measured
    replaced by new's row and every other row kept; ``old`` is not modified.

    New rows carry ``run`` (new's run id: its start time, or its date for runs that recorded none);
    rows without ``run`` come from ``old``'s own run (its top-level date and command, which stay).
    ``merged_runs`` (top level) lists the merged runs in order: id, date, command, device,
    versions, settings, fine-tunes, completeness, errors and the pairs each added or replaced.
    Merging one run again replaces its earlier entry (idempotent)."""
    run = new.get("run") or new["date"]
    fresh = [{**r, "run": r.get("run") or run} for r in new["rows"]]
    measured = {(r["finetune"], r["codec"]) for r in fresh}
    kept = [r for r in old["rows"] if (r["finetune"], r["codec"]) not in measured]
    before = {(r["finetune"], r["codec"]) for r in old["rows"] if r.get("run") != run}  # not this run's
    earlier = [e for e in old.get("merged_runs", []) if e.get("run") == run]  # merged once already
    replaced = (measured & before) | {p for e in earlier for p in map(tuple, e["replaced"]) if p in measured}
    entry = {
        "run": run,
        "date": new["date"],
        "command": new.get("command"),
        "device": new.get("device"),
        "versions": new.get("versions"),
        "settings": new.get("settings"),
        "finetunes": new.get("finetunes"),
        "complete": new.get("complete"),
        "not_run": new.get("not_run", []),
        "errors": new.get("errors", []),
        "labels": sorted({r["codec"] for r in fresh}),
        # [fine-tune, label] pairs the run replaced / added (its rows carry "run")
        "replaced": sorted(map(list, replaced)),
        "added": sorted(map(list, measured - replaced)),
    }
    merged = {**old, "rows": kept + fresh}
    merged["rows"] = ordered_rows(merged)
    merged["merged_runs"] = [e for e in old.get("merged_runs", []) if e.get("run") != run] + [entry]
    return merged


def write_merged(result: dict, into: Path, out: Path) -> Path:
    """Merge ``result`` into the results file ``into`` (read, never written) and write the merged
    file, table and figure under ``out/merged`` with ``into``'s names; returns that folder."""
    folder = out / "merged"
    write(merge_results(json.loads(into.read_text()), result), folder, stem=into.stem)
    return folder


# ---------------------------------------------------------------------------------------------
# main


def make_smoke_base(tokenizer_dir: Path, out: Path) -> str:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer and vocabulary (pipeline check)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def prepare_base(a: argparse.Namespace, work: Path) -> tuple[str, dict]:
    """(base folder, manifest): from --base-folder, a tiny model (--smoke), or the carried GGUF."""
    manifest = json.loads((Path(a.carry1) / "manifest.json").read_text())
    if a.smoke:
        return make_smoke_base(Path(a.carry1) / "tokenizer", work / "smoke-base"), manifest
    if a.base_folder:
        return a.base_folder, manifest
    import hashlib

    import smollm2

    parts = [Path(a.carry1) / "smollm2.gguf.part1", Path(a.carry2) / "smollm2.gguf.part2"]
    for p in parts:
        if not p.is_file():
            raise SystemExit(
                f"{p} missing: carry data/carry1 and data/carry2 in back-to-back calls (README.md)"
            )
    gdir = work / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    gguf = gdir / smollm2.GGUF_NAME
    raw = parts[0].read_bytes() + parts[1].read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["gguf"]["sha256"]:
        raise SystemExit("reassembled GGUF does not match manifest.json (sha256)")
    gguf.write_bytes(raw)
    base = work / "base"
    fp = smollm2.convert(gguf, base)
    manifest["base_fingerprint_here"] = fp
    if fp != manifest["base_fingerprint"]:
        print(
            f"WARNING: base weights fingerprint {fp} differs from prepare_data's "
            f"{manifest['base_fingerprint']}",
            flush=True,
        )
    return str(base), manifest


def smoke_sizes(a: argparse.Namespace) -> None:
    """--smoke: a few steps and tokens (a pipeline check)."""
    if a.smoke:
        a.steps, a.batch, a.seq_len, a.eval_tokens, a.eval_seq_len = 4, 2, 64, 1024, 256
        a.calib_samples, a.calib_seq_len, a.distill_steps = 4, 64, 2


def shared_settings(a: argparse.Namespace, base: str, work: Path, manifest: dict) -> dict:
    """What every worker gets: paths, training, evaluation and calibration settings."""
    return {
        "base": base,
        "work": str(work),
        "tokens": str(Path(a.carry1) / "tokens"),
        "calib": str(Path(a.carry1) / "calib"),
        "device": a.device,
        "finetunes_from": a.finetunes_from,
        "general": manifest["general"],
        "steps": a.steps,
        "lr": a.lr,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "eval_tokens": a.eval_tokens,
        "eval_seq_len": a.eval_seq_len,
        "calib_samples": a.calib_samples,
        "calib_seq_len": a.calib_seq_len,
        "distill_steps": a.distill_steps,
        "threads": a.threads,
        "seed": a.seed,
    }


def parser() -> argparse.ArgumentParser:
    """The command line (vocab_rows.py takes the same)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--work", default="/tmp/deltahub-quality")
    ap.add_argument("--carry1", default=str(DATA / "carry1"))
    ap.add_argument("--carry2", default=str(DATA / "carry2"))
    ap.add_argument("--base-folder", default=None, help="use this bf16 base instead of the carried GGUF")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--domains", default=None, help="comma-separated subset of the manifest's domains")
    ap.add_argument("--settings", default=None, help="comma-separated subset of setting labels")
    ap.add_argument("--finetunes-from", default=None, metavar="DIR",
                    help="evaluate the fine-tunes in DIR/<domain> (an earlier run's work/finetunes) "
                         "instead of training them")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=6e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=6, help="processes sharing the GPU")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    ap.add_argument("--deadline", type=float, default=540, help="seconds; write what is done and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="pipeline check: tiny random base, a few steps and tokens (needs data/carry1 only)",
    )
    ap.add_argument(
        "--render",
        metavar="QUALITY_JSON",
        default=None,
        help="only rewrite quality_table.md and quality.png from an existing results file",
    )
    ap.add_argument(
        "--merge-into",
        metavar="FILE",
        default=None,
        help="also write FILE's results with every (fine-tune, setting) pair this run measured "
        "replaced by the new row, the rest kept, into OUT/merged/ under FILE's names (FILE itself "
        "is only read); with --render, merge that results file instead of running",
    )
    return ap


def main() -> None:
    a = parser().parse_args()
    if a.merge_into and not Path(a.merge_into).is_file():
        raise SystemExit(f"--merge-into: {a.merge_into} is not a file")
    if a.render:
        result = json.loads(Path(a.render).read_text())
        out = Path(a.out)
        if a.merge_into:
            print("merged into", write_merged(result, Path(a.merge_into), out), flush=True)
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality_table.md").write_text(markdown(result))
        plot(result, out / "quality.png")
        return
    smoke_sizes(a)
    t_start = time.time()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, manifest = prepare_base(a, work)
    print(f"[{time.time() - t_start:5.0f}s] base ready: {base}", flush=True)
    domains = a.domains.split(",") if a.domains else manifest["domains"]
    chosen = a.settings.split(",") if a.settings else None
    settings = [s for s in SETTINGS if chosen is None or s[0] in chosen]
    settings += [s for s in ABLATIONS if chosen is not None and s[0] in chosen]
    unknown = set(chosen or ()) - {s[0] for s in settings}
    if unknown:
        raise SystemExit(f"unknown setting label(s): {sorted(unknown)}")
    import torch

    device_name = (
        torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({platform.machine()})"
    )
    shared = shared_settings(a, base, work, manifest)
    result = {
        "device": device_name,
        "date": time.strftime("%Y-%m-%d"),
        "run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),  # rows carry it as "run"
        "versions": versions(),
        "command": "python benchmarks/quality/run_quality.py " + " ".join(sys.argv[1:]),
        "base": {
            "id": manifest["base_id"],
            "fingerprint": manifest["base_fingerprint"],
            "fingerprint_here": manifest.get("base_fingerprint_here"),
        },
        "data": {
            "packages": manifest["packages"],
            "heldout_rule": manifest["heldout_rule"],
            "general": manifest["general"],
            "stats": manifest["stats"],
        },
        "settings": {
            "train": {k: shared[k] for k in ("steps", "lr", "batch", "seq_len")},
            "eval": {"tokens": a.eval_tokens, "seq_len": a.eval_seq_len},
            "calibration": {
                "samples": a.calib_samples,
                "seq_len": a.calib_seq_len,
                "data": "the fine-tune's domain (training split)",
            },
        },
        "finetunes": [],
        "rows": [],
        "errors": [],
        "complete": False,
        "compress_speed": None,
    }
    out = Path(a.out)
    deadline = t_start + a.deadline
    pool = ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn"))
    base_f = pool.submit(eval_base_worker, shared, [*domains, manifest["general"]])
    ft_f = {pool.submit(finetune_worker, d, shared): d for d in domains}
    pending: dict[Future, tuple] = {}
    fts: dict[str, dict] = {}
    base_ppl = None
    obs2: dict[str, dict] = {}
    waiting_lowrank: list[tuple[str, tuple]] = []
    queue: list[tuple[int, str, tuple, dict]] = []  # (priority, domain, setting, extra), not yet submitted
    rows_by: dict[str, list] = {d: [] for d in domains}

    def submit(d: str, s: tuple, extra: dict | None = None, priority: int = 100) -> None:
        """Queue a job; at most --workers run at once, the most urgent first (FIFO among equals)."""
        queue.append((priority, d, s, extra or {}))
        queue.sort(key=lambda q: q[0])  # stable

    def launch() -> None:
        while queue and len(pending) + len(ft_f) + (base_f is not None) < a.workers:
            _, d, s, extra = queue.pop(0)
            pending[pool.submit(codec_worker, d, s, shared, extra)] = (d, s)

    def flush() -> None:
        result["finetunes"] = [fts[d] for d in domains if d in fts]
        result["rows"] = ordered_rows(
            {"finetunes": result["finetunes"], "rows": [r for d in domains for r in rows_by[d]]}
        )
        result["elapsed_seconds"] = round(time.time() - t_start, 1)
        write(result, out)
        if a.merge_into:
            write_merged(result, Path(a.merge_into), out)

    while ft_f or pending or queue or base_f is not None:
        launch()
        futures = list(ft_f) + list(pending) + ([base_f] if base_f is not None else [])
        done, _ = wait(futures, timeout=max(1.0, deadline - time.time()), return_when=FIRST_COMPLETED)
        if not done:
            break
        for f in done:
            try:
                res = f.result()
            except Exception as e:
                what = ft_f.get(f) or pending.get(f) or "base"
                result["errors"].append(
                    {"job": str(what), "error": "".join(traceback.format_exception(e))[-2000:]}
                )
                print(f"[{time.time() - t_start:5.0f}s] FAILED {what}: {e}", flush=True)
                ft_f.pop(f, None)
                pending.pop(f, None)
                if f is base_f:
                    base_f = None
                continue
            if f is base_f:
                base_ppl, base_f = res, None
                print(f"[{time.time() - t_start:5.0f}s] base ppl {res}", flush=True)
            elif f in ft_f:
                d = ft_f.pop(f)
                fts[d] = res
                how = (f"reused {res['reused_from']}" if "reused_from" in res
                       else f"loss {res['loss_first10']:.3f} -> {res['loss_last10']:.3f}")
                print(
                    f"[{time.time() - t_start:5.0f}s] fine-tune {d}: {how}, ppl {res['ppl_domain']:.3f} "
                    f"general {res['ppl_general']:.3f}",
                    flush=True,
                )
                for i, s in enumerate(settings):
                    if s[1] == "lowrank":
                        waiting_lowrank.append((d, s))
                    else:
                        submit(d, s, priority=10 * i)
            else:
                d, s = pending.pop(f)
                row = {
                    "finetune": d,
                    "run": result["run"],
                    **res,
                    "ppl_domain_original": fts[d]["ppl_domain"],
                    "rel_increase": res["ppl_domain"] / fts[d]["ppl_domain"] - 1,
                    "ppl_general_original": fts[d]["ppl_general"],
                }
                rows_by[d].append(row)
                if s[0] == "obs 2-bit 2:4":
                    obs2[d] = res
                print(
                    f"[{time.time() - t_start:5.0f}s] {d:12s} {s[0]:32s} {row['ratio']:6.2f}x  ppl "
                    f"{row['ppl_domain']:.3f} ({100 * row['rel_increase']:+.2f} %)  "
                    f"general {row['ppl_general']:.3f}"
                    f"  [{res['compress_seconds']} s]",
                    flush=True,
                )
            for d, s in list(waiting_lowrank):
                if d in obs2:
                    waiting_lowrank.remove((d, s))
                    target = {"bits_per_weight": obs2[d]["bits_per_matrix_weight"],
                              "payload_bytes": obs2[d]["payload_bytes"]}
                    submit(d, s, target, priority=0)
            if base_ppl is not None:
                for d in fts:
                    fts[d]["ppl_domain_base"] = base_ppl[d]
                    fts[d]["ppl_general_base"] = base_ppl[manifest["general"]]
                result["base"]["ppl"] = base_ppl
            flush()
    result["complete"] = not (ft_f or pending or queue or waiting_lowrank) and base_ppl is not None
    result["not_run"] = [
        f"{d}: {s[0]}" for d, s in [*pending.values(), *waiting_lowrank, *[q[1:3] for q in queue]]
    ] + [f"fine-tune {d}" for d in ft_f.values()]
    flush()
    print(markdown(result), flush=True)
    print(f"done in {time.time() - t_start:.0f} s; complete={result['complete']}", flush=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:  # jobs cut off by the deadline
        proc.kill()
    os._exit(0)


if __name__ == "__main__":
    main()
