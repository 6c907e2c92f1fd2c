"""GPU smoke run of the serving engine on a real model: SmolLM2-135M-Instruct + 4 real fine-tunes.

Makes 4 short full-parameter fine-tunes of the base (the quality benchmark's domains and data,
benchmarks/quality/), compresses each with obs 4-bit 2:4 on the GPU, serves base + 4 deltas in one
continuous batch with ``deltahub.server.LLM`` (bf16, Triton SBMM), and compares every request's
greedy tokens with transformers' generate on the reconstructed fine-tune (bf16, same device).
Writes serve_smoke_smollm2.json under --out.

Carry data as benchmarks/quality/README.md says (two back-to-back calls), then:

    python benchmarks/smoke_serve_smollm2.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "quality"))

import run_quality  # noqa: E402

PROMPTS = {
    "python-docs": ["The asyncio module provides", "To open a file for reading, use"],
    "manpages": ["NAME\n       grep - print lines", "The -r option causes"],
    "bible": ["And God said unto Moses,", "In the beginning"],
    "dictionary": ["Apple, n. (Bot.)", "Quick, a. Alive; living"],
}


def _compress(domain: str, shared: dict) -> str:
    from deltahub.compress import CompressConfig, compress

    run_quality._setup_worker(shared["threads"])
    out = Path(shared["work"]) / "deltas" / domain
    cfg = CompressConfig(method=shared["method"], bits=4, sparsity="2:4",
                         calibration_samples=shared["calib_samples"], seq_len=shared["calib_seq_len"],
                         calibration_data=str(Path(shared["calib"]) / f"{domain}.txt"),
                         device=shared["device"])
    compress(shared["base"], Path(shared["work"]) / "finetunes" / domain, out, cfg, progress=False)
    return str(out)


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--work", default="/tmp/deltahub-smoke")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--method", default="obs")
    ap.add_argument("--smoke", action="store_true", help="pipeline check on the CPU: tiny settings, rtn")
    a = ap.parse_args()
    train = {"batch": 16, "seq_len": 512, "eval_tokens": 16384, "calib_samples": 32, "calib_seq_len": 256}
    if a.smoke:
        a.steps, a.max_new_tokens, a.method = 2, 4, "rtn"
        train = {"batch": 2, "seq_len": 64, "eval_tokens": 512, "calib_samples": 4, "calib_seq_len": 64}
    t0 = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(carry1=str(run_quality.DATA / "carry1"), carry2=str(run_quality.DATA / "carry2"),
                            smoke=False, base_folder=None)
    base, manifest = run_quality.prepare_base(ns, work)
    domains = manifest["domains"]
    shared = {"base": base, "work": str(work), "tokens": str(run_quality.DATA / "carry1" / "tokens"),
              "calib": str(run_quality.DATA / "carry1" / "calib"), "device": a.device, "method": a.method,
              "general": manifest["general"], "steps": a.steps, "lr": 6e-5, "eval_seq_len": 512,
              "threads": 2, "seed": 0, **train}
    ctx = get_context("spawn")
    with ProcessPoolExecutor(len(domains), mp_context=ctx) as pool:
        fts = list(pool.map(run_quality.finetune_worker, domains, [shared] * len(domains)))
    print(f"[{time.time() - t0:5.0f}s] fine-tunes: {[(f['domain'], round(f['ppl_domain'], 2)) for f in fts]}",
          flush=True)
    with ProcessPoolExecutor(len(domains), mp_context=ctx) as pool:
        deltas = dict(zip(domains, pool.map(_compress, domains, [shared] * len(domains)), strict=True))
    print(f"[{time.time() - t0:5.0f}s] deltas compressed", flush=True)

    import torch
    from deltahub.server import LLM, SamplingParams
    from transformers import AutoTokenizer

    from deltahub.evaluate import load_reconstructed

    llm = LLM(base=base, variants=deltas, device=a.device, max_gpu_variants=4)
    dtype = getattr(torch, llm.config.torch_dtype_name)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    prompts, variants = [], []
    for d in domains:
        for p in PROMPTS.get(d, ["Hello"]):
            prompts += [p, p]
            variants += [d, None]
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], params, variants=variants[:2])  # warm-up: loads, Triton compiles
    sync()
    t_gen = time.time()
    outs = llm.generate(prompts, params, variants=variants)
    sync()
    gen_s = time.time() - t_gen
    tok = AutoTokenizer.from_pretrained(base)
    refs: dict[str | None, object] = {}
    rows = []
    for prompt, var, out in zip(prompts, variants, outs, strict=True):
        if var not in refs:
            refs.clear()
            if var is None:
                from transformers import AutoModelForCausalLM

                refs[var] = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(a.device)
            else:
                refs[var] = load_reconstructed(deltas[var], base, a.device, dtype=dtype)
        ids = tok(prompt, return_tensors="pt").input_ids.to(a.device)
        with torch.no_grad():
            ref = refs[var].generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False,
                                     min_new_tokens=a.max_new_tokens)[0, ids.shape[1]:].tolist()
        got = list(out.token_ids)
        rows.append({"variant": var, "prompt": prompt, "text": out.text, "finish_reason": out.finish_reason,
                     "tokens": len(got), "exact": got == ref, "common_prefix": _prefix(got, ref)})
    by_prompt: dict[str, dict] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], {})[r["variant"]] = r["text"]
    differs = sum(1 for v in by_prompt.values() if len(set(v.values())) > 1)
    result = {
        "what": f"deltahub.server.LLM: SmolLM2-135M-Instruct + 4 {a.method} 4-bit 2:4 deltas, mixed batch",
        "dtype": str(dtype),
        "command": "python benchmarks/smoke_serve_smollm2.py --out $OUT",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "finetunes": [{k: f[k] for k in ("domain", "steps", "ppl_domain", "ppl_general")} for f in fts],
        "requests": len(rows),
        "generate_seconds": round(gen_s, 3),
        "generated_tokens": sum(r["tokens"] for r in rows),
        "exact_vs_transformers_bf16": sum(r["exact"] for r in rows),
        "mean_common_prefix": sum(r["common_prefix"] for r in rows) / len(rows),
        "prompts_where_variant_differs_from_base": differs,
        "rows": rows,
        "elapsed_seconds": round(time.time() - t0, 1),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_smoke_smollm2.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    for r in rows:
        print(f"{r['variant']!s:12} exact={r['exact']!s:5} prefix={r['common_prefix']:2} {r['text'][:60]!r}")
    assert all(r["finish_reason"] == "length" and r["tokens"] == a.max_new_tokens for r in rows)
    assert differs >= len(by_prompt) // 2, "the deltas do not change the outputs"


if __name__ == "__main__":
    main()
