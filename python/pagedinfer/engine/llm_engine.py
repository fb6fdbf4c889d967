"""The engine: requests in, `RequestOutput`s out, one `step()` at a time.

A step is: the scheduler picks the tokens to compute → the model runner computes them and samples →
the scheduler records the tokens (forks, EOS, stop tokens, lengths) → here: logprobs, detokenization and
stop strings → outputs. The offline `LLM` and the server drive this same step.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

from transformers import PreTrainedTokenizerBase

from pagedinfer.config import EngineConfig, read_generation_config
from pagedinfer.detokenizer import IncrementalDetokenizer
from pagedinfer.engine.scheduler import Scheduler
from pagedinfer.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedinfer.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from pagedinfer.sampling_params import GenerationDefaults, SamplingParams
from pagedinfer.tokenizer import load_tokenizer
from pagedinfer.worker.model_runner import ModelRunner, PromptLogprobsChunk, TokenLogprobs

# A prompt: text, token ids, or a dict with "prompt" (text) and/or "prompt_token_ids" (as vLLM's).
PromptInput = Union[str, list[int], Mapping[str, object]]


@dataclass
class _SequenceOutput:
    """What the engine keeps of one sequence beside its tokens."""

    detokenizer: Optional[IncrementalDetokenizer]  # None without a tokenizer
    logprobs: Optional[SampleLogprobs]              # None unless asked for


@dataclass
class _Request:
    group: SequenceGroup
    prompt_logprobs: Optional[PromptLogprobs]  # None unless asked for; the first entry is None
    sequences: dict[Sequence, _SequenceOutput] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer: Optional[PreTrainedTokenizerBase] = (
            None if config.tokenizer is None
            else load_tokenizer(config.tokenizer, config.trust_remote_code, config.model.vocab_size))
        self.generation_defaults = GenerationDefaults.from_generation_config(
            read_generation_config(config.model.model))
        self.eos_token_ids = _eos_token_ids(config.model.eos_token_ids, self.tokenizer)
        self.model_runner = ModelRunner(config)
        self.scheduler = Scheduler(
            num_blocks=self.model_runner.cache.num_blocks, block_size=config.cache.block_size,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs, max_model_len=config.model.max_model_len,
            enable_prefix_caching=config.scheduler.enable_prefix_caching,
            preemption_mode=config.scheduler.preemption_mode,
            num_cpu_blocks=self.model_runner.cache.num_cpu_blocks)
        # Seeds of the requests that bring none: reproducible from the engine's seed.
        self._seeds = random.Random(config.seed)
        self._requests: dict[str, _Request] = {}

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("the engine was created with skip_tokenizer_init=True: it has no tokenizer")
        return self.tokenizer

    def add_request(self, request_id: str, prompt: PromptInput,
                    params: Optional[SamplingParams] = None) -> None:
        """Queue a request. Its sampling parameters take the model's generation_config defaults where
        the caller set none. Raises ValueError for a prompt that is empty, longer than max_model_len or
        outside the vocabulary, and for token ids in logit_bias or allowed_token_ids beyond it."""
        text, token_ids = self._parse_prompt(prompt)
        params = (params or SamplingParams()).with_defaults(self.generation_defaults)
        vocab_size = self.config.model.vocab_size
        for name, ids in (("the prompt", token_ids), ("logit_bias", params.logit_bias or {}),
                          ("allowed_token_ids", params.allowed_token_ids or [])):
            if any(not 0 <= token_id < vocab_size for token_id in ids):
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size})")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        group = SequenceGroup(request_id, token_ids, params, eos_token_ids=self.eos_token_ids, seed=seed,
                              prompt=text)
        self.scheduler.add_request(group)
        self._requests[request_id] = _Request(group, None if params.prompt_logprobs is None else [None])

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests and free their blocks; unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self.scheduler.abort_request(rid)
            self._requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one step. Returns the state of every request that got tokens in it (cumulative text
        and tokens); a request's last output has finished=True."""
        step = self.scheduler.schedule()
        if step.is_empty:
            return []
        result = self.model_runner.execute(step)
        sampled = result.sampled
        per_entry, start = [], 0
        for entry in step.scheduled:
            per_entry.append(sampled.token_ids[start:start + entry.num_samples])
            start += entry.num_samples
        received = self.scheduler.update(step, per_entry)
        for chunk in result.prompt_logprobs:
            self._record_prompt_logprobs(step.scheduled[chunk.entry_index].seq, chunk)
        updated: dict[str, _Request] = {}
        # A sampled row per received sequence: aborts come between steps, so none was skipped.
        for row, seq in zip(range(len(sampled.token_ids)), received, strict=True):
            updated[seq.request_id] = request = self._requests[seq.request_id]
            self._record_token(request, seq, sampled, row)
        outputs = [self._request_output(request) for request in updated.values()]
        for output in outputs:
            if output.finished:
                del self._requests[output.request_id]
        return outputs

    def _parse_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        """(the prompt text, if any; its token ids)."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        elif not isinstance(prompt, Mapping):
            prompt = {"prompt_token_ids": prompt}
        text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if token_ids is not None:
            return text, list(token_ids)
        if text is None:
            raise ValueError(f"a prompt needs 'prompt' (text) or 'prompt_token_ids', got {prompt!r}")
        return text, self.get_tokenizer().encode(text)

    def _record_token(self, request: _Request, seq: Sequence, sampled: TokenLogprobs, row: int) -> None:
        """A sampled token's logprobs, text and stop strings."""
        params = seq.sampling_params
        if seq not in request.sequences:  # its first token (siblings appear when the prompt completes)
            detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, params)
            request.sequences[seq] = _SequenceOutput(detokenizer, None if params.logprobs is None else [])
        output = request.sequences[seq]
        seq.cumulative_logprob += sampled.logprobs[row]
        if output.logprobs is not None:
            output.logprobs.append(self._logprob_dict(sampled, row, params.logprobs))
        if output.detokenizer is not None:
            stop_terminated = seq.status is SequenceStatus.FINISHED_STOPPED  # EOS or a stop token
            update = output.detokenizer.update([seq.last_token_id], stop_terminated, seq.is_finished)
            if update.stop_string is not None:
                self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, update.stop_string)

    def _record_prompt_logprobs(self, seq: Sequence, chunk: PromptLogprobsChunk) -> None:
        prompt_logprobs = self._requests[seq.request_id].prompt_logprobs
        num_top = seq.sampling_params.prompt_logprobs
        for row in range(len(chunk.logprobs.token_ids)):
            # A prompt computed again (preempted before its first token) brings positions we have.
            if len(prompt_logprobs) == chunk.first_position + row:
                prompt_logprobs.append(self._logprob_dict(chunk.logprobs, row, num_top))

    def _logprob_dict(self, logprobs: TokenLogprobs, row: int, num_top: int) -> dict[int, Logprob]:
        """vLLM's layout: the token itself first, then the top num_top by rank."""
        token_ids = [logprobs.token_ids[row], *logprobs.top_token_ids[row][:num_top]]
        values = [logprobs.logprobs[row], *logprobs.top_logprobs[row][:num_top]]
        ranks = [logprobs.ranks[row], *range(1, len(token_ids))]
        texts = ([None] * len(token_ids) if self.tokenizer is None
                 else self.tokenizer.batch_decode([[token_id] for token_id in token_ids]))
        return {token_id: Logprob(value, rank, text)
                for token_id, value, rank, text in zip(token_ids, values, ranks, texts)}

    def _request_output(self, request: _Request) -> RequestOutput:
        group = request.group
        outputs = []
        for seq in group.select_outputs():
            output = request.sequences[seq]
            outputs.append(CompletionOutput(
                index=seq.index,
                text="" if output.detokenizer is None else output.detokenizer.text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=None if output.logprobs is None else list(output.logprobs),
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason))
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=None if request.prompt_logprobs is None else list(request.prompt_logprobs),
            outputs=outputs, finished=group.is_finished, num_cached_tokens=group.num_cached_tokens)


def _eos_token_ids(model_eos_ids: tuple[int, ...],
                   tokenizer: Optional[PreTrainedTokenizerBase]) -> tuple[int, ...]:
    """Every EOS of generation_config (chat models list several), and the tokenizer's own."""
    tokenizer_eos = () if tokenizer is None or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    return tuple(dict.fromkeys(model_eos_ids + tokenizer_eos))
