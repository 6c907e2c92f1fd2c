"""Layers that add, per token, the delta of that token's variant to a resident base weight.

Every layer holds static per-slot pools (``[S, ...]`` tensors, S = number of GPU slots) with the
packed parts of the resident deltas, and a ``map`` [S + 1] int32 that sends a token's slot index
(S for base-only tokens) to the pool row (-1 = no delta of that kind). A forward never syncs
with the host: the per-step ``slot_idx`` [T] (long, S for the base) selects everything.

    DeltaLinear     y = x Wᵀ (+ b)  + sbmm(x, qlinear Δ)  + sgmv(x, LoRA)  + dense Δ (grouped by slot)
    DeltaEmbedding  e = W[ids]      + embedding_delta(ids, qlinear Δ)  + dense Δ rows
Rows a fine-tune added to its vocabulary (``extra_rows``: values, not deltas) go to per-slot pools
of the embedding and lm_head: token ids >= V look them up, and logits grow to [T, V + A] with
-inf beyond the rows of each token's variant.
    DeltaRMSNorm    y = (w + Δw[slot]) * rmsnorm(x)       (1-D deltas kept in float32)
Parts of deltas are written by ``write_slot`` after ``prepare`` allocated the pools they need
(the runner calls prepare on the main stream and write_slot on its copy stream). On CUDA, linear
layers keep 2:4 2/4-bit deltas in the GPU slot layout (``kernels/layout.py``: repacked once in
write_slot, same bytes) and apply them with ``kernels.sbmm_device``. A ``SlotShare`` (one per
forward, ``slot_share.py``) lets the layers of a step share the grouping of the tokens by slot and
the permuted copy of an input; without one each layer makes its own.
With ``dequantize`` (EngineConfig.cpu_dequantize_deltas, CPU only) a qlinear delta is stored as
``format.dequantize`` gives it -- the values the reference kernels compute every step -- once, when
it enters its slot: exact and far faster on the CPU, at the memory of a dense delta per slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deltahub.server.errors import VariantLoadError
from deltahub.server.models.slot_share import SlotShare
from torch import nn

from deltahub.format import PackedTensor, dequantize

QPARTS = ("qweight", "scales", "meta", "qweight_hi")


def _kernels():
    from deltahub import kernels

    return kernels


def _slot_layout():
    from deltahub.kernels import layout

    return layout


def _layout_key(p: PackedTensor) -> tuple:
    lay = p.layout
    assert lay is not None
    return (lay.bits, lay.sparse, lay.group_size)


class _Pools:
    """The per-slot pools of one weight matrix [N, K] (qlinear per layout, LoRA, dense)."""

    def __init__(
        self,
        n: int,
        k: int,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        dequantize: bool = False,
        slot_layout: bool = False,
    ) -> None:
        self.n, self.k, self.s = n, k, num_slots
        self.slot_layout = slot_layout  # repack supported qlinear deltas for sbmm_device (CUDA)
        # host-side copy of each map's live slots (map[s] == s): ("q", layout key), "lora", "dense";
        # a tuning hint, and what lets a step skip pools its tokens do not use (SlotShare.used)
        self.held: dict[object, set[int]] = {}
        self.dtype, self.device = dtype, device
        self.dequantize = dequantize  # qlinear deltas stored dequantized (the CPU fast path)
        self.q: dict[tuple, dict[str, torch.Tensor]] = {}
        self.lora: dict[str, torch.Tensor] | None = None
        self.dense: dict[str, torch.Tensor] | None = None
        self.vocab_rows = False  # embedding / lm_head: may carry rows a fine-tune added
        self.extra: dict[str, torch.Tensor] | None = None  # rows [S, A, K], n [S + 1] rows per slot

    def _map(self) -> torch.Tensor:
        return torch.full((self.s + 1,), -1, dtype=torch.int32, device=self.device)

    def prepare(self, p: PackedTensor, what: str) -> None:
        if tuple(p.shape) != (self.n, self.k):
            raise VariantLoadError(f"{what}: delta shape {p.shape} != base shape {(self.n, self.k)}")
        if "extra_rows" in p.parts:
            self._prepare_extra(p.parts["extra_rows"], what)
        if p.kind == "qlinear" and self.dequantize:
            self.prepare(PackedTensor("dense", p.shape, {"delta": torch.empty(0)}), what)
        elif p.kind == "qlinear":
            key = _layout_key(p)
            if key not in self.q and self._use_slot_layout(p):
                lay = _slot_layout()
                assert p.layout is not None
                pool = {
                    "dw": torch.zeros(
                        (self.s, *lay.device_shape(p.layout, self.n, self.k)),
                        dtype=torch.int16,
                        device=self.device,
                    ),
                    "scales": torch.zeros(
                        (self.s, *p.parts["scales"].shape), dtype=torch.float32, device=self.device
                    ),
                    "map": self._map(),
                }
                self.q[key] = pool
            elif key not in self.q:
                pool = {
                    name: torch.zeros((self.s, *t.shape), dtype=t.dtype, device=self.device)
                    for name, t in p.parts.items()
                    if name in QPARTS
                }
                pool["map"] = self._map()
                self.q[key] = pool
        elif p.kind == "lowrank":
            r = p.parts["lora_A"].shape[0]
            old = self.lora
            if old is None or old["a"].shape[1] < r:
                a = torch.zeros(self.s, r, self.k, dtype=self.dtype, device=self.device)
                b = torch.zeros(self.s, self.n, r, dtype=self.dtype, device=self.device)
                m = self._map()
                if old is not None:  # grow the rank; zero padding adds nothing
                    ro = old["a"].shape[1]
                    a[:, :ro] = old["a"]
                    b[:, :, :ro] = old["b"]
                    m.copy_(old["map"])
                self.lora = {"a": a, "b": b, "map": m}
        elif p.kind == "dense":
            if self.dense is None:
                self.dense = {
                    "w": torch.zeros(self.s, self.n, self.k, dtype=self.dtype, device=self.device),
                    "map": self._map(),
                }
        else:
            raise VariantLoadError(f"{what}: unsupported delta kind {p.kind!r}")

    def _use_slot_layout(self, p: PackedTensor) -> bool:
        # bf16 / fp16 activations, scales per row or per a multiple of 64 inputs (layout.supported):
        # all checked on the H200 by tests/kernels/test_gpu.py (2026-11-28)
        return (
            self.slot_layout
            and self.device.type == "cuda"
            and self.dtype in (torch.bfloat16, torch.float16)
            and p.layout is not None
            and _slot_layout().supported(p.layout)
        )

    def _prepare_extra(self, rows: torch.Tensor, what: str) -> None:
        if not self.vocab_rows:
            raise VariantLoadError(f"{what}: added rows are only possible for the embedding and lm_head")
        if rows.dim() != 2 or rows.shape[1] != self.k:
            raise VariantLoadError(f"{what}: added rows of shape {tuple(rows.shape)}, not [A, {self.k}]")
        old = self.extra
        if old is None or old["rows"].shape[1] < rows.shape[0]:
            new = torch.zeros(self.s, rows.shape[0], self.k, dtype=self.dtype, device=self.device)
            n = torch.zeros(self.s + 1, dtype=torch.int32, device=self.device)
            if old is not None:  # grow; slots keep their rows
                new[:, : old["rows"].shape[1]] = old["rows"]
                n.copy_(old["n"])
            self.extra = {"rows": new, "n": n}

    def clear(self, slot: int) -> None:
        for held in self.held.values():
            held.discard(slot)
        for pool in (*self.q.values(), self.lora, self.dense):
            if pool is not None:
                pool["map"][slot] = -1
        if self.extra is not None:
            self.extra["n"][slot] = 0

    def write(self, slot: int, p: PackedTensor) -> None:
        rows = p.parts.get("extra_rows")
        if rows is not None:
            assert self.extra is not None
            self.extra["rows"][slot, : rows.shape[0]].copy_(rows, non_blocking=True)
            self.extra["n"][slot] = rows.shape[0]
        if p.kind == "qlinear" and self.dequantize:
            p = PackedTensor("dense", p.shape, {"delta": dequantize(p).to(self.dtype)})
        if p.kind == "qlinear":
            which: object = ("q", _layout_key(p))
            pool = self.q[_layout_key(p)]
            if "dw" in pool:  # repack on the device (the caller's stream), then into the slot
                assert p.layout is not None
                parts = {
                    name: p.parts[name].to(self.device, non_blocking=True) for name in ("qweight", "meta")
                }
                dev = _slot_layout().to_device_layout(
                    parts | {"scales": p.parts["scales"]}, p.layout, self.n, self.k
                )
                pool["dw"][slot].copy_(dev["dw"])
            for name, t in p.parts.items():
                if name in QPARTS and name in pool:
                    pool[name][slot].copy_(t, non_blocking=True)
        elif p.kind == "lowrank":
            which, pool = "lora", self.lora
            assert pool is not None
            a, b = p.parts["lora_A"], p.parts["lora_B"]
            r = a.shape[0]
            pool["a"][slot].zero_()
            pool["b"][slot].zero_()
            pool["a"][slot, :r].copy_(a, non_blocking=True)
            pool["b"][slot, :, :r].copy_(b, non_blocking=True)
        else:
            which, pool = "dense", self.dense
            assert pool is not None
            pool["w"][slot].copy_(p.parts["delta"].reshape(self.n, self.k), non_blocking=True)
        pool["map"][slot] = slot
        self.held.setdefault(which, set()).add(slot)

    def _slots(self, which: object, pool: dict, slot_idx: torch.Tensor, share: SlotShare | None):
        """(pool["map"][slot_idx] [T], its plan or None, how many slots the batch may touch here), from
        ``share`` where the step has them; None where no token of the batch has a delta in the pool."""
        held = self.held.get(which, set())
        if share is None:
            return pool["map"][slot_idx], None, len(held)
        live = share.touched(held)
        if not live:
            return None
        return (*share.mapped(live, pool["map"], slot_idx), len(live))

    def add_linear(
        self, x: torch.Tensor, y: torch.Tensor, slot_idx: torch.Tensor, share: SlotShare | None = None
    ) -> torch.Tensor:
        """y += Δ(x) for every token, x [T, K], y [T, N]."""
        for (bits, sparse, group), pool in self.q.items():
            got = self._slots(("q", (bits, sparse, group)), pool, slot_idx, share)
            if got is None:
                continue
            slots, plan_, active = got
            if "dw" in pool:
                y = _kernels().sbmm_device(
                    x,
                    pool["dw"],
                    pool["scales"],
                    slots,
                    bits=bits,
                    group_size=group,
                    k=self.k,
                    out=y,
                    plan_=plan_,
                    active=active or None,
                    x_perm=None if share is None else share.permuted(x, self.k),
                )
                continue
            y = _kernels().sbmm(
                x,
                pool["qweight"],
                pool["scales"],
                slots,
                bits=bits,
                sparse=sparse,
                group_size=group,
                k=self.k,
                meta=pool.get("meta"),
                qweight_hi=pool.get("qweight_hi"),
                out=y,
                plan_=plan_,
            )
        if self.lora is not None and (got := self._slots("lora", self.lora, slot_idx, share)) is not None:
            slots, plan_, _ = got
            y = _kernels().sgmv(x, self.lora["a"], self.lora["b"], slots, out=y, plan_=plan_)
        if self.dense is not None and (share is None or share.touched(self.held.get("dense", set()))):
            y = self._add_dense(x, y, slot_idx)
        return y

    def _add_dense(self, x: torch.Tensor, y: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """y += x Δᵀ for tokens whose slot holds a dense delta here."""
        assert self.dense is not None
        if x.device.type == "cpu":  # host syncs cost nothing here
            s = self.dense["map"][slot_idx]
            for slot in torch.unique(s[s >= 0]).tolist():
                idx = (s == slot).nonzero().squeeze(1)
                y[idx] += x[idx] @ self.dense["w"][slot].T
            return y
        s = self.dense["map"][slot_idx].long()
        every = (x @ self.dense["w"].reshape(self.s * self.n, self.k).T).view(-1, self.s, self.n)
        pick = every.gather(1, s.clamp(min=0).view(-1, 1, 1).expand(-1, 1, self.n)).squeeze(1)
        return y + pick * (s >= 0).unsqueeze(1).to(y.dtype)

    def extra_logits(self, x: torch.Tensor, y: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] -> [T, V + A]: scores of the rows variants added (-inf beyond a slot's own)."""
        assert self.extra is not None
        rows, n = self.extra["rows"], self.extra["n"]
        a = rows.shape[1]
        extra = torch.einsum("tk,tak->ta", x, rows[slot_idx.clamp(max=self.s - 1)])
        mask = torch.arange(a, device=x.device)[None, :] >= n[slot_idx][:, None]
        return torch.cat([y, extra.masked_fill(mask, float("-inf")).to(y.dtype)], dim=1)

    def lookup_extra(self, ids: torch.Tensor, e: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, K] of ids >= V (a variant's added tokens) taken from its added rows."""
        assert self.extra is not None
        rows = self.extra["rows"]
        j = (ids - self.n).clamp(min=0, max=rows.shape[1] - 1)
        found = rows[slot_idx.clamp(max=self.s - 1), j]
        return torch.where((ids >= self.n)[:, None], found.to(e.dtype), e)

    def add_rows(self, ids: torch.Tensor, e: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """e += Δ[ids] (embedding lookups), ids [T], e [T, K]."""
        if self.lora is not None:
            raise VariantLoadError("LoRA on embeddings is not supported")
        for (bits, sparse, group), pool in self.q.items():
            d = _kernels().embedding_delta(
                ids,
                pool["qweight"],
                pool["scales"],
                pool["map"][slot_idx],
                bits=bits,
                sparse=sparse,
                group_size=group,
                k=self.k,
                meta=pool.get("meta"),
                qweight_hi=pool.get("qweight_hi"),
            )
            e = e + d.to(e.dtype)
        if self.dense is not None:
            s = self.dense["map"][slot_idx].long()
            rows = self.dense["w"][s.clamp(min=0), ids]
            e = e + rows * (s >= 0).unsqueeze(1).to(e.dtype)
        return e


class _VectorPool:
    """Per-slot float32 deltas of a 1-D parameter (norm weight, bias): [S + 1, N], row S zero."""

    def __init__(self, n: int, num_slots: int, device: torch.device) -> None:
        self.n, self.s, self.device = n, num_slots, device
        self.d: torch.Tensor | None = None

    def prepare(self, p: PackedTensor, what: str) -> None:
        if p.kind != "dense" or tuple(p.parts["delta"].reshape(-1).shape) != (self.n,):
            raise VariantLoadError(
                f"{what}: expected a dense delta of shape ({self.n},), got {p.kind} {p.shape}"
            )
        if self.d is None:
            self.d = torch.zeros(self.s + 1, self.n, dtype=torch.float32, device=self.device)

    def clear(self, slot: int) -> None:
        if self.d is not None:
            self.d[slot].zero_()

    def write(self, slot: int, p: PackedTensor) -> None:
        assert self.d is not None
        self.d[slot].copy_(p.parts["delta"].reshape(-1), non_blocking=True)

    def effective(self, base: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """(base + Δ[slot]) per token, computed in float32 and rounded to base's dtype: [T, N]
        (or base itself when no variant has this delta)."""
        if self.d is None:
            return base
        return (base.float() + self.d[slot_idx]).to(base.dtype)


class DeltaModule(nn.Module):
    """A module with per-slot deltas for the parameters in ``delta_params``."""

    delta_params: tuple[str, ...] = ()

    def pools(self) -> dict[str, _Pools | _VectorPool]:
        raise NotImplementedError

    def prepare(self, deltas: dict[str, PackedTensor], prefix: str) -> None:
        for name, p in deltas.items():
            self.pools()[name].prepare(p, f"{prefix}.{name}")

    def write_slot(self, slot: int, deltas: dict[str, PackedTensor]) -> None:
        for name, pool in self.pools().items():
            pool.clear(slot)
            if name in deltas:
                pool.write(slot, deltas[name])

    def clear_slot(self, slot: int) -> None:
        for pool in self.pools().values():
            pool.clear(slot)


class DeltaLinear(DeltaModule):
    """Linear layer [out, in] (+ bias) with per-slot weight and bias deltas."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        dequantize: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.delta_params = ("weight", "bias") if bias else ("weight",)
        self._pools: dict[str, _Pools | _VectorPool] = {
            "weight": _Pools(
                out_features, in_features, num_slots, dtype, device, dequantize, slot_layout=True
            )
        }
        if bias:
            self._pools["bias"] = _VectorPool(out_features, num_slots, device)

    def pools(self) -> dict[str, _Pools | _VectorPool]:
        return self._pools

    def forward(
        self, x: torch.Tensor, slot_idx: torch.Tensor, share: SlotShare | None = None
    ) -> torch.Tensor:
        """x [T, in], slot_idx [T] -> [T, out]; ``share``: what the step's layers share (or None)."""
        if self.bias is None:
            y = F.linear(x, self.weight)
        else:
            bias_pool = self._pools["bias"]
            assert isinstance(bias_pool, _VectorPool)
            if bias_pool.d is None:
                y = F.linear(x, self.weight, self.bias)
            else:
                y = F.linear(x, self.weight) + bias_pool.effective(self.bias, slot_idx)
        w = self._pools["weight"]
        assert isinstance(w, _Pools)
        y = w.add_linear(x, y, slot_idx, share)
        return y if w.extra is None else w.extra_logits(x, y, slot_idx)


class DeltaEmbedding(DeltaModule):
    """Token embedding [V, H] with per-slot deltas of its rows."""

    delta_params = ("weight",)

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        dequantize: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, dim, dtype=dtype, device=device), requires_grad=False
        )
        self._pools = {"weight": _Pools(num_embeddings, dim, num_slots, dtype, device, dequantize)}

    def pools(self) -> dict[str, _Pools | _VectorPool]:
        return self._pools  # type: ignore[return-value]

    def forward(self, ids: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        pool = self._pools["weight"]
        if pool.extra is None:
            return pool.add_rows(ids, F.embedding(ids, self.weight), slot_idx)
        base_ids = ids.clamp(max=self.weight.shape[0] - 1)
        e = pool.add_rows(base_ids, F.embedding(base_ids, self.weight), slot_idx)
        return pool.lookup_extra(ids, e, slot_idx)


class DeltaRMSNorm(DeltaModule):
    """RMSNorm as in Llama (normalize in float32, scale in the input dtype) with per-slot Δweight."""

    delta_params = ("weight",)

    def __init__(
        self, dim: int, eps: float, num_slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self._pools = {"weight": _VectorPool(dim, num_slots, device)}

    def pools(self) -> dict[str, _Pools | _VectorPool]:
        return self._pools  # type: ignore[return-value]

    def forward(
        self, x: torch.Tensor, slot_idx: torch.Tensor, share: SlotShare | None = None
    ) -> torch.Tensor:
        """x [T, H], slot_idx [T] -> [T, H]. One kernel on CUDA (``kernels.rms_norm``), which with a
        ``share`` also writes the permuted copy the next projections read and offers it there."""
        d = self._pools["weight"].d  # type: ignore[union-attr]
        permute = share is not None and share.wants_permuted(x)
        y, yp = _kernels().rms_norm(
            x, self.weight, self.eps, delta=d, slot=None if d is None else slot_idx, permute=permute
        )
        if share is not None and yp is not None:
            share.offer(y, x.shape[1], yp)
        return y
