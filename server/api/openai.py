"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON, or SSE
``data: {chunk}`` lines ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a last
chunk with ``choices: []`` and ``usage``), ``GET /v1/models`` (base + variants).

``model`` picks the variant: its name, or the base (``None``, "", "tgi" or the base's id; then the
``x-adapter-id`` header may still name a variant). Chat prompts use that variant's chat template.
Errors use OpenAI's shape; parameter rules follow OpenAI's ranges (temperature 0 = greedy).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from deltahub.server.api import schemas
from deltahub.server.api.errors import ApiError, error_body
from deltahub.server.api.generation import BASE_ALIASES, Job, Opened, Server
from deltahub.server.api.tgi import TokenTexts
from deltahub.server.api.validation import check_lengths, parse_json
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


def _bad(msg: str, param: str | None = None) -> ApiError:
    return ApiError(422, msg, error_type="validation", param=param, code="invalid_parameter")


def _finish(reason: str | None) -> str:
    return "length" if reason in (None, "length") else "stop"


def _fingerprint(srv: Server) -> str:
    return f"deltahub-{srv.config.version}"


def _sse(payload: dict | str) -> str:
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _common_checks(srv: Server, r) -> list[str]:
    """Checks shared by chat and completions; returns the stop list."""
    if r.n not in (None, 1):
        raise _bad("`n` must be 1: this server returns one choice per prompt", "n")
    if r.temperature is not None and not 0.0 <= r.temperature <= 2.0:
        raise _bad("`temperature` must be >= 0 and <= 2", "temperature")
    if r.top_p is not None and not 0.0 < r.top_p <= 1.0:
        raise _bad("`top_p` must be > 0 and <= 1", "top_p")
    if r.top_k is not None and r.top_k < 0:
        raise _bad("`top_k` must be >= 0", "top_k")
    for name in ("frequency_penalty", "presence_penalty"):
        v = getattr(r, name)
        if v is not None and not -2.0 <= v <= 2.0:
            raise _bad(f"`{name}` must be >= -2.0 and <= 2.0", name)
    if r.repetition_penalty is not None and r.repetition_penalty <= 0:
        raise _bad("`repetition_penalty` must be strictly positive", "repetition_penalty")
    if r.seed is not None and not 0 <= r.seed < 2**64:
        raise _bad("`seed` must be >= 0 and < 2**64", "seed")
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    limit = srv.config.limits.max_stop_sequences
    if len(stop) > limit:
        raise _bad(f"`stop` supports up to {limit} stop sequences. Given: {len(stop)}", "stop")
    if any(s == "" for s in stop):
        raise _bad("`stop` sequences cannot be empty", "stop")
    if r.logit_bias:
        raise _bad("`logit_bias` is not supported by this server", "logit_bias")
    return stop


def _params(r, stop: list[str], max_new: int, *, top_logprobs: int, logprobs: bool):
    from deltahub.server.sampling import SamplingParams

    temperature = 1.0 if r.temperature is None else r.temperature
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=r.top_k or 0,
                          top_p=1.0 if r.top_p is None else r.top_p,
                          repetition_penalty=r.repetition_penalty or 1.0,
                          presence_penalty=r.presence_penalty or 0.0,
                          frequency_penalty=r.frequency_penalty or 0.0,
                          seed=r.seed, stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                          ignore_eos=r.ignore_eos)


async def _variant(srv: Server, request: Request, model: str | None):
    name = model
    if model is None or model in BASE_ALIASES:
        name = request.headers.get("x-adapter-id") or model
    return await srv.resolve(name)


def _max_new(srv: Server, r, prompt_len: int, default: int | None) -> int:
    max_new = getattr(r, "max_completion_tokens", None) or r.max_tokens
    if max_new is not None and max_new < 1:
        raise _bad("`max_tokens` must be strictly positive", "max_tokens")
    return check_lengths(prompt_len, max_new if max_new is not None else default, srv.config.limits)


# ------------------------------------------------------------------------------------ chat


def _chat_messages(r: schemas.ChatCompletionRequest) -> list[dict]:
    if not r.messages:
        raise _bad("`messages` must contain at least one message", "messages")
    msgs = []
    for m in r.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad("only text content parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return msgs


def _chat_logprobs(texts: TokenTexts, out) -> dict:
    content = []
    ids, lps = list(out.new_token_ids or []), list(out.new_logprobs or [])
    tops = list(out.new_top_logprobs or []) + [None] * len(ids)
    for t, lp, top in zip(ids, lps, tops, strict=False):
        s = texts.text_of(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": texts.text_of(a), "logprob": b,
                                          "bytes": list(texts.text_of(a).encode())} for a, b in (top or [])]})
    return {"content": content}


@router.post("/v1/chat/completions", summary="OpenAI chat completions (stream or not)")
async def chat_completions(request: Request):
    srv = _server(request)
    started = time.monotonic()
    r = await parse_json(request, schemas.ChatCompletionRequest)
    stop = _common_checks(srv, r)
    if r.tools:
        raise _bad("`tools` are not supported by this server", "tools")
    if r.response_format and r.response_format.get("type") not in (None, "text"):
        raise _bad("`response_format` other than text is not supported by this server", "response_format")
    if r.top_logprobs is not None and not 0 <= r.top_logprobs <= 20:
        raise _bad("`top_logprobs` must be >= 0 and <= 20", "top_logprobs")
    if r.top_logprobs and not r.logprobs:
        raise _bad("`top_logprobs` requires `logprobs` to be true", "top_logprobs")
    variant, label = await _variant(srv, request, r.model)
    prompt = srv.chat_prompt(variant, _chat_messages(r))
    ids = srv.encode(variant, prompt, add_special_tokens=False)
    max_new = _max_new(srv, r, len(ids), None)
    params = _params(r, stop, max_new, top_logprobs=r.top_logprobs or 0, logprobs=bool(r.logprobs))
    job = Job(prompt_ids=ids, params=params, variant=variant, label=label, started=started)
    texts = TokenTexts(srv.tokenizer(variant))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "created": created, "model": label, "system_fingerprint": _fingerprint(srv)}
    if r.stream:
        usage = bool(r.stream_options and r.stream_options.include_usage)
        opened = await srv.open(job)
        return StreamingResponse(_chat_stream(opened, texts, head, usage, bool(r.logprobs)),
                                 media_type="text/event-stream", background=BackgroundTask(opened.release),
                                 headers={"x-adapter-id": label, "x-accel-buffering": "no"})

    async def run():
        lp, last = [], None
        async for out in srv.stream(job):
            if r.logprobs:
                lp += _chat_logprobs(texts, out)["content"]
            last = out
        return last, lp

    out, lp = await srv.watched(request, run())
    t = srv.timing(job, out)
    body = {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": {"content": lp} if r.logprobs else None,
                         "finish_reason": _finish(out.finish_reason)}],
            "usage": _usage(len(ids), len(out.token_ids))}
    return JSONResponse(body, headers=t.headers(srv.config.compute_type, len(ids), label, len(prompt)))


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chat_stream(opened: Opened, texts: TokenTexts, head: dict, include_usage: bool,
                       logprobs: bool) -> AsyncIterator[str]:
    job = opened.job
    base = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}], **extra})
    try:
        out = None
        async for out in opened.outputs():
            if not out.new_text and not out.finished:
                continue
            choice = {"index": 0, "delta": {"role": "assistant", "content": out.new_text},
                      "logprobs": _chat_logprobs(texts, out) if logprobs else None,
                      "finish_reason": _finish(out.finish_reason) if out.finished else None}
            yield _sse({**base, "choices": [choice], **extra})
        if include_usage and out is not None:
            yield _sse({**base, "choices": [], "usage": _usage(len(job.prompt_ids), len(out.token_ids))})
        yield _sse("[DONE]")
    except ApiError as e:
        yield _sse(error_body(e, openai=True))


# ------------------------------------------------------------------------------- completions


def _completion_logprobs(texts: TokenTexts, out, offset: int) -> dict:
    ids, lps = list(out.new_token_ids or []), list(out.new_logprobs or [])
    tops = list(out.new_top_logprobs or []) + [None] * len(ids)
    toks = [texts.text_of(t) for t in ids]
    offsets, pos = [], offset
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": lps[:len(ids)], "text_offset": offsets,
            "top_logprobs": [{texts.text_of(a): b for a, b in (top or [])} for top in tops[:len(ids)]]}


def _merge_lp(acc: dict | None, new: dict) -> dict:
    if acc is None:
        return new
    return {k: acc[k] + new[k] for k in acc}


@router.post("/v1/completions", summary="OpenAI (legacy) completions (stream or not)")
async def completions(request: Request):
    srv = _server(request)
    started = time.monotonic()
    r = await parse_json(request, schemas.CompletionRequest)
    stop = _common_checks(srv, r)
    if r.suffix is not None:
        raise ApiError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.",
                       error_type="suffix not supported", param="suffix")
    if r.best_of not in (None, 1):
        raise _bad("`best_of` must be 1", "best_of")
    if r.logprobs is not None and not 0 <= r.logprobs <= 5:
        raise _bad("`logprobs` must be >= 0 and <= 5", "logprobs")
    variant, label = await _variant(srv, request, r.model)
    tok_ids = isinstance(r.prompt, list) and (not r.prompt or isinstance(r.prompt[0], int))
    prompts: list = [r.prompt] if isinstance(r.prompt, str) or tok_ids else list(r.prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise _bad("`prompt` cannot be empty", "prompt")
    limit = srv.config.limits.max_client_batch_size
    if len(prompts) > limit:
        raise ApiError(422, f"Number of prompts exceeds the maximum allowed batch size of {limit}",
                       error_type="batch size exceeded", param="prompt")
    jobs, texts_in = [], []
    want_lp = r.logprobs is not None
    for p in prompts:
        ids = list(p) if tok_ids else srv.encode(variant, p)
        vocab = len(srv.tokenizer(variant))
        if tok_ids and any(not 0 <= t < vocab for t in ids):
            raise _bad(f"token ids in `prompt` must be in [0, {vocab})", "prompt")
        max_new = _max_new(srv, r, len(ids), 16)
        params = _params(r, stop, max_new, top_logprobs=r.logprobs or 0, logprobs=want_lp)
        jobs.append(Job(prompt_ids=ids, params=params, variant=variant, label=label, started=started))
        texts_in.append(srv.tokenizer(variant).decode(ids) if tok_ids else p)
    texts = TokenTexts(srv.tokenizer(variant))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": label,
            "system_fingerprint": _fingerprint(srv)}
    if r.stream:
        usage = bool(r.stream_options and r.stream_options.include_usage)
        opened = []
        try:
            for job in jobs:
                opened.append(await srv.open(job))
        except BaseException:
            for o in opened:
                o.release()
            raise
        return StreamingResponse(_completion_stream(opened, texts, head, usage, want_lp,
                                                    texts_in if r.echo else None),
                                 media_type="text/event-stream",
                                 background=BackgroundTask(lambda: [o.release() for o in opened]),
                                 headers={"x-adapter-id": label, "x-accel-buffering": "no"})

    async def one(job: Job, echo: str):
        lp, last = None, None
        async for out in srv.stream(job):
            if want_lp:
                offset = len(echo) + len(last.text if last else "")
                lp = _merge_lp(lp, _completion_logprobs(texts, out, offset))
            last = out
        return last, lp

    results = await srv.watched(request, asyncio.gather(*(one(j, e if r.echo else "")
                                                          for j, e in zip(jobs, texts_in, strict=True))))
    choices = [{"index": i, "text": (texts_in[i] if r.echo else "") + out.text,
                "logprobs": lp if want_lp else None, "finish_reason": _finish(out.finish_reason)}
               for i, (out, lp) in enumerate(results)]
    n_prompt = sum(len(j.prompt_ids) for j in jobs)
    n_gen = sum(len(out.token_ids) for out, _ in results)
    body = {**head, "object": "text_completion", "choices": choices, "usage": _usage(n_prompt, n_gen)}
    t = srv.timing(jobs[0], results[0][0])
    return JSONResponse(body, headers=t.headers(srv.config.compute_type, n_prompt, label,
                                                sum(len(x) for x in texts_in)))


async def _completion_stream(opened: list[Opened], texts: TokenTexts, head: dict, include_usage: bool,
                             want_lp: bool, echo: list[str] | None) -> AsyncIterator[str]:
    jobs = [o.job for o in opened]
    base = {**head, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, o: Opened):
        try:
            async for out in o.outputs():
                await queue.put((i, out))
            await queue.put((i, None))
        except ApiError as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, o)) for i, o in enumerate(opened)]
    try:
        if echo:
            for i, e in enumerate(echo):
                yield _sse({**base, "choices": [{"index": i, "text": e, "logprobs": None,
                                                 "finish_reason": None}], **extra})
        done, generated, sent = 0, [0] * len(jobs), [0] * len(jobs)
        while done < len(jobs):
            i, out = await queue.get()
            if out is None:
                done += 1
                continue
            if isinstance(out, ApiError):
                yield _sse(error_body(out, openai=True))
                return
            generated[i] = len(out.token_ids)
            if not out.new_text and not out.finished:
                continue
            lp = _completion_logprobs(texts, out, sent[i]) if want_lp else None
            sent[i] += len(out.new_text)
            reason = _finish(out.finish_reason) if out.finished else None
            yield _sse({**base, "choices": [{"index": i, "text": out.new_text, "logprobs": lp,
                                             "finish_reason": reason}], **extra})
        if include_usage:
            n_prompt = sum(len(j.prompt_ids) for j in jobs)
            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, sum(generated))})
        yield _sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------ models


@router.get("/v1/models", summary="OpenAI: the base model and every variant")
async def models(request: Request):
    srv = _server(request)
    base = srv.config.model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "deltahub", "root": base,
             "parent": None, "kind": "base"}]
    for v in srv.variants():
        data.append({"id": v.name, "object": "model", "created": 0, "owned_by": "deltahub",
                     "root": str(getattr(v, "source", "") or v.name), "parent": base,
                     "kind": srv.kind_of(v)})
    return {"object": "list", "data": data}
