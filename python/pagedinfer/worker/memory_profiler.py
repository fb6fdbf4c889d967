"""KV-cache sizing on CUDA by profiling: after the weights are loaded, run the largest step the scheduler
can form and measure its peak, then give the KV cache what is left of gpu_memory_utilization of the card.

The profiled step is a forward over max_num_batched_tokens prompt tokens (as many sequences of at most
max_model_len as that takes, attending over a one-block cache that every block table points at), the
logits of max_num_seqs rows in float32, and a sampler pass over them with every logits processor on:
the most a step allocates at once. Prompt logprobs are computed max_num_seqs rows at a time
(model_runner), so they never hold more logits than this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pagedinfer.attention import AttentionMetadata
from pagedinfer.config import EngineConfig, ModelConfig
from pagedinfer.layers.sampler import Sampler, SamplingBatch
from pagedinfer.sampling_params import SamplingParams
from pagedinfer.worker.cache_engine import kv_block_bytes

logger = logging.getLogger(__name__)

_GIB = 1 << 30
# Besides the decode intermediates, capture takes the cuBLAS workspaces of its own stream, each graph's
# output and the instantiated graphs (driver memory), and first loads the decode kernels: a fixed
# allowance covers them (0.3% of an 80 GB card; the real size is logged after capture).
_GRAPH_POOL_FIXED_BYTES = 256 << 20


def profile_sequence_lengths(max_num_batched_tokens: int, max_model_len: int, max_num_seqs: int) -> list[int]:
    """The prompt lengths of the largest step: max_num_batched_tokens tokens (no more than max_num_seqs
    sequences of max_model_len can bring), in sequences of at most max_model_len, as equal as can be."""
    for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", max_model_len),
                        ("max_num_seqs", max_num_seqs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    num_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    num_seqs = -(-num_tokens // max_model_len)
    base, extra = divmod(num_tokens, num_seqs)
    return [base + 1] * extra + [base] * (num_seqs - extra)


def graph_pool_reserve_bytes(model: ModelConfig, max_batch_size: int) -> int:
    """What the CUDA graphs of decode steps are expected to take (captured after the cache exists, so
    it is reserved in advance; the real size is logged after capture): twice the intermediates of a
    layer for the largest captured batch (the widest being gate|up and what feeds and leaves it), plus
    a fixed allowance."""
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    q_and_kv = (model.num_attention_heads + 2 * model.num_key_value_heads) * model.head_dim
    per_token = (3 * model.intermediate_size + q_and_kv + 4 * model.hidden_size) * itemsize
    return 2 * max_batch_size * per_token + _GRAPH_POOL_FIXED_BYTES


@dataclass(frozen=True)
class MemoryProfile:
    total_bytes: int            # the card's memory
    in_use_bytes: int           # used after profiling: weights, buffers, CUDA context, other processes
    weights_bytes: int          # allocated by this process once the model was loaded
    activation_peak_bytes: int  # the profiled step's peak allocation beyond what was allocated before


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float, graph_reserve_bytes: int) -> int:
    """gpu_memory_utilization of the card, less what is in use, a step's peak and the graph reserve
    (may be negative: nothing is left)."""
    return int(gpu_memory_utilization * profile.total_bytes - profile.in_use_bytes
               - profile.activation_peak_bytes - graph_reserve_bytes)


def num_gpu_kv_blocks(profile: MemoryProfile, config: EngineConfig, graph_reserve_bytes: int) -> int:
    """The block count the profile leaves room for, logged with the memory split. Raises ValueError
    when not one block fits."""
    cache, model = config.cache, config.model
    block_bytes = kv_block_bytes(model, cache.block_size)
    budget = kv_cache_bytes(profile, cache.gpu_memory_utilization, graph_reserve_bytes)
    if budget < block_bytes:
        raise ValueError(
            f"no GPU memory is left for the KV cache: gpu_memory_utilization {cache.gpu_memory_utilization} "
            f"allows {cache.gpu_memory_utilization * profile.total_bytes / _GIB:.2f} of "
            f"{profile.total_bytes / _GIB:.2f} GiB, {profile.in_use_bytes / _GIB:.2f} GiB are in use after "
            f"loading the model (weights {profile.weights_bytes / _GIB:.2f} GiB), a step peaks at "
            f"{profile.activation_peak_bytes / _GIB:.2f} GiB and CUDA graphs are allowed "
            f"{graph_reserve_bytes / _GIB:.2f} GiB: raise gpu_memory_utilization, or lower "
            f"max_num_batched_tokens or max_num_seqs (or set enforce_eager)")
    num_blocks = budget // block_bytes
    tokens = num_blocks * cache.block_size
    logger.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB); memory: weights %.2f GiB, activation peak %.2f GiB, "
        "CUDA graph reserve %.2f GiB, other in use (CUDA context, buffers, other processes) %.2f GiB, "
        "of %.2f GiB allowed (gpu_memory_utilization %s x %.2f GiB); maximum concurrency at max_model_len "
        "%d: %.2fx",
        num_blocks, cache.block_size, num_blocks * block_bytes / _GIB, profile.weights_bytes / _GIB,
        profile.activation_peak_bytes / _GIB, graph_reserve_bytes / _GIB,
        (profile.in_use_bytes - profile.weights_bytes) / _GIB,
        cache.gpu_memory_utilization * profile.total_bytes / _GIB, cache.gpu_memory_utilization,
        profile.total_bytes / _GIB, model.max_model_len, tokens / model.max_model_len)
    return num_blocks


@torch.inference_mode()
def profile_gpu_memory(model: nn.Module, config: EngineConfig, weights_bytes: int,
                       workspace: torch.Tensor | None) -> MemoryProfile:
    """Run the largest step (module docstring) and measure. weights_bytes: allocated once the model was
    loaded."""
    device = config.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_largest_step(model, config, workspace)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    # The step's blocks go back to the card: what stays in use is the model's and everyone else's.
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(total_bytes=total, in_use_bytes=total - free, weights_bytes=weights_bytes,
                         activation_peak_bytes=peak)


def run_largest_step(model: nn.Module, config: EngineConfig, workspace: torch.Tensor | None
                     ) -> tuple[int, int]:
    """The profiled step (module docstring), on any device. Returns (tokens computed, rows sampled)."""
    model_config, scheduler, block_size = config.model, config.scheduler, config.cache.block_size
    device = config.device
    lengths = profile_sequence_lengths(scheduler.max_num_batched_tokens, model_config.max_model_len,
                                       scheduler.max_num_seqs)
    # One block a layer, which every table entry names: attention reads (and the cache write writes)
    # in range, and the real cache is not allocated yet.
    kv_caches = [torch.zeros(2, 1, block_size, model_config.num_key_value_heads, model_config.head_dim,
                             dtype=model_config.dtype, device=device)
                 for _ in range(model_config.num_hidden_layers)]
    metadata = AttentionMetadata.build(
        seq_lens=lengths, query_lens=lengths, block_tables=[[0] * -(-n // block_size) for n in lengths],
        block_size=block_size, device=device, workspace=workspace)
    num_tokens = sum(lengths)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    hidden_states = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, kv_caches,
                          metadata)
    rows = scheduler.max_num_seqs
    logits = model.compute_logits(hidden_states[torch.arange(rows, device=device) % num_tokens])
    # Every processor on, so that each of its [rows, vocab] temporaries is counted.
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.1,
                            frequency_penalty=0.1, repetition_penalty=1.1, logit_bias={0: 0.0},
                            allowed_token_ids=[0, 1], logprobs=20)
    history = [[0, 1]] * rows
    batch = SamplingBatch.build(params=[params] * rows, seeds=list(range(rows)), offsets=[0] * rows,
                                prompt_ids=history, output_ids=history, banned=[[0]] * rows,
                                vocab_size=model_config.vocab_size, device=device)
    sampled = Sampler()(logits, batch)
    return num_tokens, sampled.token_ids.shape[0]
