"""The playground's HTTP client: what a deployment serves, streamed chat, errors made readable.

Talks to any deltahub (or OpenAI/TGI-compatible) server through public routes only:
``GET /v1/models`` (the names), ``GET /info`` (TGI's keys; deltahub adds ``variants`` with
source, kind, codec, tier and bytes) and ``POST /v1/chat/completions`` with ``stream: true``
(OpenAI SSE: ``data: {chunk}`` lines ending with ``data: [DONE]``). Closing a stream early makes
the server abort the request. Needs httpx (the ``ui`` extra); no gradio here.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deltahub.errors import RemoteServerError

# Tiers in which a variant's weights are ready on the serving device: a request for it starts at
# once. Any other tier (host, disk, hub, ...) means the first request waits for a load.
WARM_TIERS = frozenset({"gpu", "device", "cuda", "resident", "active", "base"})


@dataclass(frozen=True)
class VariantCard:
    """One servable model as the playground shows it. ``warm`` is None when the server has no tiers."""

    name: str
    kind: str = ""  # "base", "delta", "lora", ... ("" until the server knows)
    source: str = ""
    codec: str = ""
    bytes: int | None = None
    tier: str = ""
    warm: bool | None = None

    def label(self) -> str:
        """Dropdown label, e.g. ``upper · delta · obs 4-bit 2:4 · 1.3 MB · cold``."""
        parts = [self.name, self.kind] if self.kind else [self.name]
        if self.codec:
            parts.append(self.codec)
        if self.bytes:
            parts.append(human_bytes(self.bytes))
        if self.warm is not None:
            parts.append("warm" if self.warm else "cold")
        return " · ".join(parts)

    def row(self) -> list[str]:
        """Row of the variants table: name, kind, source, codec, size, tier, state."""
        state = "" if self.warm is None else ("warm" if self.warm else "cold")
        size = human_bytes(self.bytes) if self.bytes else ""
        return [self.name, self.kind, self.source, self.codec, size, self.tier, state]


TABLE_HEADERS = ["variant", "kind", "source", "codec", "size", "tier", "state"]


@dataclass
class ReplyStats:
    """Timing of one streamed reply. ``cold``: the variant was not resident when it was asked."""

    variant: str
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    tokens: int = 0
    finish_reason: str | None = None
    cold: bool | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate: tokens after the first over the time after the first (None below 2 tokens)."""
        if self.first_token_s is None or self.tokens < 2 or self.elapsed_s <= self.first_token_s:
            return None
        return (self.tokens - 1) / (self.elapsed_s - self.first_token_s)

    def summary(self) -> str:
        """One line, e.g. ``upper · first token 0.21 s · 38.5 tok/s · 24 tokens · cold (loaded)``."""
        parts = [self.variant]
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        parts.append(f"{self.tokens} tokens")
        if self.cold is not None:
            parts.append("cold (loaded)" if self.cold else "warm")
        if self.finish_reason and self.finish_reason not in ("stop", "eos_token"):
            parts.append(f"finish: {self.finish_reason}")
        return " · ".join(parts)


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling controls. ``temperature == 0`` is greedy; ``top_p == 1`` is not sent."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 128
    system_prompt: str = ""


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- parsing


def parse_variants(models: dict[str, Any], info: dict[str, Any] | None) -> list[VariantCard]:
    """Merge ``/v1/models`` (names, in order) with ``/info`` (details); base first.

    Shapes: models ``{"data": [{"id": str, ...}]}``; info ``{"model_id": str, "variants":
    [{"name", "source", "kind", "tier", "bytes", "codec"?}]}`` (``variants`` optional)."""
    info = info or {}
    details = {str(v.get("name")): v for v in info.get("variants") or [] if isinstance(v, dict)}
    base_id = info.get("model_id")
    names = [str(m["id"]) for m in models.get("data") or [] if isinstance(m, dict) and m.get("id")]
    names += [n for n in details if n not in names]
    cards = []
    for name in names:
        d = {**_model_entry(models, name), **details.get(name, {})}
        kind = str(d.get("kind") or ("base" if name == base_id else ""))
        tier = str(d.get("tier") or ("resident" if kind == "base" else ""))
        warm = None if not tier else tier.lower() in WARM_TIERS
        cards.append(VariantCard(
            name=name, kind=kind, source=str(d.get("source") or (base_id if kind == "base" else "") or ""),
            codec=_codec_text(d.get("codec")), bytes=_int_or_none(d.get("bytes")), tier=tier, warm=warm,
        ))
    cards.sort(key=lambda c: c.kind != "base")
    return cards


def _model_entry(models: dict[str, Any], name: str) -> dict[str, Any]:
    for m in models.get("data") or []:
        if isinstance(m, dict) and m.get("id") == name:
            return {k: v for k, v in m.items() if k in ("kind", "source", "tier", "bytes", "codec")}
    return {}


def _codec_text(codec: Any) -> str:
    if isinstance(codec, dict):  # e.g. {"name": "obs", "bits": 4, "sparsity": "2:4"}
        name = codec.get("name") or codec.get("codec") or ""
        bits = f"{codec['bits']}-bit" if codec.get("bits") else ""
        sparsity = codec.get("sparsity") if codec.get("sparsity") not in (None, "none", "") else ""
        return " ".join(str(p) for p in (name, bits, sparsity) if p)
    return str(codec or "")


def _int_or_none(x: Any) -> int | None:
    try:
        return int(x) if x is not None else None
    except (TypeError, ValueError):
        return None


def error_from_response(status: int, body: bytes | str, *, variant: str | None = None) -> RemoteServerError:
    """Map an HTTP error reply (OpenAI ``{"error": {"message", "type", "code"}}``, TGI ``{"error",
    "error_type"}`` or FastAPI ``{"detail"}``) to a RemoteServerError with a readable message."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        payload = json.loads(text)
    except ValueError:
        payload = text
    message, etype = _error_fields(payload)
    message = message or f"HTTP {status}"
    low = f"{etype} {message}".lower()
    if status in (401, 403):
        kind, head = "auth", "Not authorised (check the API key)"
    elif status == 429:
        kind, head = "overloaded", "Server overloaded, try again shortly"
    elif _names_unknown_variant(low) or (status == 404 and variant):
        kind, head = "unknown_variant", f"Unknown variant {variant!r}" if variant else "Unknown variant"
    elif status == 503:
        kind, head = "unavailable", "Server unavailable"
    elif status in (400, 413, 422):
        kind, head = "validation", "Request rejected"
    else:
        kind, head = "generation", "Generation failed"
    said = message if head.split(" (")[0].split(",")[0].lower() in message.lower() else f"{head}: {message}"
    return RemoteServerError(f"{said} (HTTP {status})", kind=kind, status=status)


def _names_unknown_variant(text: str) -> bool:
    about = any(w in text for w in ("variant", "model", "adapter"))
    return about and any(w in text for w in ("unknown", "not found", "not_found", "does not exist"))


def _error_fields(payload: Any) -> tuple[str, str]:
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message") or ""), f"{err.get('type') or ''} {err.get('code') or ''}"
        if isinstance(err, list):  # FastAPI validation detail
            return "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in err), ""
        if err is not None:
            return str(err), str(payload.get("error_type") or "")
        return str(payload.get("message") or ""), str(payload.get("type") or "")
    return str(payload or "").strip()[:500], ""


def _unreachable(url: str, exc: Exception) -> RemoteServerError:
    return RemoteServerError(f"Server unreachable at {url}: {type(exc).__name__}: {exc}".rstrip(": "),
                             kind="unavailable")


# ----------------------------------------------------------------------------- client


class PlaygroundClient:
    """HTTP client of one server. Stateless between calls (each call opens its own connection),
    so it can be shared by every browser session of the playground."""

    def __init__(self, server_url: str, api_key: str | None = None, *, timeout_s: float = 300.0):
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client(self):
        import httpx

        timeout = httpx.Timeout(self.timeout_s, connect=5.0)
        return httpx.AsyncClient(base_url=self.server_url, headers=self._headers(), timeout=timeout)

    async def _get_json(self, client, path: str, *, optional: bool = False) -> dict[str, Any] | None:
        import httpx

        try:
            r = await client.get(path)
        except httpx.HTTPError as e:
            raise _unreachable(self.server_url, e) from e
        if r.status_code >= 400:
            if optional and r.status_code in (404, 405):
                return None
            raise error_from_response(r.status_code, r.content)
        try:
            return r.json()
        except ValueError as e:
            raise RemoteServerError(f"{path} did not return JSON", kind="generation",
                                    status=r.status_code) from e

    async def variants(self) -> list[VariantCard]:
        """Base and variants from ``/v1/models`` + ``/info`` (``/info`` is optional: plain OpenAI
        servers have none)."""
        async with self._client() as client:
            models = await self._get_json(client, "/v1/models")
            info = await self._get_json(client, "/info", optional=True)
        return parse_variants(models or {}, info)

    async def stream_chat(self, variant: str, messages: list[dict[str, str]], settings: SamplingSettings,
                          *, cold: bool | None = None) -> AsyncIterator[tuple[str, ReplyStats]]:
        """Stream one chat reply: yields ``(text_delta, stats)`` per chunk with text, then once more
        ``("", stats)`` with the final stats. ``messages``: OpenAI ``[{"role", "content"}]`` without
        the system prompt (added from ``settings``). Raises RemoteServerError. Closing the
        generator early closes the connection, which aborts the request on the server."""
        import httpx

        body = self.chat_body(variant, messages, settings)
        stats = ReplyStats(variant=variant, cold=cold)
        async with self._client() as client:
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code >= 400:
                        raise error_from_response(r.status_code, await r.aread(), variant=variant)
                    async for data in _sse_data(r.aiter_lines()):
                        if data == "[DONE]":
                            break
                        text = self._apply_chunk(data, stats, variant)
                        if text:
                            yield text, stats
            except httpx.HTTPError as e:
                raise _unreachable(self.server_url, e) from e
        stats.elapsed_s = time.perf_counter() - stats.started
        yield "", stats

    @staticmethod
    def chat_body(variant: str, messages: list[dict[str, str]], settings: SamplingSettings) -> dict[str, Any]:
        """The JSON of ``POST /v1/chat/completions`` for these messages and settings."""
        msgs = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt.strip()
                else []) + [{"role": m["role"], "content": m["content"]} for m in messages]
        body: dict[str, Any] = {
            "model": variant, "messages": msgs, "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": int(settings.max_tokens), "temperature": float(settings.temperature),
        }
        if settings.top_p < 1.0:
            body["top_p"] = float(settings.top_p)
        return body

    @staticmethod
    def _apply_chunk(data: str, stats: ReplyStats, variant: str) -> str:
        """Update ``stats`` from one chunk; return its text. Error events raise."""
        try:
            chunk = json.loads(data)
        except ValueError as e:
            raise RemoteServerError(f"Malformed stream event: {data[:200]!r}", kind="generation") from e
        if not isinstance(chunk, dict):
            raise RemoteServerError(f"Malformed stream event: {data[:200]!r}", kind="generation")
        if "error" in chunk:
            status = chunk.get("status") if isinstance(chunk.get("status"), int) else 500
            err = error_from_response(status, json.dumps(chunk), variant=variant)
            raise RemoteServerError(f"{err} (mid-stream)", kind=err.kind, status=err.status)
        text = ""
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content") or ""
            if content:  # one chunk per token until the usage chunk gives the exact count
                text += content
                stats.tokens += 1
            if choice.get("finish_reason"):
                stats.finish_reason = choice["finish_reason"]
        now = time.perf_counter() - stats.started
        if text and stats.first_token_s is None:
            stats.first_token_s = now
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            stats.tokens = int(usage["completion_tokens"])
        stats.elapsed_s = now
        return text


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` payloads of an SSE stream (multi-line data joined by newlines; comments and
    other fields ignored)."""
    buf: list[str] = []
    async for line in lines:
        if line == "":
            if buf:
                yield "\n".join(buf)
                buf = []
        elif line.startswith("data:"):
            buf.append(line[5:].removeprefix(" "))
    if buf:
        yield "\n".join(buf)
