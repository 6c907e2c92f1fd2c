"""Acceptance (issue 2): ``obs`` (saliency mask) beats ``rtn`` at equal bits and sparsity on
held-out layer-output error, for real layers of a trained toy fine-tune."""

from __future__ import annotations

import pytest
import torch

from deltahub import calibration, toy
from deltahub.codecs import CodecSettings, get_codec
from deltahub.codecs import obs as obs_module

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj")
BOUND = 0.6  # obs error / rtn error must be below this (measured ~0.39 and ~0.24)


@pytest.fixture(scope="module")
def layer_data(toy_models, toy_tokenizer):
    """{layer: (Δ [N, K], H from calibration inputs [K, K], held-out inputs X [n, K])}.

    Calibration: 16 x 64 tokens of the built-in calibration text. Held out: 16 x 64 tokens of
    the fine-tune's chat task, which calibration never saw. Inputs are the fine-tune's own."""
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(str(toy_models["upper"]), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(toy_models["base"]), dtype=torch.float32).eval()
    cal = calibration.calibration_ids(toy_tokenizer, 16, 64)
    examples = toy.task_examples("upper", 60, seed=321)
    text = "\n".join(toy.chat_text(e["prompt"], e["answer"]) for e in examples)
    held = torch.tensor(toy_tokenizer(text, add_special_tokens=False)["input_ids"][: 16 * 64]).reshape(16, 64)

    def inputs(module, ids):
        xs = []
        hook = module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            ft(ids)
        hook.remove()
        return torch.cat(xs)

    out = {}
    for name in LAYERS:
        mod = ft.get_submodule(name)
        delta = mod.weight.detach() - base.get_submodule(name).weight.detach()
        xc = inputs(mod, cal)
        out[name] = (delta, 2 * xc.T @ xc / xc.shape[0], inputs(mod, held))
    return out


def _errors(delta, hessian, x):
    """Relative held-out output error ||X (Δ - Δ̂)ᵀ|| / ||X Δᵀ|| of rtn and obs (4-bit 2:4).

    obs with its saliency mask (``mask="obs"``), what this acceptance test is about: the default
    at 4 bits is now the random mask, whose layer error is larger by design (it is unbiased, and
    better at the model level; measured here 0.222 vs rtn's 0.201 on q_proj)."""
    s = CodecSettings(bits=4, sparsity="2:4")
    ref = float((x @ delta.T).norm())

    def err(codec, h):
        return float((x @ (delta - codec.decompress(codec.compress(delta, h))).T).norm()) / ref

    saliency = CodecSettings(bits=4, sparsity="2:4", options={"mask": "obs"})
    return err(get_codec("rtn")(s), None), err(get_codec("obs")(saliency), hessian)


@pytest.mark.parametrize("layer", LAYERS)
def test_obs_beats_rtn_on_heldout_layer_output(layer_data, layer):
    rtn, obs = _errors(*layer_data[layer])
    print(f"\n{layer}: held-out relative output error rtn {rtn:.3f}, obs {obs:.3f}, ratio {obs / rtn:.3f}")
    assert obs < BOUND * rtn


def test_bound_fails_without_error_feedback(layer_data, monkeypatch):
    """Control: keeping only the diagonal of the inverse-Hessian factor (no error spread to later
    columns) must lose obs's advantage, so the bound above really tests the error feedback."""
    real = obs_module.inverse_cholesky

    def diagonal_only(hessian, kp, damp, perm=None):
        u, dead = real(hessian, kp, damp, perm)
        return torch.diag(torch.diag(u)), dead

    monkeypatch.setattr(obs_module, "inverse_cholesky", diagonal_only)
    for layer in LAYERS:
        rtn, broken = _errors(*layer_data[layer])
        print(f"\n{layer}: without error feedback obs/rtn = {broken / rtn:.3f}")
        assert broken >= BOUND * rtn
