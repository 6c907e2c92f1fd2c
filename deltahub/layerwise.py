"""Run a transformers causal LM one decoder layer at a time, for calibration.

The model is built on the meta device (no memory); only the modules outside the decoder layers
(embeddings, rotary tables, final norm; never the lm_head) and one decoder layer at a time get
real weights. The inputs of every layer are found generically: the decoder layers are swapped
for recorders and the model's own forward runs once per batch, so embedding scaling, position
embeddings and attention masks are whatever the architecture computes. The same trick feeds the
last hidden states back in to capture the lm_head's inputs (after the final norm).

Shapes: ids [n, L]; hidden states are kept as a list of [b, L, hidden] batches.

Precision: on a GPU the float32 matmuls of these passes (layer forwards, Hessian accumulation) run
in TF32 (10-bit mantissa, float32 range and accumulation). Hidden states are stored in the
checkpoint's 16-bit dtype between layers anyway, and the codecs damp H by 1 % of its mean
diagonal, far above TF32's ~1e-3 relative rounding of the products; the codecs' own matmuls
(error feedback) stay in full float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deltahub.errors import UsageError


@contextmanager
def calibration_precision(device: torch.device) -> Iterator[None]:
    """TF32 float32 matmuls on CUDA for the duration (see the module docstring); a no-op on CPU."""
    if device.type != "cuda":
        yield
        return
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


class _Stop(Exception):
    """Raised by the lm_head pre-hook to end a forward pass early."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx``: records its extra arguments and passes the hidden
    states through (or returns ``replacement``)."""

    def __init__(self, idx: int, sink: dict[int, Any], replacement: torch.Tensor | None = None) -> None:
        super().__init__()
        self.idx, self.sink, self.replacement = idx, sink, replacement

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink[self.idx] = (hidden, args[1:], kwargs)
        return hidden if self.replacement is None else self.replacement


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            return name, mod
    raise UsageError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")


def _param_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None or getattr(module, "weight", None) is None:
        return None
    for name, mod in model.named_modules():
        if mod is module:
            return f"{name}.weight" if name else "weight"
    return None


class LayerwiseModel:
    """A meta-device skeleton of the causal LM in ``folder`` (its config.json) on ``device``."""

    def __init__(self, folder, device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(str(folder))
            config.use_cache = False
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                         attn_implementation="sdpa")
        except Exception as e:  # unknown or custom architectures
            raise UsageError(f"{folder}: transformers cannot build this architecture ({e})") from None
        self.model = model.eval()
        self.device = torch.device(device)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        prefix, self.layers = _find_layers(model, int(text_config.num_hidden_layers))
        self.layer_prefixes = [f"{prefix}.{i}." for i in range(len(self.layers))]
        self.embedding_name = _param_name(model, model.get_input_embeddings())
        self.lm_head = model.get_output_embeddings()
        self.lm_head_name = _param_name(model, self.lm_head)
        self.linear_names = {
            f"{p}{name}.weight" for p, layer in zip(self.layer_prefixes, self.layers, strict=True)
            for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)
        }
        self.param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self._kwargs: dict[int, dict[int, tuple]] = {}  # batch size -> layer -> (args, kwargs)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_of(self, name: str) -> int | None:
        """Index of the decoder layer a parameter belongs to (None outside the layers)."""
        for i, p in enumerate(self.layer_prefixes):
            if name.startswith(p):
                return i
        return None

    def group_of(self, name: str) -> str:
        """Tensor group: ``linear`` | ``embedding`` | ``lm_head`` | ``other``."""
        if name == self.embedding_name:
            return "embedding"
        if name == self.lm_head_name:
            return "lm_head"
        return "linear" if name in self.linear_names else "other"

    def _init_buffers(self, module: nn.Module, *, recurse: bool = True) -> None:
        for mod in module.modules() if recurse else [module]:
            if any(True for _ in mod.buffers(recurse=False)):
                self.model._init_weights(mod)  # recomputes non-persistent buffers (rotary tables)

    @torch.no_grad()
    def load_outer(self, fill: Callable[[str, torch.Tensor], None],
                   embedding_dtype: torch.dtype = torch.float32) -> None:
        """Give real weights to everything outside the decoder layers except the lm_head:
        ``fill(name, param)`` writes the value of parameter ``name`` into ``param`` in place.
        The input embedding may be kept in a 16-bit ``embedding_dtype`` (its output is cast
        back to float32) to halve its memory."""
        emb = self.model.get_input_embeddings()
        if embedding_dtype != torch.float32:
            emb.to(embedding_dtype)
            emb.register_forward_hook(lambda _m, _i, out: out.to(torch.float32))
        for name, mod in self._outer_modules():
            mod.to_empty(device=self.device, recurse=False)
            self._init_buffers(mod, recurse=False)
            for pname, p in mod.named_parameters(recurse=False):
                fill(f"{name}.{pname}" if name else pname, p)

    def _outer_modules(self) -> list[tuple[str, nn.Module]]:
        in_layers = {id(m) for layer in self.layers for m in layer.modules()}
        skip = {id(m) for m in self.lm_head.modules()} if self.lm_head is not None else set()
        return [(n, m) for n, m in self.model.named_modules() if id(m) not in in_layers | skip]

    def release_embedding(self) -> None:
        """Free the input embedding once the layer-0 inputs are known (later passes feed zeros)."""
        self.model.get_input_embeddings().to("meta")

    @torch.no_grad()
    def load_layer(self, i: int, fill: Callable[[str, torch.Tensor], None]) -> nn.Module:
        """Materialise decoder layer ``i`` on the device; ``fill(full_name, param)`` sets values."""
        layer = self.layers[i].to_empty(device=self.device)
        self._init_buffers(layer)
        for name, p in layer.named_parameters():
            fill(self.layer_prefixes[i] + name, p)
        return layer

    def parameter(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name)

    def release_layer(self, i: int) -> None:
        self.layers[i].to("meta")

    @torch.no_grad()
    def _outer_pass(self, ids: torch.Tensor | None, final: torch.Tensor | None = None) -> dict[int, Any]:
        """One forward through the skeleton with recorders in place of the layers: from ``ids``,
        or (``final`` given) from zeros with the last recorder returning ``final``."""
        sink: dict[int, Any] = {}
        real = list(self.layers)
        for i in range(len(real)):
            self.layers[i] = _Recorder(i, sink, final if i == len(real) - 1 else None)

        def stop(_mod, args, kwargs):
            sink["lm_head"] = args[0] if args else kwargs["input"]
            raise _Stop

        hook = self.lm_head.register_forward_pre_hook(stop, with_kwargs=True) if self.lm_head else None
        try:
            if final is None:
                assert ids is not None
                self.model(input_ids=ids.to(self.device), use_cache=False)
            else:  # only the positions matter: the last recorder returns ``final``
                self.model(inputs_embeds=torch.zeros_like(final), use_cache=False)
        except _Stop:
            pass
        finally:
            if hook is not None:
                hook.remove()
            for i, layer in enumerate(real):
                self.layers[i] = layer
        return sink

    def embed(self, ids: torch.Tensor, batch_size: int, store_dtype: torch.dtype) -> list[torch.Tensor]:
        """Layer-0 inputs of every batch of ``ids`` [n, L]; remembers each layer's extra args."""
        hidden = []
        for b in range(0, ids.shape[0], batch_size):
            with calibration_precision(self.device):
                sink = self._outer_pass(ids[b : b + batch_size])
            bs = sink[0][0].shape[0]
            self._kwargs.setdefault(bs, {i: sink[i][1:] for i in range(self.n_layers)})
            hidden.append(sink[0][0].to(store_dtype))
        return hidden

    @torch.no_grad()
    def run_layer(self, i: int, hidden: list[torch.Tensor]) -> None:
        """Replace every batch of ``hidden`` by the output of (materialised) layer ``i``."""
        layer = self.layers[i]
        for j, h in enumerate(hidden):
            args, kwargs = self._kwargs[h.shape[0]][i]
            with calibration_precision(self.device):
                out = layer(h.to(torch.float32), *args, **kwargs)
            hidden[j] = (out[0] if isinstance(out, tuple) else out).to(h.dtype)

    @torch.no_grad()
    def layer_hessians(self, i: int, hidden: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """H = 2 X Xᵀ / n [K, K] (float32) for every nn.Linear of layer ``i`` (full names),
        X its inputs over all batches. Linears reading the same tensor share one H."""
        layer = self.layers[i]
        prefix = self.layer_prefixes[i]
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        alias: dict[str, str] = {}
        seen: dict[tuple, tuple[torch.Tensor, str]] = {}

        def hook_for(name: str):
            def hook(_mod, args):
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape))
                if key in seen:
                    alias[name] = seen[key][1]
                    return
                seen[key] = (x, name)  # holding x keeps its memory from being reused this pass
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                if name not in sums:
                    sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                    counts[name] = 0
                sums[name].addmm_(x2.T, x2)
                counts[name] += x2.shape[0]
            return hook

        hooks = [mod.register_forward_pre_hook(hook_for(f"{prefix}{n}.weight"))
                 for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
        try:
            for h in hidden:
                seen.clear()
                args, kwargs = self._kwargs[h.shape[0]][i]
                with calibration_precision(self.device):
                    layer(h.to(torch.float32), *args, **kwargs)
        finally:
            seen.clear()
            for hk in hooks:
                hk.remove()
        for name, total in sums.items():
            total.mul_(2.0 / max(counts[name], 1))
        return {**sums, **{name: sums[owner] for name, owner in alias.items()}}

    @torch.no_grad()
    def lm_head_hessian(self, hidden: list[torch.Tensor]) -> torch.Tensor | None:
        """H [hidden, hidden] of the lm_head's inputs given the last layer's outputs ``hidden``
        (None if the model has no separate output projection to hook)."""
        if self.lm_head is None:
            return None
        total, count = None, 0
        for h in hidden:
            with calibration_precision(self.device):
                x = self._outer_pass(None, final=h.to(torch.float32)).get("lm_head")
            if x is None:
                return None
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            with calibration_precision(self.device):
                total = x2.T @ x2 if total is None else total.addmm_(x2.T, x2)
            count += x2.shape[0]
        return None if total is None else total * (2.0 / count)
