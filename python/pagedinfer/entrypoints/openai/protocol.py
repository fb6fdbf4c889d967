"""Pydantic models of the OpenAI requests we accept, with vLLM's extra sampling fields.

Unknown fields (`user`, `store`, ...) are kept aside (`model_extra`) and ignored by the server with a log
line: clients written for OpenAI send them, and a drop-in server must not reject them."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from pagedinfer.sampling_params import SamplingParams

# vLLM's max_logprobs: more alternatives a token cost a top-k over the vocabulary on every step.
MAX_LOGPROBS = 20


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]


class SamplingRequest(OpenAIModel):
    """The fields completions and chat share: they become a `SamplingParams`."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def sampling_params(self, max_tokens: int, logprobs: Optional[int], **extra: Any) -> SamplingParams:
        """Only the fields the client set count as set: the model's generation_config fills the rest."""
        optional = {name: getattr(self, name) for name in
                    ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
                    if getattr(self, name) is not None}
        logit_bias = None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}
        return SamplingParams(
            n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=logit_bias, stop=self.stop, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, max_tokens=max_tokens,
            logprobs=logprobs, **optional, **extra)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(OpenAIModel):
    role: str
    # A string, or OpenAI's list of parts ({"type": "text", "text": ...}).
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    add_generation_prompt: bool = True


class TokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[int]
