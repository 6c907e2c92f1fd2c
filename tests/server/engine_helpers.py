"""Reference helpers of the engine tests: the full transformers model a variant stands for, and
transformers' greedy generate."""

from __future__ import annotations

from pathlib import Path

import torch


def _merge_lora(model, folder: Path) -> None:
    import json

    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in sd.items():
            if ".lora_A." not in key:
                continue
            b = sd[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            r = next((v for k, v in cfg.get("rank_pattern", {}).items() if module.endswith(k)), cfg["r"])
            params[f"{module}.weight"].add_((cfg["lora_alpha"] / r) * (b.float() @ a.float()))


def reference_model(base: Path, variant: Path | None = None, dtype=torch.float32):
    """The full transformers model a variant stands for: base + dequantized delta
    (deltahub.format.apply_delta), or base with the LoRA adapter merged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if variant is not None and (variant / "adapter_config.json").exists():
        try:
            from peft import PeftModel
        except Exception:  # no (working) peft: merge W += alpha/r * B @ A by hand
            _merge_lora(model, variant)
        else:
            model = PeftModel.from_pretrained(model, str(variant)).merge_and_unload()
    elif variant is not None:
        from deltahub.format import apply_delta
        from deltahub.store import DeltaReader

        reader = DeltaReader(variant)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in reader.names():
                p = params[name]
                p.copy_(apply_delta(p.data, reader.read(name)))
    return model.to(dtype).eval()


@torch.no_grad()
def hf_greedy(model, ids: list[int], max_new_tokens: int, eos_token_id: int | None = 2) -> list[int]:
    """transformers' greedy generate: the new token ids (stopping at EOS, which is included)."""
    x = torch.tensor([ids], device=model.device)
    out = model.generate(
        x,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        attention_mask=torch.ones_like(x),
    )
    return out[0, len(ids) :].tolist()
