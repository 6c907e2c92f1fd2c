"""Adding and removing variants while serving.

vLLM's routes, same bodies and replies::

    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "org/sql-lora" | "/path/to/peft"}
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

and the same for compressed full fine-tunes (deltahub delta folders or Hub repos)::

    POST /v1/load_delta           {"delta_name": "chat", "delta_path": "org/chat-delta" | "/path"}
    POST /v1/unload_delta         {"delta_name": "chat"}

Success is ``200`` with a one-line text body; a name already served is ``400``, an unknown one
``404``, a load failure ``400`` naming the cause (OpenAI error shape, as on every /v1 route).
In-flight requests of an unloaded variant finish first when the engine supports it.
"""

from __future__ import annotations

from deltahub.server.api import schemas
from deltahub.server.api.errors import ApiError
from deltahub.server.api.generation import Server
from deltahub.server.api.validation import parse_json
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

router = APIRouter()

_LABEL = {"lora": "LoRA adapter", "delta": "delta"}


def _server(request: Request) -> Server:
    return request.app.state.server


async def _load(srv: Server, name: str, ref: str, kind: str) -> PlainTextResponse:
    from deltahub.server import errors as engine_errors

    label = _LABEL[kind]
    if not name.strip() or not ref.strip():
        raise ApiError(400, f"Both the {label} name and its path are required", error_type="validation")
    if srv.is_base(name):
        raise ApiError(400, f"{name!r} names the base model; choose another {label} name",
                       error_type="validation")
    if name in srv.variant_names():
        raise ApiError(400, f"The {label} {name!r} has already been loaded.", error_type="validation",
                       code="already_loaded")
    try:
        await srv.add_variant(name, ref, kind=kind)
    except engine_errors.VariantLoadError as e:
        raise ApiError(400, f"Could not load {label} {name!r} from {ref!r}: {e}", error_type="validation",
                       code="variant_load_error") from e
    except engine_errors.RequestValidationError as e:
        raise ApiError(400, f"Could not load {label} {name!r}: {e}", error_type="validation") from e
    return PlainTextResponse(f"Success: {label} {name!r} added successfully.")


async def _unload(srv: Server, name: str, kind: str) -> PlainTextResponse:
    label = _LABEL[kind]
    if name not in srv.variant_names():
        raise ApiError(404, f"The {label} {name!r} cannot be found.", error_type="not_found",
                       code="model_not_found")
    await srv.remove_variant(name)
    return PlainTextResponse(f"Success: {label} {name!r} removed successfully.")


@router.post("/v1/load_lora_adapter", summary="Serve a PEFT LoRA adapter (folder or Hub id) under a name")
async def load_lora_adapter(request: Request):
    body = await parse_json(request, schemas.LoadLoRAAdapterRequest)
    return await _load(_server(request), body.lora_name, body.lora_path, "lora")


@router.post("/v1/unload_lora_adapter", summary="Stop serving a LoRA adapter")
async def unload_lora_adapter(request: Request):
    body = await parse_json(request, schemas.UnloadLoRAAdapterRequest)
    return await _unload(_server(request), body.lora_name, "lora")


@router.post("/v1/load_delta", summary="Serve a compressed fine-tune (delta folder or Hub id) under a name")
async def load_delta(request: Request):
    body = await parse_json(request, schemas.LoadDeltaRequest)
    return await _load(_server(request), body.delta_name, body.delta_path, "delta")


@router.post("/v1/unload_delta", summary="Stop serving a delta")
async def unload_delta(request: Request):
    body = await parse_json(request, schemas.UnloadDeltaRequest)
    return await _unload(_server(request), body.delta_name, "delta")
