"""`LLM`: vLLM's offline API. Give it prompts, get every completion back, batched by the engine."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pagedinfer.config import EngineConfig
from pagedinfer.engine.llm_engine import LLMEngine, PromptInput
from pagedinfer.outputs import RequestOutput
from pagedinfer.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """A model, its tokenizer and a KV cache, ready to generate.

    model: a local HF folder or .gguf file; None loads `pagedinfer.DEFAULT_MODEL` (SmolLM2-135M-Instruct).
    device: "auto" is CUDA when available, else the CPU. max_model_len: the model's context length
    unless set. max_num_batched_tokens: the tokens a step computes (longer prompts are split into
    chunks); default 8192 on CUDA, 4096 on the CPU. The KV cache takes gpu_memory_utilization of the
    card (kv_cache_space GiB on the CPU), or num_gpu_blocks_override blocks: what is left once the
    weights, the peak of the largest step (profiled at load) and the CUDA graphs are counted.
    preemption_mode: when the KV cache is full, "recompute" (the default) drops a preempted request's
    KV to compute it again; "swap" moves it to a CPU swap space of swap_space GiB and back.
    On CUDA, decode steps replay CUDA graphs captured at load for batch sizes 1, 2, 4, 8, 16, ... up
    to max_num_seqs (512 at most; larger batches run eagerly); enforce_eager=True runs every step
    eagerly instead (no capture, no graph memory). A model folder without tokenizer files gets a
    synthetic byte-level tokenizer of the model's vocabulary (with a warning); skip_tokenizer_init=True
    loads no tokenizer: prompts must be token ids, outputs have no text.
    """

    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, dtype: str = "auto",
                 seed: int = 0, max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 swap_space: float = 4, enforce_eager: bool = False, max_num_seqs: int = 256,
                 max_num_batched_tokens: Optional[int] = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, num_gpu_blocks_override: Optional[int] = None,
                 quantization: Optional[str] = None, load_format: str = "auto",
                 tensor_parallel_size: int = 1, trust_remote_code: bool = False, device: str = "auto",
                 kv_cache_space: float = 4, skip_tokenizer_init: bool = False,
                 preemption_mode: str = "recompute") -> None:
        if quantization is not None:
            raise ValueError(f"quantization={quantization!r} is not supported yet")
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} is not supported yet "
                             f"(one device only)")
        if model is None:
            from pagedinfer.default_model import default_model_path
            model = default_model_path()
        config = EngineConfig.create(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, enable_prefix_caching=enable_prefix_caching,
            num_gpu_blocks_override=num_gpu_blocks_override,
            gpu_memory_utilization=gpu_memory_utilization, swap_space=swap_space,
            preemption_mode=preemption_mode, kv_cache_space=kv_cache_space, load_format=load_format,
            seed=seed, trust_remote_code=trust_remote_code, skip_tokenizer_init=skip_tokenizer_init,
            enforce_eager=enforce_eager)
        self.llm_engine = LLMEngine(config)
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.llm_engine.get_tokenizer()

    def generate(self, prompts: Union[PromptInput, Sequence[PromptInput]],
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (a string, {"prompt": text} or {"prompt_token_ids": ids}, or a list of
        them) with one SamplingParams for all or one per prompt. Outputs come in the prompts' order."""
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts: "
                             f"give one for all, or one per prompt")
        return self._run(list(zip(prompts, sampling_params)), use_tqdm)

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to a list of them,
        each rendered by the tokenizer's chat template (or `chat_template`)."""
        tokenizer = self.get_tokenizer()
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
            # The template writes the special tokens (BOS included) itself.
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, requests: list[tuple[PromptInput, SamplingParams]], use_tqdm: bool) -> list[RequestOutput]:
        request_ids: list[str] = []
        try:
            for prompt, params in requests:
                request_ids.append(str(next(self._request_ids)))
                self.llm_engine.add_request(request_ids[-1], prompt, params)
            return self._run_engine(request_ids, use_tqdm)
        except BaseException:
            # A bad prompt (or Ctrl-C) must not leave the others queued for the next call.
            self.llm_engine.abort_request(request_ids)
            raise

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        num_prompt_tokens = num_output_tokens = 0
        with tqdm(total=len(request_ids), desc="Processed prompts", unit="prompt", dynamic_ncols=True,
                  disable=not use_tqdm) as progress:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if not output.finished:
                        continue
                    finished[output.request_id] = output
                    num_prompt_tokens += len(output.prompt_token_ids)
                    num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
                    elapsed = progress.format_dict["elapsed"] or 1e-9
                    progress.set_postfix_str(f"input: {num_prompt_tokens / elapsed:.1f} toks/s, "
                                             f"output: {num_output_tokens / elapsed:.1f} toks/s",
                                             refresh=False)
                    progress.update(1)
        return [finished[request_id] for request_id in request_ids]
