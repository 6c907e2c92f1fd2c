"""Request parsing and TGI's parameter rules (router/src/validation.rs), with TGI's messages.

``parse_json(request, Model)`` reads the body: wrong content type -> 415, malformed JSON -> 400,
wrong types / missing fields -> 422. ``check_tgi(params, ...)`` applies the range rules in TGI's
order and returns the resolved values; every failure is an ``ApiError`` (422, error_type
"validation", message "Input validation error: ...").
"""

from __future__ import annotations

from dataclasses import dataclass

from deltahub.server.api import errors
from deltahub.server.api.errors import ApiError
from deltahub.server.api.schemas import GenerateParameters
from fastapi import Request
from pydantic import BaseModel, ValidationError

MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The server's validation limits (TGI launcher flags of the same names)."""

    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_client_batch_size: int = 4
    default_max_new_tokens: int = 1024  # TGI's DEFAULT_GENERATION_LENGTH


async def parse_json(request: Request, model: type[BaseModel]):
    """The body of ``request`` validated as ``model`` (strict types, unknown keys ignored)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, "Expected request with `Content-Type: application/json`",
                       error_type="validation", code="unsupported_media_type")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"Request body larger than {MAX_BODY_BYTES} bytes", error_type="validation")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_input=False)
        if errs and errs[0]["type"] == "json_invalid":
            raise ApiError(400, f"Failed to parse the request body as JSON: {errs[0]['msg']}",
                           error_type="validation", code="invalid_json") from None
        if errs and errs[0]["loc"] == () and errs[0]["type"] == "model_type":
            raise ApiError(422, "Input validation error: the request body must be a JSON object",
                           error_type="validation") from None
        raise errors.pydantic_error(e) from None


@dataclass
class Checked:
    """TGI parameters after validation: what the engine is asked for."""

    sampling: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: list[str]
    max_new_tokens: int | None  # None: fill up to max_total_tokens (capped) once the prompt is known
    truncate: int | None
    best_of: int
    top_n_tokens: int


def _v(msg: str, param: str | None = None) -> ApiError:
    return errors.validation(msg, param=param)


def check_tgi(p: GenerateParameters, inputs: str, limits: Limits, *, stream: bool) -> Checked:
    """TGI's checks, in its order (best_of, temperature, penalties, top_p, typical_p, top_k,
    max_new_tokens, stop, seed, top_n_tokens, empty inputs, truncate)."""
    best_of = 1 if p.best_of is None else p.best_of
    sampling = bool(p.do_sample or p.temperature is not None or p.top_k is not None
                    or p.top_p is not None or p.typical_p is not None)
    if p.best_of is not None:
        if limits.max_best_of == 1 and best_of != 1:
            raise _v("`best_of` != 1 is not allowed for this endpoint", "best_of")
        if best_of <= 0 or best_of > limits.max_best_of:
            raise _v(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}", "best_of")
    if stream and best_of != 1:
        raise _v("`best_of` != 1 is not supported when streaming tokens", "best_of")
    if stream and p.decoder_input_details:
        raise _v("`decoder_input_details` == true is not supported when streaming tokens",
                 "decoder_input_details")
    if best_of > 1 and not sampling:
        raise _v("you must use sampling when `best_of` is > 1", "best_of")
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0.0:
        raise _v("`temperature` must be strictly positive", "temperature")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0.0:
        raise _v("`repetition_penalty` must be strictly positive", "repetition_penalty")
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise _v("`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise _v("`top_p` must be > 0.0 and < 1.0", "top_p")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise _v("`typical_p` must be > 0.0 and < 1.0", "typical_p")
    if p.top_k is not None and p.top_k <= 0:
        raise _v("`top_k` must be strictly positive", "top_k")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise _v("`max_new_tokens` must be strictly positive", "max_new_tokens")
    stop = list(p.stop or [])
    if len(stop) > limits.max_stop_sequences:
        raise _v(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}",
                 "stop")
    if any(s == "" for s in stop):
        raise _v("`stop` sequences cannot be empty", "stop")
    if p.seed is not None:
        if best_of > 1:
            raise _v("`seed` must not be set when `best_of` > 1", "seed")
        if not 0 <= p.seed < 2**64:
            raise _v("`seed` must be >= 0 and < 2**64", "seed")
    top_n = 0 if p.top_n_tokens is None else p.top_n_tokens
    if not 0 <= top_n <= limits.max_top_n_tokens:
        raise _v(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}",
                 "top_n_tokens")
    if inputs == "":
        raise _v("`inputs` cannot be empty", "inputs")
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise _v(f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                 f"Given: {p.truncate}", "truncate")
    # Features TGI has and this engine does not: refused, never silently ignored.
    if p.grammar is not None:
        raise _v("grammar is not supported", "grammar")
    if p.watermark:
        raise _v("`watermark` is not supported by this server", "watermark")
    if p.typical_p is not None:
        raise _v("`typical_p` is not supported by this server", "typical_p")
    return Checked(sampling=sampling, temperature=temperature, top_k=p.top_k or 0, top_p=p.top_p or 1.0,
                   repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                   seed=p.seed, stop=stop, max_new_tokens=p.max_new_tokens, truncate=p.truncate,
                   best_of=best_of, top_n_tokens=top_n)


def check_lengths(input_length: int, max_new_tokens: int | None, limits: Limits) -> int:
    """TGI's length rules once the prompt is tokenized; returns max_new_tokens resolved."""
    if max_new_tokens is None:
        max_new_tokens = max(1, min(limits.max_total_tokens - input_length, limits.default_max_new_tokens))
    if input_length + max_new_tokens > limits.max_total_tokens:
        raise _v(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                 f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`",
                 "max_new_tokens")
    if input_length > limits.max_input_tokens:
        raise _v(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}",
                 "inputs")
    return max_new_tokens
