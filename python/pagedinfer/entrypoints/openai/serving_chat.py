"""/v1/chat/completions: the messages rendered by the chat template, then a completion; streamed as
OpenAI does (a role chunk first, content deltas, the finish reason, optionally usage, [DONE])."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Optional, Union

from fastapi import Request
from jinja2 import TemplateError

from pagedinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedinfer.entrypoints.openai.errors import APIError
from pagedinfer.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from pagedinfer.entrypoints.openai.serving_engine import SSE_DONE, OpenAIServing, sse, sse_error, usage
from pagedinfer.outputs import CompletionOutput, Logprob, RequestOutput


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str],
                 chat_template: Optional[str]) -> None:
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template  # None: the tokenizer's own

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; 400 when there is no template to render it."""
        conversation = [{"role": message.role, "content": message.text()} for message in messages]
        try:
            return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                      tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (ValueError, TemplateError) as error:  # no template, or one that rejects the conversation
            raise APIError(f"cannot apply the chat template: {error}", param="messages") from error

    async def create(self, request: ChatCompletionRequest,
                     raw_request: Request) -> Union[dict[str, Any], AsyncIterator[str]]:
        """The response body, or the SSE lines of a streamed one."""
        self.log_unknown_fields(request)
        model = self.model_name(request.model)
        if request.response_format is not None and request.response_format.type != "text":
            raise APIError(f"response_format {request.response_format.type!r} is not supported yet "
                           f"(no structured output): only 'text'", param="response_format")
        if request.top_logprobs and not request.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
        text = self.render(request.messages, request.add_generation_prompt)
        # The template writes the special tokens (BOS included) itself.
        prompt = {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
        requested = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        max_tokens = self.check_length(len(prompt["prompt_token_ids"]), requested, "messages")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request.sampling_params, max_tokens, num_logprobs)
        outputs = await self.generate([prompt], params)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            return self._stream(request, outputs, response_id, created, model, num_logprobs)
        [final] = await self.final_outputs(raw_request, outputs)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _logprobs(c, 0, num_logprobs), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in final.outputs]
        return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage([final])}

    async def _stream(self, request: ChatCompletionRequest, outputs: AsyncIterator[tuple[int, RequestOutput]],
                      response_id: str, created: int, model: str,
                      num_logprobs: Optional[int]) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": choices, **extra})

        sent = [(0, 0)] * request.n  # (chars, tokens) sent of each choice
        done: set[int] = set()
        final: Optional[RequestOutput] = None
        try:
            for index in range(request.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async for _, output in outputs:
                final = output
                for completion in output.outputs:
                    if completion.index in done:
                        continue
                    num_chars, num_tokens = sent[completion.index]
                    text = completion.text[num_chars:]
                    # Tokens without text yet (part of a character) show only where logprobs are sent.
                    new_tokens = len(completion.token_ids) > num_tokens and num_logprobs is not None
                    if not text and not new_tokens and completion.finish_reason is None:
                        continue
                    sent[completion.index] = (len(completion.text), len(completion.token_ids))
                    if completion.finish_reason is not None:
                        done.add(completion.index)
                    yield chunk([{"index": completion.index, "delta": {"content": text} if text else {},
                                  "logprobs": _logprobs(completion, num_tokens, num_logprobs),
                                  "finish_reason": completion.finish_reason,
                                  "stop_reason": completion.stop_reason}])
            if request.stream_options and request.stream_options.include_usage and final is not None:
                yield chunk([], usage=usage([final]))
            yield SSE_DONE
        except (EngineDeadError, ValueError) as error:  # a later prompt refused, or the engine died
            yield sse_error(error)
        finally:
            await outputs.aclose()


def _logprobs(completion: CompletionOutput, start: int, num_top: Optional[int]) -> Optional[dict[str, Any]]:
    """OpenAI's chat layout for the tokens from `start` on: each token, its logprob and bytes, and the
    num_top most likely alternatives."""
    if num_top is None:
        return None
    content = []
    for token_id, entry in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
        top = sorted(entry.values(), key=lambda lp: lp.rank or 0)[:num_top]
        content.append({**_token(entry[token_id]), "top_logprobs": [_token(lp) for lp in top]})
    return {"content": content}


def _token(logprob: Logprob) -> dict[str, Any]:
    text = logprob.decoded_token or ""
    return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}
