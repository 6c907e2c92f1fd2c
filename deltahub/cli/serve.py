"""``deltahub serve``: one base model and many deltas / LoRA adapters behind TGI- and OpenAI-compatible
HTTP routes (POST /generate, /generate_stream, /v1/chat/completions, /v1/completions, ...)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  deltahub serve --base org/base --variant chat=org/base-chat-delta --variant sql=./sql-lora
  deltahub serve --base ./base --variant ./upper-delta --device cuda --max-gpu-variants 8 --port 8080
  deltahub serve --base org/base --dynamic-variants --api-key-file ~/.deltahub-key

then, e.g.:
  curl localhost:8080/generate -H 'content-type: application/json' \\
       -d '{"inputs": "Hello", "parameters": {"adapter_id": "chat", "max_new_tokens": 20}}'
  curl localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "chat", "messages": [{"role": "user", "content": "Hello"}]}'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a base model and its variants over HTTP (TGI + OpenAI APIs)",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model: Hub id (org/name[@revision]) or folder")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=REF",
                   help="a delta repo or PEFT LoRA adapter (Hub id or folder) served as NAME; repeatable")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--max-gpu-variants", type=int, help="variant slots on the device (default: 4)")
    p.add_argument("--max-host-variants", type=int, help="variants kept decoded in host memory (default: 8)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + generation, in tokens")
    p.add_argument("--max-num-seqs", type=int, help="sequences in one batch (default: 64)")
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized from the device)")
    p.add_argument("--dynamic-variants", action="store_true",
                   help="let requests name a Hub id (or, with adapter_source=local, a folder) not served yet")
    p.add_argument("--token", help="Hub token for private repos (default: $HF_TOKEN or the stored login)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--api-key-file", type=Path, help="read the API key from this file (keeps it out of `ps`)")
    p.add_argument("--model-id", help="name of the base in /info and /v1/models (default: --base)")
    p.add_argument("--max-concurrent-requests", type=int, default=128,
                   help="requests served at once; more get 429 (default: 128)")
    p.add_argument("--max-input-tokens", type=int, help="longest prompt (default: max-model-len - 1)")
    p.add_argument("--max-total-tokens", type=int, help="prompt + new tokens (default: max-model-len)")
    p.add_argument("--max-stop-sequences", type=int, default=4,
                   help="stop sequences per request (default: 4)")
    p.add_argument("--max-best-of", type=int, default=2, help="largest TGI best_of (default: 2)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    names = {"device": "device", "dtype": "dtype", "max_gpu_variants": "max_gpu_variants",
             "max_host_variants": "max_host_variants", "max_model_len": "max_model_len",
             "max_num_seqs": "max_num_seqs", "num_kv_blocks": "num_kv_blocks", "token": "token"}
    kw = {dst: getattr(args, src) for src, dst in names.items() if getattr(args, src) is not None}
    if args.dynamic_variants:
        kw["dynamic_loading"] = True
    return kw


def _api_key(args: argparse.Namespace) -> str | None:
    from deltahub.errors import DeltahubError

    if args.api_key and args.api_key_file:
        raise DeltahubError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            key = args.api_key_file.expanduser().read_text().strip()
        except OSError as e:
            raise DeltahubError(f"--api-key-file {args.api_key_file}: {e.strerror}") from e
        if not key:
            raise DeltahubError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from deltahub.server.api.app import create_app
    from deltahub.server.async_llm import AsyncLLM
    from deltahub.server.config import parse_variant_specs

    api_key = _api_key(args)
    variants = parse_variant_specs(args.variant)
    print(f"loading {args.base} with {len(variants)} variant(s) on {args.device} ...", file=sys.stderr)
    engine = AsyncLLM(args.base, variants=variants, **_engine_kwargs(args))
    try:
        app = create_app(engine, api_key=api_key, model_id=args.model_id or args.base,
                         max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens,
                         max_stop_sequences=args.max_stop_sequences, max_best_of=args.max_best_of,
                         max_concurrent_requests=args.max_concurrent_requests,
                         dynamic_variants=args.dynamic_variants)
        auth = "with an API key" if api_key else "without authentication"
        print(f"serving on http://{args.host}:{args.port} {auth} (docs: /docs)", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0
