"""Wire schemas: TGI's (docs/openapi.json of text-generation-inference) and OpenAI's, field for field.

Request models are strict (a string is not a number, 1 is not ``true``) and ignore unknown fields as
TGI's serde structs do. Range rules live in ``validation.py``: they need the server's limits.
Response models document the shapes; routes build them and dump with ``exclude_none`` only where
the reference servers omit absent fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Req(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------------------------- TGI


class Grammar(_Req):
    type: Literal["json", "regex", "json_object"]
    value: Any = None


class GenerateParameters(_Req):
    """TGI's GenerateParameters; every field nullable as clients send explicit nulls."""

    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX: "hub" | "local" (others are refused)
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False


class GenerateRequest(_Req):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    """``POST /``: GenerateRequest plus ``stream``."""

    stream: bool = False


class PrefillToken(_Resp):
    id: int
    text: str
    logprob: float | None = None


class Token(_Resp):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class BestOfSequence(_Resp):
    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = []


class Details(_Resp):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = []
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(_Resp):
    generated_text: str
    details: Details | None = None


class StreamDetails(_Resp):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(_Resp):
    index: int
    token: Token
    top_tokens: list[Token] = []
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(_Resp):
    id: int
    text: str
    start: int
    stop: int


class ErrorResponse(_Resp):
    error: str
    error_type: str


class VariantEntry(_Resp):
    """One served variant in ``/info``'s ``variants`` (deltahub's addition to TGI's Info)."""

    name: str
    source: str
    kind: str  # "delta" | "lora" | ...
    tier: str  # "gpu" | "host" | "disk" | "loading" | ...
    bytes: int | None = None
    codec: str | None = None


class Info(_Resp):
    """TGI's Info keys, plus ``variants``."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_input_length: int
    validation_workers: int = 1
    max_client_batch_size: int
    router: str = "deltahub"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    variants: list[VariantEntry] = []


# ------------------------------------------------------------------------------------------ OpenAI


class StreamOptions(_Req):
    include_usage: bool = False


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Req):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM / TGI extension
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # TGI extension
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | list[float] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Req):
    model: str | None = None
    prompt: str | list[str] | list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    ignore_eos: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(_Resp):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Resp):
    index: int
    message: ChatCompletionMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatCompletionDelta(_Resp):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionChunkChoice(_Resp):
    index: int
    delta: ChatCompletionDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Resp):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------- variants


class LoadLoRAAdapterRequest(_Req):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Req):
    lora_name: str
    lora_int_id: int | None = None


class LoadDeltaRequest(_Req):
    """deltahub's ``/v1/load_delta``: a compressed full fine-tune (folder or Hub id)."""

    delta_name: str
    delta_path: str


class UnloadDeltaRequest(_Req):
    delta_name: str
