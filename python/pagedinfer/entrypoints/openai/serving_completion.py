"""/v1/completions: a string, a list of strings, token ids or lists of them; echo, logprobs, n, best_of,
stop, seed; streamed (no role chunk) or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional, Union

from fastapi import Request

from pagedinfer.engine.async_engine import EngineDeadError
from pagedinfer.engine.llm_engine import PromptInput
from pagedinfer.entrypoints.openai.errors import APIError
from pagedinfer.entrypoints.openai.protocol import CompletionRequest
from pagedinfer.entrypoints.openai.serving_engine import SSE_DONE, OpenAIServing, sse, sse_error, usage
from pagedinfer.outputs import CompletionOutput, Logprob, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest,
                     raw_request: Request) -> Union[dict[str, Any], AsyncIterator[str]]:
        """The response body, or the SSE lines of a streamed one."""
        self.log_unknown_fields(request)
        model = self.model_name(request.model)
        if request.suffix is not None:
            raise APIError("suffix is not supported", param="suffix")
        if request.stream and request.best_of is not None and request.best_of > request.n:
            # The n best are known only at the end: nothing could be streamed before it.
            raise APIError("best_of > n cannot be streamed", param="best_of")
        prompts = self._prompts(request.prompt)
        max_tokens = min(self.check_length(len(prompt["prompt_token_ids"]), request.max_tokens, "prompt")
                         for prompt in prompts)
        params = self.sampling_params(
            request.sampling_params, max_tokens, request.logprobs, best_of=request.best_of,
            prompt_logprobs=request.logprobs if request.echo and request.logprobs is not None else None)
        outputs = await self.generate(prompts, params)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            return self._stream(request, outputs, response_id, created, model)
        finals = await self.final_outputs(raw_request, outputs)
        # With best_of > n the outputs are the n best of best_of: numbered by rank, not by sequence.
        choices = [self._choice(i * request.n + j, output, c, request.echo, request.logprobs)
                   for i, output in enumerate(finals) for j, c in enumerate(output.outputs)]
        return {"id": response_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage(finals)}

    def _prompts(self, prompt: Union[str, list[str], list[int], list[list[int]]]) -> list[PromptInput]:
        """Every prompt as {"prompt", "prompt_token_ids"}: the length check needs the token count."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        prompts: list[PromptInput] = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append({"prompt": item, "prompt_token_ids": self.tokenizer.encode(item)})
            else:
                prompts.append({"prompt": self.tokenizer.decode(item), "prompt_token_ids": list(item)})
        return prompts

    async def _stream(self, request: CompletionRequest, outputs: AsyncIterator[tuple[int, RequestOutput]],
                      response_id: str, created: int, model: str) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, choice) -> (chars, tokens) sent
        done: set[tuple[int, int]] = set()  # choices whose finish_reason was sent
        finals: dict[int, RequestOutput] = {}
        try:
            async for prompt_index, output in outputs:
                for completion in output.outputs:
                    key = (prompt_index, completion.index)
                    if key in done:
                        continue
                    if request.echo:  # the prompt is part of the text: its first chunk carries it
                        completion = _with_prompt(output, completion)
                    num_chars, num_tokens = sent.get(key, (0, 0))
                    text, new_tokens = completion.text[num_chars:], completion.token_ids[num_tokens:]
                    # Tokens without text yet (part of a character) show only where logprobs are sent.
                    if not text and (not new_tokens or request.logprobs is None) \
                            and completion.finish_reason is None:
                        continue
                    logprobs = None if request.logprobs is None else _logprobs(
                        (completion.logprobs or [])[num_tokens:], new_tokens, num_chars)
                    sent[key] = (len(completion.text), len(completion.token_ids))
                    if completion.finish_reason is not None:
                        done.add(key)
                    chunk = {"index": prompt_index * request.n + completion.index, "text": text,
                             "logprobs": logprobs, "finish_reason": completion.finish_reason,
                             "stop_reason": completion.stop_reason}
                    yield sse({"id": response_id, "object": "text_completion", "created": created,
                               "model": model, "choices": [chunk]})
                if output.finished:
                    finals[prompt_index] = output
            if request.stream_options and request.stream_options.include_usage:
                yield sse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage(list(finals.values()))})
            yield SSE_DONE
        except (EngineDeadError, ValueError) as error:  # a later prompt refused, or the engine died
            yield sse_error(error)
        finally:
            await outputs.aclose()

    @staticmethod
    def _choice(index: int, output: RequestOutput, completion: CompletionOutput, echo: bool,
                num_logprobs: Optional[int]) -> dict[str, Any]:
        if echo:
            completion = _with_prompt(output, completion)
        logprobs = None if num_logprobs is None else _logprobs(completion.logprobs or [], completion.token_ids, 0)
        return {"index": index, "text": completion.text, "logprobs": logprobs,
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}


def _with_prompt(output: RequestOutput, completion: CompletionOutput) -> CompletionOutput:
    """The completion with the prompt in front (echo): its text, tokens and prompt logprobs."""
    prompt_logprobs = output.prompt_logprobs
    logprobs = None if completion.logprobs is None else [*(prompt_logprobs or []), *completion.logprobs]
    return CompletionOutput(index=completion.index, text=(output.prompt or "") + completion.text,
                            token_ids=[*output.prompt_token_ids, *completion.token_ids],
                            cumulative_logprob=completion.cumulative_logprob, logprobs=logprobs,
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)


def _logprobs(entries: list[Optional[dict[int, Logprob]]], token_ids: list[int], offset: int) -> dict[str, Any]:
    """OpenAI's legacy layout: parallel lists of tokens, their logprobs, the top alternatives, offsets.
    An entry of None (the first prompt token: no context) has no logprob."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        chosen = None if entry is None else entry[token_id]
        text = chosen.decoded_token if chosen is not None else ""
        tokens.append(text)
        token_logprobs.append(None if chosen is None else chosen.logprob)
        top.append(None if entry is None else _top_by_text(entry))
        offsets.append(offset)
        offset += len(text or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _top_by_text(entry: dict[int, Logprob]) -> dict[str, float]:
    """{text: logprob}: tokens with the same text (parts of one character) keep the likeliest."""
    top: dict[str, float] = {}
    for logprob in sorted(entry.values(), key=lambda lp: -lp.logprob):
        top.setdefault(logprob.decoded_token or "", logprob.logprob)
    return top
