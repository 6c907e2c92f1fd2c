"""TGI's routes: ``POST /`` (a one-element array, or SSE when ``stream``), ``/generate``,
``/generate_stream`` (``data: {StreamResponse}`` events, the last one with ``generated_text`` and
``details``, no ``[DONE]``), ``/tokenize``, ``GET /info``, ``/health``, ``/metrics``.

The variant is ``parameters.adapter_id`` (LoRAX's ``adapter_source`` "hub"/"local"), else the
``x-adapter-id`` request header (for clients such as text-generation 0.7 that cannot send
adapter_id); none, "" or the base's id mean the base model.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator

from deltahub.server.api import errors, schemas
from deltahub.server.api.errors import ApiError
from deltahub.server.api.generation import Job, Opened, Server
from deltahub.server.api.metrics import CONTENT_TYPE
from deltahub.server.api.validation import check_lengths, check_tgi, parse_json
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

router = APIRouter()
health_router = APIRouter()

_FINISH = {"length": "length", "eos_token": "eos_token", "stop_sequence": "stop_sequence",
           "stop": "stop_sequence", "eos": "eos_token"}


def _server(request: Request) -> Server:
    return request.app.state.server


def finish_reason(reason: str | None) -> str:
    return _FINISH.get(reason or "length", "length")


class TokenTexts:
    """Per-token texts from the engine's incremental outputs: within one output the new text goes
    to its last non-special token, so joining the non-special token texts gives ``generated_text``;
    special tokens carry their own text (``special: true``) as TGI's do."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False):
                self.special.add(int(token_id))

    def tokens(self, out, top_n: int = 0) -> tuple[list[dict], list[list[dict]]]:
        ids = list(out.new_token_ids or [])
        lps = list(out.new_logprobs or []) + [None] * len(ids)
        tops = list(out.new_top_logprobs or []) + [None] * len(ids)
        last_plain = max((i for i, t in enumerate(ids) if t not in self.special), default=-1)
        toks, top_tokens = [], []
        for i, t in enumerate(ids):
            special = t in self.special
            text = self.text_of(t) if special else (out.new_text if i == last_plain else "")
            toks.append({"id": int(t), "text": text, "logprob": lps[i], "special": special})
            if top_n:
                top_tokens.append([{"id": int(a), "text": self.text_of(a), "logprob": float(b),
                                    "special": a in self.special} for a, b in (tops[i] or [])[:top_n]])
        return toks, top_tokens

    def text_of(self, token_id: int) -> str:
        if token_id in self.special:
            return str(self.tok.convert_ids_to_tokens(int(token_id)))
        return self.tok.decode([int(token_id)], skip_special_tokens=False)


def _variant_name(request: Request, p: schemas.GenerateParameters) -> str | None:
    return p.adapter_id if p.adapter_id is not None else request.headers.get("x-adapter-id")


def _sampling_params(c, max_new_tokens: int, *, top_n: int, prefill: bool, seed: int | None):
    from deltahub.server.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=c.temperature if c.sampling else 0.0,
        top_k=c.top_k if c.sampling else 0, top_p=c.top_p if c.sampling else 1.0,
        repetition_penalty=c.repetition_penalty, frequency_penalty=c.frequency_penalty, seed=seed,
        stop=list(c.stop), logprobs=True, top_logprobs=top_n, prompt_logprobs=prefill)


async def _prepare(srv: Server, request: Request, req: schemas.GenerateRequest, *, stream: bool):
    """Validate, resolve the variant, tokenize: -> (jobs, checked, tokenizer)."""
    started = time.monotonic()
    p = req.parameters
    c = check_tgi(p, req.inputs, srv.config.limits, stream=stream)
    variant, label = await srv.resolve(_variant_name(request, p), source=p.adapter_source)
    ids = srv.encode(variant, req.inputs)
    if c.truncate is not None:
        ids = ids[-c.truncate:]
    if not ids:
        raise errors.validation("`inputs` cannot be empty", param="inputs")
    max_new = check_lengths(len(ids), c.max_new_tokens, srv.config.limits)
    jobs = []
    for _ in range(c.best_of):
        seed = c.seed
        if seed is None and c.sampling:
            seed = random.getrandbits(63)  # reported in details, as TGI does
        params = _sampling_params(c, max_new, top_n=c.top_n_tokens, prefill=p.decoder_input_details,
                                  seed=seed)
        jobs.append(Job(prompt_ids=ids, params=params, variant=variant, label=label, started=started))
    return jobs, c, TokenTexts(srv.tokenizer(variant))


def _prefill(texts: TokenTexts, out) -> list[dict]:
    lps = list(out.prompt_logprobs or [])
    lps = [None] * (len(out.prompt_token_ids) - len(lps)) + lps
    return [{"id": int(t), "text": texts.text_of(t), "logprob": lp}
            for t, lp in zip(out.prompt_token_ids, lps, strict=True)]


async def _collect(srv: Server, job: Job, texts: TokenTexts, top_n: int):
    toks, tops, last = [], [], None
    async for out in srv.stream(job):
        a, b = texts.tokens(out, top_n)
        toks += a
        tops += b
        last = out
    return last, toks, tops


async def _generate(srv: Server, request: Request, req: schemas.GenerateRequest) -> tuple[dict, dict]:
    jobs, c, texts = await _prepare(srv, request, req, stream=False)
    runs = asyncio.gather(*(_collect(srv, j, texts, c.top_n_tokens) for j in jobs))
    results = await srv.watched(request, runs)
    prefix = req.inputs if req.parameters.return_full_text else ""

    def seq(i):
        out, toks, tops = results[i]
        d = {"generated_text": prefix + out.text, "finish_reason": finish_reason(out.finish_reason),
             "generated_tokens": len(out.token_ids), "seed": jobs[i].params.seed if c.sampling else None,
             "prefill": _prefill(texts, out) if req.parameters.decoder_input_details else [],
             "tokens": toks, "top_tokens": tops}
        return d

    def score(i):
        return sum(t["logprob"] or 0.0 for t in results[i][1])

    best = max(range(len(jobs)), key=score)
    out = results[best][0]
    body = {"generated_text": prefix + out.text}
    if req.parameters.details or req.parameters.decoder_input_details:
        details = seq(best)
        details.pop("generated_text")
        if len(jobs) > 1:
            details["best_of_sequences"] = [seq(i) for i in range(len(jobs)) if i != best]
        body["details"] = details
    t = srv.timing(jobs[best], out)
    headers = t.headers(srv.config.compute_type, len(jobs[best].prompt_ids), jobs[best].label,
                        len(req.inputs))
    return body, headers


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream_events(opened: Opened, req: schemas.GenerateRequest, c, texts) -> AsyncIterator[str]:
    job = opened.job
    prefix = req.inputs if req.parameters.return_full_text else ""
    index = 0
    try:
        async for out in opened.outputs():
            toks, tops = texts.tokens(out, c.top_n_tokens)
            for i, tok in enumerate(toks):
                index += 1
                event = {"index": index, "token": tok, "top_tokens": tops[i] if tops else [],
                         "generated_text": None, "details": None}
                if out.finished and i == len(toks) - 1:
                    event["generated_text"] = prefix + out.text
                    if req.parameters.details:
                        event["details"] = {"finish_reason": finish_reason(out.finish_reason),
                                            "generated_tokens": len(out.token_ids),
                                            "seed": job.params.seed if c.sampling else None,
                                            "input_length": len(job.prompt_ids)}
                yield sse(event)
    except ApiError as e:
        yield sse(errors.error_body(e, openai=False))


async def _stream_response(srv: Server, request: Request, req: schemas.GenerateRequest) -> Response:
    jobs, c, texts = await _prepare(srv, request, req, stream=True)
    opened = await srv.open(jobs[0])
    headers = {"x-compute-type": srv.config.compute_type, "x-compute-characters": str(len(req.inputs)),
               "x-accel-buffering": "no", "cache-control": "no-cache", "x-adapter-id": jobs[0].label,
               "x-prompt-tokens": str(len(jobs[0].prompt_ids))}
    return StreamingResponse(_stream_events(opened, req, c, texts), media_type="text/event-stream",
                             headers=headers, background=BackgroundTask(opened.release))


@router.post("/", summary="TGI: generate (a one-element array) or stream with `stream: true`")
async def compat_generate(request: Request):
    srv = _server(request)
    req = await parse_json(request, schemas.CompatGenerateRequest)
    if req.stream:
        return await _stream_response(srv, request, req)
    body, headers = await _generate(srv, request, req)
    return JSONResponse([body], headers=headers)


@router.post("/generate", summary="TGI: generate text")
async def generate(request: Request):
    srv = _server(request)
    req = await parse_json(request, schemas.GenerateRequest)
    body, headers = await _generate(srv, request, req)
    return JSONResponse(body, headers=headers)


@router.post("/generate_stream", summary="TGI: stream tokens as server-sent events")
async def generate_stream(request: Request):
    srv = _server(request)
    req = await parse_json(request, schemas.GenerateRequest)
    return await _stream_response(srv, request, req)


@router.post("/tokenize", summary="TGI: tokenize `inputs` with the variant's tokenizer")
async def tokenize(request: Request):
    srv = _server(request)
    req = await parse_json(request, schemas.GenerateRequest)
    p = req.parameters
    variant, _ = await srv.resolve(_variant_name(request, p), source=p.adapter_source)
    enc = srv.tokenizer(variant)(req.inputs, add_special_tokens=True, return_offsets_mapping=True)
    return [{"id": int(t), "text": req.inputs[a:b], "start": a, "stop": b}
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def variant_entries(srv: Server) -> list[dict]:
    """``/info``'s variants: name, source, kind, tier, bytes, codec (+ slot, counters, error)."""
    out = []
    for v in srv.variants():
        entry = {"name": v.name, "source": str(getattr(v, "source", "") or ""),
                 "kind": srv.kind_of(v), "tier": str(getattr(v, "tier", "") or ""),
                 "bytes": getattr(v, "bytes", None), "codec": srv.codec_of(v)}
        for key in ("slot", "running", "requests", "generated_tokens", "cold_loads", "load_seconds", "error"):
            if hasattr(v, key):
                entry[key] = getattr(v, key)
        out.append(entry)
    return out


@router.get("/info", summary="TGI: served model info (+ deltahub's `variants`)")
async def info(request: Request):
    srv = _server(request)
    cfg, lim = srv.config, srv.config.limits
    facts = srv.engine_info()
    return {"model_id": cfg.model_id, "model_sha": None, "model_dtype": facts.get("model_dtype"),
            "model_device_type": facts.get("model_device_type", cfg.compute_type),
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": cfg.max_concurrent_requests, "max_best_of": lim.max_best_of,
            "max_stop_sequences": lim.max_stop_sequences, "max_input_tokens": lim.max_input_tokens,
            "max_input_length": lim.max_input_tokens, "max_total_tokens": lim.max_total_tokens,
            "validation_workers": 1, "max_client_batch_size": lim.max_client_batch_size,
            "router": "deltahub", "version": cfg.version, "sha": None, "docker_label": None,
            "dynamic_variants": cfg.dynamic_variants, "variants": variant_entries(srv),
            "stats": srv.engine_stats()}


@health_router.get("/health", summary="200 when the engine is running, 503 otherwise (no auth)")
async def health(request: Request):
    if not _server(request).healthy():
        raise ApiError(503, "unhealthy", error_type="healthcheck")
    return Response(status_code=200)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE)
