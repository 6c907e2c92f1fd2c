"""The compression pipeline: (base, fine-tune) -> a delta folder.

Tensors are streamed from memory-mapped safetensors, one at a time (never both whole models in
memory). Groups: ``linear`` (every nn.Linear of every decoder layer: the chosen codec),
``embedding`` and ``lm_head`` (compressed too; rows for tokens the fine-tune added are stored
whole as ``extra_rows``), ``other`` (norms, biases, anything else: dense float32 delta).

With a calibrating codec (``obs``) the model runs one decoder layer at a time
(deltahub.layerwise): layer i's linear inputs come from calibration text passed through the
base + already-compressed deltas of the embedding and layers < i, with layer i at its fine-tuned
weights; the lm_head's come from the compressed model's last hidden states. Embeddings are a
lookup (no input statistics) and use ``rtn`` at the same settings, unless tied to the lm_head,
in which case the one matrix is compressed with the lm_head's Hessian.
"""

from __future__ import annotations

import ctypes
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub import calibration
from deltahub.checkpoint import Checkpoint
from deltahub.codecs import Codec, CodecSettings, get_codec
from deltahub.codecs.base import concat_packed, row_chunks
from deltahub.codecs.rtn import RtnCodec
from deltahub.errors import ShapeMismatchError, UsageError
from deltahub.fingerprint import fingerprint
from deltahub.format import PackedTensor
from deltahub.sources import resolve_model
from deltahub.store import CONFIG_NAME, DeltaConfig, DeltaWriter, ModelRef

# Files copied from the fine-tune into the delta (and from the delta into a reconstruction).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
               "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")
GROUPS = ("linear", "embedding", "lm_head", "other")
CHUNK_BYTES = 16 << 20  # float32 bytes of a matrix compressed in one codec call at most (CPU)
GPU_CHUNK_BYTES = 1 << 30  # the same on a GPU: whole matrices, one inverse Cholesky factor each
MIN_SHARD_BYTES, MAX_SHARD_BYTES = 32 << 20, 4 << 30
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embeddings.weight")


@dataclass
class CompressConfig:
    """Settings of one compression run (the CLI's flags)."""

    method: str = "obs"
    bits: int = 4
    sparsity: str = "2:4"
    group_size: int | None = None
    calibration_samples: int = 128
    seq_len: int = 512
    calibration_data: str | None = None
    lossless: str = "zstd"
    device: str = "cpu"
    batch_tokens: int | None = None  # calibration tokens per forward batch (None: 1024 CPU, 8192 GPU)
    options: dict[str, Any] = field(default_factory=dict)  # codec-specific (e.g. damp)
    distill_steps: int = 0  # > 0: tune the scales against the fine-tune's logits (deltahub.distill)
    distill_per_row: bool = False  # one distilled factor per stored scale, not per matrix
    vocab_bits: int | None = None  # bits of the embedding and lm_head deltas (None: ``bits``)
    vocab_sparsity: str | None = None  # their sparsity (None: ``sparsity``)


def resolve_device(name: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` -> torch.device; UsageError if unusable."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to torch here")
    return dev


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files present in ``src``; returns names."""
    copied = []
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _heuristic_group(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith(EMBEDDING_NAMES):
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    in_layer = any(part.isdigit() for part in name.split("."))
    return "linear" if in_layer and name.endswith(".weight") and len(shape) == 2 else "other"


class _Plan:
    """Which base tensor each fine-tune tensor is a delta against, and its group. Checks that
    architectures, names and shapes agree (ShapeMismatchError otherwise)."""

    def __init__(self, cb: Checkpoint, cf: Checkpoint, skel) -> None:
        bc, fc = cb.config(), cf.config()
        b_arch = (bc.get("architectures"), bc.get("model_type"))
        f_arch = (fc.get("architectures"), fc.get("model_type"))
        if b_arch != f_arch:
            raise ShapeMismatchError(f"architecture mismatch: base is {b_arch[0]} ({b_arch[1]}), "
                                     f"fine-tune is {f_arch[0]} ({f_arch[1]})")
        self.names = cf.names()
        self.group = {n: skel.group_of(n) if skel else _heuristic_group(n, cf.shape(n)) for n in self.names}
        emb = next((n for n, g in self.group.items() if g == "embedding"), None)
        self.embedding = emb
        self.lm_head = next((n for n, g in self.group.items() if g == "lm_head"), None)
        self.tied = self.lm_head is None and bool(fc.get("tie_word_embeddings", False))
        self.base_name = {n: n for n in self.names}
        if self.lm_head and self.lm_head not in cb and emb in cb:  # base ties, fine-tune does not
            self.base_name[self.lm_head] = emb
        missing = [n for n in self.names if self.base_name[n] not in cb]
        used = set(self.base_name.values())
        extra = [n for n in cb.names() if n not in used and n != "lm_head.weight"]
        for what, lst in (("the base lacks", missing), ("the base has but the fine-tune lacks", extra)):
            if lst:
                raise ShapeMismatchError(f"tensor names differ: {len(lst)} tensor(s) {what}, e.g. "
                                         f"{', '.join(lst[:3])}")
        for n in self.names:
            bs, fs = cb.shape(self.base_name[n]), cf.shape(n)
            grows = self.group[n] in ("embedding", "lm_head") and len(fs) == 2 and len(bs) == 2
            ok = fs == bs or (grows and fs[1] == bs[1] and fs[0] > bs[0])
            if not ok:
                raise ShapeMismatchError(f"shape mismatch for {n}: base {list(bs)}, fine-tune {list(fs)}")


class _Compressor:
    """State of one run: checkpoints, writer, codecs; compresses one tensor at a time."""

    def __init__(self, cb: Checkpoint, cf: Checkpoint, plan: _Plan, writer: DeltaWriter,
                 device: torch.device) -> None:
        self.cb, self.cf, self.plan, self.writer, self.device = cb, cf, plan, writer, device
        self.done: set[str] = set()

    def _base(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self.cb.get(self.plan.base_name[name])
        return (t if rows is None else t[rows]).to(self.device).to(torch.float32)

    def _ft(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self.cf.get(name)  # moved in its stored dtype (fewer bytes), converted on the device
        return (t if rows is None else t[rows]).to(self.device).to(torch.float32)

    @torch.no_grad()
    def matrix(self, name: str, codec: Codec, hessian: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> None:
        """Compress Δ of a 2-D tensor; write base + Δ̂ (and added rows) into ``out`` if given."""
        n_base = self.cb.shape(self.plan.base_name[name])[0]
        k = self.cf.shape(name)[1]
        # only very tall matrices (embeddings) are split here; codecs bound their own work
        budget = GPU_CHUNK_BYTES if self.device.type == "cuda" else CHUNK_BYTES
        chunks = (row_chunks(n_base, k, self.device, budget_bytes=budget) if codec.row_separable
                  else [slice(0, n_base)])
        packs = []
        for rows in chunks:
            packed = codec.compress(self._ft(name, rows).sub_(self._base(name, rows)), hessian)
            if out is not None:  # base re-read (memory-mapped) rather than kept during compress
                out[rows].copy_(self._base(name, rows).add_(codec.decompress(packed)))
            packs.append(_to_cpu(packed))
        packed = concat_packed(packs, (n_base, k)) if len(packs) > 1 else packs[0]
        n_ft = self.cf.shape(name)[0]
        if n_ft > n_base:
            extra = self.cf.get(name)[n_base:].clone()
            packed.parts["extra_rows"] = extra
            if out is not None:
                out[n_base:].copy_(extra)
        self._add(name, packed)

    @torch.no_grad()
    def matrix_group(self, names: list[str], codec: Codec, hessian: torch.Tensor,
                     outs: list[torch.Tensor | None]) -> None:
        """Linears reading one input (one Hessian), e.g. q/k/v or gate/up: Δ compressed as one
        row-concatenated matrix (one inverse Cholesky factor, one pass over the columns), then
        split by rows. For a row-separable codec this equals compressing each one alone."""
        sizes = [self.cb.shape(self.plan.base_name[n])[0] for n in names]
        k = self.cf.shape(names[0])[1]
        delta = torch.cat([self._ft(n).sub_(self._base(n)) for n in names])
        packed = codec.compress(delta, hessian)
        del delta
        r0 = 0
        for name, rows, out in zip(names, sizes, outs, strict=True):
            parts = {p: t[r0 : r0 + rows] for p, t in packed.parts.items()}  # qlinear parts: [N, ...]
            part = PackedTensor(packed.kind, (rows, k), parts, codec=packed.codec, layout=packed.layout,
                                info=dict(packed.info))
            if out is not None:
                out.copy_(self._base(name).add_(codec.decompress(part)))
            self._add(name, _to_cpu(part))
            r0 += rows

    @torch.no_grad()
    def dense(self, name: str, out: torch.Tensor | None = None) -> None:
        """Store Δ exactly (float32); ``out`` receives the fine-tune's value."""
        ft = self._ft(name)
        self._add(name, PackedTensor("dense", tuple(ft.shape), {"delta": (ft - self._base(name)).cpu()},
                                     codec="dense"))
        if out is not None:
            out.copy_(ft)

    def _add(self, name: str, packed: PackedTensor) -> None:
        self.writer.add(name, packed, group=self.plan.group[name])
        self.done.add(name)


def _to_cpu(p: PackedTensor) -> PackedTensor:
    parts = {k: v.to("cpu") for k, v in p.parts.items()}
    return PackedTensor(p.kind, p.shape, parts, codec=p.codec, layout=p.layout, info=p.info)


def _in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn()`` in a daemon thread (an error elsewhere never waits for it); the returned
    callable waits for its result (re-raising its exception)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="deltahub-fingerprint", daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def _release_freed_memory() -> None:
    """On glibc: serve allocations >= 1 MiB with mmap and trim the heap, so memory freed after a
    layer goes back to the OS instead of fragmenting the heap (RSS would otherwise creep up layer
    after layer). Process-wide and harmless; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed value also stops its dynamic growth)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _prepare_output(output: Path, sources: list[Path]) -> None:
    output = output.resolve()
    if any(output == s.resolve() for s in sources):
        raise UsageError(f"--output {output} is one of the input model folders")
    if output.exists():
        if not output.is_dir():
            raise UsageError(f"--output {output} exists and is not a folder")
        if (output / CONFIG_NAME).is_file():  # replacing an earlier delta
            (output / CONFIG_NAME).unlink()
            for old in output.glob("delta*.safetensors"):
                old.unlink()
        elif any(output.iterdir()):
            raise UsageError(f"--output {output} exists and is not empty")
    output.mkdir(parents=True, exist_ok=True)


def compress(base: str | Path, finetuned: str | Path, output: str | Path,
             config: CompressConfig | None = None, *, token: str | None = None,
             progress: bool = True) -> DeltaConfig:
    """Compress ``finetuned`` against ``base`` (local folders or Hub ids) into folder ``output``.

    Returns the written DeltaConfig (``stats`` holds payload bytes and the ratio vs bf16).
    """
    from tqdm.auto import tqdm

    cfg = config or CompressConfig()
    start = time.time()
    _release_freed_memory()
    codec = get_codec(cfg.method)(CodecSettings(cfg.bits, cfg.sparsity, cfg.group_size, dict(cfg.options)))
    device = resolve_device(cfg.device)
    if cfg.lossless not in ("zstd", "none"):
        raise UsageError(f"lossless stage must be zstd or none, got {cfg.lossless!r}")
    if codec.needs_calibration and (cfg.calibration_samples < 1 or cfg.seq_len < 1):
        raise UsageError("--calibration-samples and --seq-len must be positive")
    if cfg.distill_steps < 0:
        raise UsageError(f"--distill-steps must be >= 0, got {cfg.distill_steps}")
    b, f = resolve_model(base, token=token), resolve_model(finetuned, token=token)
    cb, cf = Checkpoint(b.path), Checkpoint(f.path)
    calibrate = codec.needs_calibration
    skel = None
    if calibrate:
        from deltahub.layerwise import LayerwiseModel

        skel = LayerwiseModel(f.path, device)
    plan = _Plan(cb, cf, skel)
    if skel is not None:
        missing = sorted(n for n in skel.param_names if n not in cf and n != skel.lm_head_name)
        if missing:
            raise UsageError(f"{f.path}: checkpoint names differ from transformers' modules (e.g. "
                             f"{missing[0]}); calibration is impossible, use --method rtn")
    out = Path(output)
    _prepare_output(out, [b.path, f.path])
    writer = DeltaWriter(out, lossless_codec=cfg.lossless, max_shard_bytes=_shard_bytes(cf, codec))
    run = _Compressor(cb, cf, plan, writer, device)
    # hashing the weight files (sha256 releases the GIL) overlaps with the compression
    prints = _in_background(lambda: (fingerprint(b.path), fingerprint(f.path)))
    head_codec, emb_codec = _vocab_codecs(codec, cfg)
    groups: dict[str, dict[str, Any]] = {"linear": codec.describe(), "lm_head": head_codec.describe(),
                                         "embedding": (head_codec if plan.tied else emb_codec).describe(),
                                         "other": {"codec": "dense", "dtype": "float32"}}
    calib_info = None
    if calibrate:
        assert skel is not None
        from transformers import AutoTokenizer

        ids = calibration.calibration_ids(AutoTokenizer.from_pretrained(str(f.path)), cfg.calibration_samples,
                                          cfg.seq_len, cfg.calibration_data)
        calib_info = {"data": cfg.calibration_data or calibration.BUILTIN, "samples": cfg.calibration_samples,
                      "seq_len": cfg.seq_len}
        _calibrated(run, skel, codec, head_codec, emb_codec, ids, cfg, tqdm, progress)
    else:
        for name in tqdm(plan.names, desc="compress", unit="tensor", disable=not progress):
            if plan.group[name] == "other":
                run.dense(name)
            else:
                run.matrix(name, codec if plan.group[name] == "linear" else head_codec)
    for name in plan.names:  # anything the skeleton did not cover (persistent buffers, ...)
        if name not in run.done:
            run.dense(name)

    b_print, f_print = prints()
    stats = _stats(writer, cf, time.time() - start)
    dcfg = DeltaConfig(
        base_model=ModelRef(b.id if not b.is_local else str(b.path), b.revision, b_print),
        finetuned_model=ModelRef(f.id if not f.is_local else str(f.path), f.revision, f_print),
        architectures=list(cf.config().get("architectures") or []),
        compression={"method": codec.name, "lossless": cfg.lossless, "groups": groups,
                     "calibration": calib_info},
        stats=stats, tie_word_embeddings=plan.tied)
    copy_model_files(f.path, out)
    result = writer.finish(dcfg)
    if cfg.distill_steps > 0:
        from deltahub.distill import distill_scales
        from deltahub.store import DeltaReader

        distill_scales(out, base=b.path, finetuned=f.path, calibration_data=cfg.calibration_data,
                       steps=cfg.distill_steps, per_matrix=not cfg.distill_per_row, device=str(device))
        result = DeltaReader(out).config
    return result


@torch.no_grad()
def _calibrated(run: _Compressor, skel, codec: Codec, head_codec: Codec, emb_codec: Codec,
                ids: torch.Tensor, cfg: CompressConfig, tqdm, progress: bool) -> None:
    """The layer-by-layer pass (see the module docstring)."""
    plan = run.plan
    batch = max(1, (cfg.batch_tokens or (8192 if run.device.type == "cuda" else 1024)) // cfg.seq_len)
    ckpt_dtype = run.cf.dtype(plan.embedding or plan.names[0])
    store = ckpt_dtype if ckpt_dtype in (torch.float16, torch.bfloat16) else torch.float32
    bar = tqdm(total=skel.n_layers + 2, desc="compress", unit="step", disable=not progress)

    def outer(name: str, p: torch.Tensor) -> None:
        if name == plan.embedding and not plan.tied:
            run.matrix(name, emb_codec, out=p)
        elif name == plan.embedding:  # tied: compressed at the end with the lm_head's Hessian
            p.copy_(run._ft(name))
        else:
            run.dense(name, out=p)

    skel.load_outer(outer, embedding_dtype=store)
    hidden = skel.embed(ids, batch, store)
    skel.release_embedding()
    _release_freed_memory()
    bar.update()
    for i in range(skel.n_layers):
        layer_names = [n for n in plan.names if skel.layer_of(n) == i]
        skel.load_layer(i, lambda n, p: p.copy_(run._ft(n)))
        hessians = skel.layer_hessians(i, hidden)
        for names in _shared_input_groups(layer_names, plan, hessians, codec, run.device):
            ps = [skel.parameter(n) if n in skel.param_names else None for n in names]
            if len(names) > 1:
                run.matrix_group(names, codec, hessians[names[0]], ps)
            elif plan.group[names[0]] == "linear":
                run.matrix(names[0], codec, hessians.get(names[0]), out=ps[0])
            else:
                run.dense(names[0], out=ps[0])
            for n in names:
                hessians.pop(n, None)
        del hessians
        skel.run_layer(i, hidden)
        skel.release_layer(i)
        _release_freed_memory()
        bar.update()
    head = plan.lm_head or (plan.embedding if plan.tied else None)
    if head is not None:
        run.matrix(head, head_codec, skel.lm_head_hessian(hidden))
    bar.update()
    bar.close()


def _vocab_codecs(codec: Codec, cfg: CompressConfig) -> tuple[Codec, Codec]:
    """(lm_head codec, embedding codec): ``codec`` at ``vocab_bits`` / ``vocab_sparsity`` when
    set; the embedding has no input statistics, so a calibrating codec is replaced by ``rtn``
    there (a tied embedding is compressed as the lm_head)."""
    s = codec.settings
    bits = s.bits if cfg.vocab_bits is None else cfg.vocab_bits
    sparsity = s.sparsity if cfg.vocab_sparsity is None else cfg.vocab_sparsity
    head = codec
    if (bits, sparsity) != (s.bits, s.sparsity):
        head = type(codec)(CodecSettings(bits, sparsity, s.group_size, dict(s.options)))
    if not codec.needs_calibration:
        return head, head
    return head, RtnCodec(CodecSettings(bits, sparsity, s.group_size))


def _shared_input_groups(names: list[str], plan: _Plan, hessians: dict[str, torch.Tensor], codec: Codec,
                         device: torch.device) -> list[list[str]]:
    """``names`` in order, as lists: on a GPU with a row-separable codec, the linears sharing one
    Hessian (one input) form one list (compressed together); everything else stands alone. On
    the CPU every tensor stands alone (concatenating would cost host memory)."""
    if device.type != "cuda" or not codec.row_separable:
        return [[n] for n in names]
    groups: dict[int, list[str]] = {}
    out: list[list[str]] = []
    for n in names:
        h = hessians.get(n) if plan.group[n] == "linear" else None
        if h is None:
            out.append([n])
        elif id(h) in groups:
            groups[id(h)].append(n)
        else:
            groups[id(h)] = [n]
            out.append(groups[id(h)])
    return out


def _shard_bytes(cf: Checkpoint, codec: Codec) -> int:
    """Shard size aiming at about four shards (32 MiB to 4 GiB each): the writer then holds at
    most a quarter of the payload in memory, and downloads can fetch shards in parallel."""
    s = codec.settings
    bits_per_weight = s.bits / 2 + 1 if s.sparsity == "2:4" else s.bits
    estimate = int(sum(i.numel for i in cf.infos.values()) * bits_per_weight / 8)
    return min(max(estimate // 4, MIN_SHARD_BYTES), MAX_SHARD_BYTES)


def _stats(writer: DeltaWriter, cf: Checkpoint, seconds: float) -> dict[str, Any]:
    raw = sum(r["raw_bytes"] for r in writer.storage.values())
    stored = sum(r["stored_bytes"] for r in writer.storage.values())
    bf16 = 2 * sum(info.numel for info in cf.infos.values())
    return {"payload_bytes": stored, "packed_bytes": raw, "finetuned_bf16_bytes": bf16,
            "ratio_vs_bf16": round(bf16 / max(stored, 1), 3), "seconds": round(seconds, 1)}
