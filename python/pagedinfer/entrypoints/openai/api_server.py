"""The OpenAI-compatible server: FastAPI routes over an `AsyncLLMEngine`, run by uvicorn.

`python -m pagedinfer.entrypoints.openai.api_server [--model MODEL]` or `pagedinfer serve [MODEL]`, with
vLLM's flags. Exits non-zero if the engine fails; on SIGTERM it stops admitting, lets running requests
finish (at most GRACEFUL_SHUTDOWN_S), then exits."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import pagedinfer
from pagedinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedinfer.engine.llm_engine import LLMEngine
from pagedinfer.entrypoints.llm import LLM
from pagedinfer.entrypoints.openai.errors import APIError
from pagedinfer.entrypoints.openai.metrics import Metrics
from pagedinfer.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                     DetokenizeRequest, TokenizeRequest)
from pagedinfer.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedinfer.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedinfer.entrypoints.openai.serving_engine import ClientDisconnected
from pagedinfer.logging_config import FORMAT
from pagedinfer.models.loader import LOAD_FORMATS

logger = logging.getLogger("pagedinfer.server")

GRACEFUL_SHUTDOWN_S = 30
# After an engine failure /health answers 503 this long before the server exits, so that whatever
# watches it (a load balancer, a test) sees why.
FAILURE_EXIT_DELAY_S = 2.0


def make_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """vLLM's serve flags (and a few of ours: --device, --block-size, --num-gpu-blocks-override,
    --kv-cache-space)."""
    parser = parser or argparse.ArgumentParser(
        description="pagedinfer's OpenAI-compatible server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a local HF folder, .gguf file or a model id in the local HF cache; "
                             "none: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer's folder (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the names clients use in `model` (several allowed; the first is the one "
                             "responses carry); default: the --model argument")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer <key>` on every /v1 route")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the longest sequence (prompt + output); default: the model's context length")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float", "float16", "half", "bfloat16"],
                        help="the weights' and activations' dtype; auto: the checkpoint's")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="the fraction of the GPU's memory the model and KV cache may take")
    parser.add_argument("--swap-space", type=float, default=4,
                        help="CPU swap space in GiB, used with --preemption-mode swap")
    parser.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"],
                        help="when the KV cache is full: recompute a preempted request, or swap it to CPU")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="the most sequences running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the most tokens a step computes (default: 8192 on CUDA, 4096 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the requests that bring none")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or the path of a file holding one; default: the "
                             "tokenizer's")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="how to read the weights")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV blocks of shared prompt prefixes")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="never capture CUDA graphs: every step, decodes included, runs eagerly")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs to shard the model over (only 1 for now)")
    parser.add_argument("--quantization", default=None, help="weight quantization method (none supported yet)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own code")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: CUDA when available, else the CPU")
    parser.add_argument("--block-size", type=int, default=16, help="tokens a KV cache block holds")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None,
                        help="the KV cache's block count, instead of sizing it from memory")
    parser.add_argument("--kv-cache-space", type=float, default=4,
                        help="the KV cache's size in GiB on the CPU")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    # For tests only: the engine raises after this many steps.
    parser.add_argument("--fail-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def load_engine(args: argparse.Namespace) -> LLMEngine:
    """The engine of the flags. LLM's constructor holds the checks (quantization, tensor parallelism)
    and the default model; the server drives its engine."""
    llm = LLM(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              swap_space=args.swap_space, preemption_mode=args.preemption_mode,
              enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              enable_prefix_caching=args.enable_prefix_caching,
              num_gpu_blocks_override=args.num_gpu_blocks_override, quantization=args.quantization,
              load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size,
              trust_remote_code=args.trust_remote_code, device=args.device,
              kv_cache_space=args.kv_cache_space)
    return llm.llm_engine


def build_app(engine: AsyncLLMEngine, metrics: Metrics, served_model_names: Sequence[str],
              api_key: Optional[str], chat_template: Optional[str]) -> FastAPI:
    app = FastAPI(title="pagedinfer", version=pagedinfer.__version__)
    completions = OpenAIServingCompletion(engine, served_model_names)
    chat = OpenAIServingChat(engine, served_model_names, chat_template)
    config = engine.engine.config
    created = int(time.time())

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if (api_key is not None and request.url.path.startswith("/v1")
                and request.headers.get("Authorization") != f"Bearer {api_key}"):
            return _error(APIError("Invalid or missing API key.", 401, type="authentication_error"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return _error(APIError(f"{first.get('msg')} ({param or 'body'})", param=param))

    @app.exception_handler(ValueError)
    async def value_error(_: Request, error: ValueError) -> JSONResponse:
        return _error(APIError(str(error)))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return _error(APIError(str(error), 500, type="EngineDeadError"))

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagedinfer.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "pagedinfer",
             "root": config.model.model, "max_model_len": config.model.max_model_len}
            for name in served_model_names]}

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return _respond(await completions.create(request, raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return _respond(await chat.create(request, raw_request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        completions.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")
        if request.messages is not None:
            tokens = chat.tokenizer.encode(chat.render(request.messages), add_special_tokens=False)
        else:
            tokens = chat.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": config.model.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        completions.model_name(request.model)
        if any(not 0 <= token < config.model.vocab_size for token in request.tokens):
            raise APIError(f"tokens must be in [0, {config.model.vocab_size})", param="tokens")
        return {"prompt": chat.tokenizer.decode(request.tokens)}

    return app


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _respond(body: Any) -> Response:
    if isinstance(body, dict):
        return JSONResponse(body)
    return StreamingResponse(body, media_type="text/event-stream")


def _read_chat_template(value: Optional[str]) -> Optional[str]:
    """A template given inline, or the path of a file holding one."""
    if value is not None and Path(value).is_file():
        return Path(value).read_text()
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(args: argparse.Namespace, engine: LLMEngine) -> int:
    """Serve until SIGTERM/SIGINT (0) or an engine failure (1)."""
    names = args.served_model_name or [args.model or Path(engine.config.model.model).stem]
    metrics = Metrics(names[0])
    failures: list[BaseException] = []
    server: Optional[uvicorn.Server] = None

    def on_failure(error: BaseException) -> None:
        failures.append(error)
        logger.error("the engine failed (%r): /health answers 503, exiting in %.0f s",
                     error, FAILURE_EXIT_DELAY_S)
        asyncio.get_running_loop().call_later(FAILURE_EXIT_DELAY_S, setattr, server, "should_exit", True)

    async_engine = AsyncLLMEngine(engine, asyncio.get_running_loop(), on_step=metrics.record_step,
                                  on_finished=metrics.record_finished, on_failure=on_failure,
                                  fail_after_steps=args.fail_after_steps)
    app = build_app(async_engine, metrics, names, args.api_key, _read_chat_template(args.chat_template))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    try:
        await server.serve()
    finally:
        async_engine.shutdown()
    return 1 if failures or not server.started else 0


def run_server(args: argparse.Namespace) -> int:
    # The package logger prints pagedinfer's lines (logging_config); where that was turned off
    # (PAGEDINFER_CONFIGURE_LOGGING=0), the server still says what it serves.
    if not logging.getLogger("pagedinfer").handlers:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
    try:
        engine = load_engine(args)
    except (ValueError, FileNotFoundError) as error:
        logger.error("cannot start: %s", error)
        return 2
    config = engine.config
    num_blocks, block_size = engine.scheduler.block_manager.num_blocks, config.cache.block_size
    logger.info("model %s, dtype %s, device %s, max_model_len %d", config.model.model,
                str(config.model.dtype).removeprefix("torch."), config.device, config.model.max_model_len)
    logger.info("KV cache: %d blocks of %d tokens; max concurrency %.2fx at max_model_len",
                num_blocks, block_size, num_blocks * block_size / config.model.max_model_len)
    if not _is_loopback(args.host) and args.api_key is None:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    logger.info("serving on http://%s:%d (OpenAI API under /v1)", args.host, args.port)
    return asyncio.run(serve(args, engine))


def main(argv: Optional[list[str]] = None) -> int:
    return run_server(make_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
