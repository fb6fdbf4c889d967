"""Batched sampling: logits [n, vocab] -> one token per row, with vLLM's logits processing and logprobs.

Order of operations (vLLM's): logprobs from the raw logits; logit_bias and the allowed/banned masks; the
repetition, frequency and presence penalties; greedy rows take the argmax; the other rows divide by their
temperature, apply min_p, top_k and top_p, and sample with an exponential race: argmax(p_j / E_j) with
E_j ~ Exp(1). The first of independent exponential clocks with rates p_j to ring is token j with
probability p_j, so this samples from p; E comes from Philox noise keyed by the request's (seed, offset),
so a row's token depends on its logits, seed and offset only, never on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch
from torch import Tensor, nn

from pagedinfer import _ops
from pagedinfer.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """The sampling parameters of one step, one row per token to sample, on the logits' device."""

    temperature: Tensor                   # [n] float32, 0 for greedy rows
    top_p: Tensor                         # [n] float32, 1 = off
    top_k: Tensor                         # [n] int64, vocab size = off
    min_p: Tensor                         # [n] float32, 0 = off
    presence_penalty: Tensor              # [n] float32
    frequency_penalty: Tensor             # [n] float32
    repetition_penalty: Tensor            # [n] float32, 1 = off
    seeds: Tensor                         # [n] int64
    offsets: Tensor                       # [n] int64: (sibling index << 32) | output position
    output_token_ids: Tensor              # [n, max_out] int64, -1 padded; [n, 0] when no row has a penalty
    prompt_token_ids: Tensor              # [n, max_prompt] int64, -1 padded; [n, 0] without repetition penalty
    logit_bias: Optional[Tensor]          # [n, vocab] float32, None when no row has a bias
    allowed_token_mask: Optional[Tensor]  # [n, vocab] bool, True = may be sampled; None = all may
    min_tokens_mask: Optional[Tensor]     # [n, vocab] bool, True = banned this step (min_tokens); None = none
    num_logprobs: int                     # most top logprobs any row asks for (0 = none)
    all_greedy: bool
    # Host-side facts about the rows, so that forward() skips what no row needs without reading the device.
    any_penalties: bool = True
    any_min_p: bool = True
    any_top_k_top_p: bool = True

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], offsets: list[int],
              prompt_ids: list[list[int]], output_ids: list[list[int]], banned: list[list[int]],
              vocab_size: int, device: torch.device | str) -> SamplingBatch:
        """One row per entry of params. seeds: any Python ints (taken modulo 2^64); banned: the token ids
        each row must not sample this step (stop and EOS ids while min_tokens is not reached)."""
        n = len(params)
        if not n == len(seeds) == len(offsets) == len(prompt_ids) == len(output_ids) == len(banned):
            raise ValueError("SamplingBatch.build needs one seed, offset, prompt, output and banned list per "
                             f"row: got {n} params, {len(seeds)} seeds, {len(offsets)} offsets, "
                             f"{len(prompt_ids)} prompts, {len(output_ids)} outputs, {len(banned)} banned")

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def longs(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        any_repetition = any(p.repetition_penalty != 1.0 for p in params)
        any_penalties = any_repetition or any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                                              for p in params)
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        return cls(
            temperature=floats([0.0 if p.is_greedy else p.temperature for p in params]),
            top_p=floats([p.top_p for p in params]),
            top_k=longs(top_k),
            min_p=floats([p.min_p for p in params]),
            presence_penalty=floats([p.presence_penalty for p in params]),
            frequency_penalty=floats([p.frequency_penalty for p in params]),
            repetition_penalty=floats([p.repetition_penalty for p in params]),
            seeds=longs([_wrap_int64(s) for s in seeds]),
            offsets=longs([_wrap_int64(o) for o in offsets]),
            # Penalties are the only readers of the token histories: don't copy them otherwise.
            output_token_ids=_padded(output_ids if any_penalties else [[]] * n, device),
            prompt_token_ids=_padded(prompt_ids if any_repetition else [[]] * n, device),
            logit_bias=_logit_bias(params, vocab_size, device),
            allowed_token_mask=_allowed_token_mask(params, vocab_size, device),
            # Ids beyond the logits (a stop id of the tokenizer's added tokens) can't be sampled anyway.
            min_tokens_mask=_token_mask([[t for t in ids if 0 <= t < vocab_size] for ids in banned],
                                        vocab_size, device),
            num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            all_greedy=all(p.is_greedy for p in params),
            any_penalties=any_penalties,
            any_min_p=any(p.min_p > 0.0 for p in params),
            any_top_k_top_p=any(k < vocab_size or p.top_p < 1.0 for k, p in zip(top_k, params)),
        )


@dataclass
class SamplerOutput:
    token_ids: Tensor                # [n] int64
    logprobs: Tensor                 # [n] float32: the sampled token's logprob under the raw logits
    ranks: Tensor                    # [n] int64: its rank under the raw logits (1 = most likely)
    top_logprobs: Optional[Tensor]   # [n, num_logprobs] float32, descending (None if num_logprobs == 0)
    top_token_ids: Optional[Tensor]  # [n, num_logprobs] int64


class Sampler(nn.Module):
    def forward(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [n, vocab] float32, one row per row of batch."""
        logits = logits.float()
        processed = process_logits(logits, batch)
        greedy_ids = processed.argmax(dim=-1)
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            token_ids = torch.where(batch.temperature == 0, greedy_ids, sample(processed, batch))
        logprobs, ranks, top_logprobs, top_ids = token_logprobs(logits, token_ids, batch.num_logprobs)
        return SamplerOutput(token_ids, logprobs, ranks, top_logprobs, top_ids)


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """logits + logit_bias, tokens disallowed or banned at -inf, then the penalties. A new tensor when
    anything applies: the raw logits stay intact for the logprobs."""
    if (batch.logit_bias is None and batch.allowed_token_mask is None and batch.min_tokens_mask is None
            and not batch.any_penalties):
        return logits
    x = logits.clone()
    if batch.logit_bias is not None:
        x += batch.logit_bias
    if batch.allowed_token_mask is not None:
        x.masked_fill_(~batch.allowed_token_mask, _NEG_INF)
    if batch.min_tokens_mask is not None:
        x.masked_fill_(batch.min_tokens_mask, _NEG_INF)
    if batch.any_penalties:
        apply_penalties(x, batch)
    return x


def apply_penalties(x: Tensor, batch: SamplingBatch) -> None:
    """In place, as vLLM: repetition divides positive and multiplies negative logits of every token seen
    in the prompt or the output; frequency subtracts penalty * count and presence penalty * (count > 0)
    for the output's tokens."""
    vocab_size = x.shape[1]
    output_counts = _token_counts(batch.output_token_ids, vocab_size)
    seen = (_token_counts(batch.prompt_token_ids, vocab_size) + output_counts) > 0
    repetition = batch.repetition_penalty[:, None]
    x.copy_(torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x))
    x -= batch.frequency_penalty[:, None] * output_counts
    x -= batch.presence_penalty[:, None] * (output_counts > 0)


def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[n] tokens drawn from softmax(logits / temperature) after min_p, top_k and top_p. Greedy rows
    (temperature 0) get a draw at temperature 1, which the caller replaces by their argmax."""
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    x = logits / temperature[:, None]
    if batch.any_min_p:
        apply_min_p(x, batch.min_p)
    if batch.any_top_k_top_p:
        apply_top_k_top_p(x, batch.top_k, batch.top_p)
    probs = x.softmax(dim=-1)
    exponential = _ops.philox_uniform(batch.seeds, batch.offsets, x.shape[1]).log_().neg_()
    return probs.div_(exponential).argmax(dim=-1)


def apply_min_p(x: Tensor, min_p: Tensor) -> None:
    """In place: drop tokens whose probability is below min_p times the row's largest. Compared in log
    space (x < max + log(min_p)), which needs no softmax; min_p = 0 gives log 0 = -inf, dropping nothing."""
    threshold = x.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    x.masked_fill_(x < threshold, _NEG_INF)


def apply_top_k_top_p(x: Tensor, top_k: Tensor, top_p: Tensor) -> None:
    """In place: keep the k largest logits, then of those the fewest largest whose renormalized
    probability reaches top_p. Both become one threshold logit per row, found in one sort; tokens tied
    with it are all kept, so the result does not depend on how the sort orders ties."""
    sorted_x = x.sort(dim=-1, descending=True).values
    position = torch.arange(x.shape[1], device=x.device)
    sorted_x.masked_fill_(position >= top_k[:, None], _NEG_INF)
    probs = sorted_x.softmax(dim=-1)
    # Mass of the tokens before each position: a shifted cumsum, non-decreasing even when rounded.
    mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    # top_p = 1 keeps everything even where the rounded mass reaches 1 before the last token.
    in_nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep = torch.minimum(in_nucleus.sum(dim=-1), top_k)  # >= 1: position 0 has mass_before 0 < top_p
    threshold = sorted_x.gather(1, (keep - 1)[:, None])
    x.masked_fill_(x < threshold, _NEG_INF)


def token_logprobs(logits: Tensor, token_ids: Tensor, num_logprobs: int
                   ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Under log_softmax(logits [m, vocab]): the logprob [m] of token_ids [m], its rank [m] (1 = most
    likely, ties share the better rank), and the top num_logprobs (logprobs, ids) [m, k] of each row
    (None, None for 0)."""
    log_normalizer = logits.logsumexp(dim=-1, keepdim=True)
    token_logits = logits.gather(1, token_ids[:, None])
    ranks = (logits > token_logits).sum(dim=-1) + 1
    logprobs = (token_logits - log_normalizer).squeeze(1)
    if num_logprobs == 0:
        return logprobs, ranks, None, None
    top_logits, top_ids = logits.topk(min(num_logprobs, logits.shape[1]), dim=-1)
    return logprobs, ranks, top_logits - log_normalizer, top_ids


def compute_prompt_logprobs(logits: Tensor, next_token_ids: Tensor, num_logprobs: int
                            ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """prompt_logprobs from the raw logits [m, vocab] of m prompt positions: (logprob [m] and rank [m] of
    the prompt token that follows each position, top logprobs [m, k], their ids [m, k]); None, None
    for num_logprobs == 0."""
    return token_logprobs(logits.float(), next_token_ids, num_logprobs)


# ---- building the batch ----------------------------------------------------------------------------

def _wrap_int64(value: int) -> int:
    """A Python int as the int64 with the same low 64 bits (seeds may be any int, as in vLLM)."""
    return (value + 2**63) % 2**64 - 2**63


def _padded(rows: list[list[int]], device: torch.device | str) -> Tensor:
    """[len(rows), longest] int64, each row left-aligned and padded with -1, filled in one host copy."""
    lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.int64)
    width = max(map(len, rows), default=0)
    padded = torch.full((len(rows), width), -1, dtype=torch.int64)
    padded[torch.arange(width) < lengths[:, None]] = torch.tensor(list(chain.from_iterable(rows)),
                                                                   dtype=torch.int64)
    return padded.to(device)


def _token_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[n, vocab] float32 occurrences of each token in each row of token_ids [n, width] (-1 = padding)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    # Padding goes to an extra column, dropped at the end.
    columns = token_ids.masked_fill(token_ids < 0, vocab_size)
    counts.scatter_add_(1, columns, torch.ones(columns.shape, device=token_ids.device))
    return counts[:, :vocab_size]


def _check_token_ids(name: str, token_ids: list[int], vocab_size: int) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{name} has token id {token_id}, out of the vocabulary [0, {vocab_size})")


def _token_mask(token_ids: list[list[int]], vocab_size: int, device: torch.device | str) -> Optional[Tensor]:
    """[n, vocab] bool, True at token_ids[i] in row i; None when every list is empty."""
    if not any(token_ids):
        return None
    mask = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    rows = [i for i, ids in enumerate(token_ids) for _ in ids]
    mask[torch.tensor(rows, device=device), torch.tensor(list(chain.from_iterable(token_ids)), device=device)] = True
    return mask


def _allowed_token_mask(params: list[SamplingParams], vocab_size: int,
                        device: torch.device | str) -> Optional[Tensor]:
    if all(p.allowed_token_ids is None for p in params):
        return None
    for p in params:
        _check_token_ids("allowed_token_ids", p.allowed_token_ids or [], vocab_size)
    allowed = _token_mask([p.allowed_token_ids or [] for p in params], vocab_size, device)
    unrestricted = [i for i, p in enumerate(params) if p.allowed_token_ids is None]
    allowed[torch.tensor(unrestricted, dtype=torch.int64, device=device)] = True
    return allowed


def _logit_bias(params: list[SamplingParams], vocab_size: int, device: torch.device | str) -> Optional[Tensor]:
    biases = [p.logit_bias or {} for p in params]
    if not any(biases):
        return None
    rows, token_ids, values = [], [], []
    for i, bias in enumerate(biases):
        _check_token_ids("logit_bias", list(bias), vocab_size)
        rows += [i] * len(bias)
        token_ids += bias.keys()
        values += bias.values()
    dense = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    dense[torch.tensor(rows, device=device), torch.tensor(token_ids, device=device)] = torch.tensor(
        values, dtype=torch.float32, device=device)
    return dense
