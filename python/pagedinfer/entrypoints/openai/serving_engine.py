"""What the completions and chat handlers share: the model check, prompt-length limits, unknown-field
logging, running requests (aborted when the client leaves) and Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from typing import Any, Optional, TypeVar

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from pagedinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedinfer.engine.llm_engine import PromptInput
from pagedinfer.entrypoints.openai.errors import APIError
from pagedinfer.entrypoints.openai.protocol import OpenAIModel
from pagedinfer.outputs import RequestOutput
from pagedinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; its requests were aborted."""


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str]) -> None:
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.max_model_len = engine.engine.config.model.max_model_len
        self.tokenizer: PreTrainedTokenizerBase = engine.engine.get_tokenizer()

    def model_name(self, requested: Optional[str]) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(f"The model `{requested}` does not exist.", HTTPStatus.NOT_FOUND,
                           type="NotFoundError", param="model")
        return requested

    def check_length(self, num_prompt_tokens: int, max_tokens: Optional[int], prompt_param: str) -> int:
        """max_tokens, or what is left of max_model_len when None; 400 when they do not fit."""
        if num_prompt_tokens > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"your prompt has {num_prompt_tokens} tokens.", param=prompt_param)
        if max_tokens is None:
            return max(self.max_model_len - num_prompt_tokens, 1)
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in "
                           f"the prompt, {max_tokens} for the completion).", param="max_tokens")
        return max_tokens

    @staticmethod
    def log_unknown_fields(request: OpenAIModel) -> None:
        if request.model_extra:
            logger.info("ignoring unknown fields: %s", sorted(request.model_extra))

    @staticmethod
    def sampling_params(make: Any, *args: Any, **kwargs: Any) -> SamplingParams:
        """Build SamplingParams; its ValueError (naming the field) becomes a 400."""
        try:
            return make(*args, **kwargs)
        except ValueError as error:
            raise APIError(str(error)) from error

    async def generate(self, prompts: list[PromptInput],
                       params: SamplingParams) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) of every prompt's request, interleaved as they come. The engine's
        first answer is awaited before this returns, so a request it refuses raises here, before a
        streamed response has started."""
        base = uuid.uuid4().hex
        streams = [self.engine.generate(f"{base}-{i}", prompt, params) for i, prompt in enumerate(prompts)]
        merged = _merge(streams)
        try:
            first = await anext(merged)
        except ValueError as error:
            await merged.aclose()
            raise APIError(str(error)) from error
        return _prepend(first, merged)

    @staticmethod
    async def final_outputs(request: Request,
                            outputs: AsyncIterator[tuple[int, RequestOutput]]) -> list[RequestOutput]:
        """Every prompt's finished output, in the prompts' order; ClientDisconnected (and the requests
        aborted) if the client leaves first."""
        async def collect() -> list[RequestOutput]:
            finished = {index: output async for index, output in outputs if output.finished}
            return [finished[index] for index in sorted(finished)]

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if work not in done:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise ClientDisconnected
        return work.result()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(error: Exception) -> str:
    """The event that ends a stream that cannot go on: OpenAI's clients raise it as an APIError."""
    if isinstance(error, EngineDeadError):
        error = APIError(str(error), 500, type="EngineDeadError")
    elif not isinstance(error, APIError):
        error = APIError(str(error))
    return sse(error.body())


def usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several async iterators, tagged with the iterator's index, in arrival order. Closing
    this closes them all (which aborts their requests)."""
    if len(streams) == 1:  # the common case needs no tasks
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    inbox: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in stream:
                await inbox.put((index, item))
            await inbox.put(done)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, raised there
            await inbox.put(error)

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await inbox.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
