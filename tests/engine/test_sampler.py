"""The sampler: Philox noise (exact values, statistics, independence of the batch, CPU == CUDA), logits
processing against a per-row reference, filters that never let a filtered token through, the sampling
distribution, determinism whatever the batch, and logprobs of the raw logits."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from pagedinfer import _ops
from pagedinfer.layers.sampler import Sampler, SamplingBatch, compute_prompt_logprobs, process_logits
from pagedinfer.sampling_params import SamplingParams

MASK32 = 0xFFFFFFFF


# ---- Philox ----------------------------------------------------------------------------------------

def ref_philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 in Python integers, written from the paper."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK32]
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c


def ref_uniform(seed: int, offset: int, column: int) -> float:
    """The op's contract: key = seed, counter = (column // 4, offset), word column % 4 -> (2k + 1) / 2^24."""
    seed, offset, group = seed % 2**64, offset % 2**64, column // 4
    words = ref_philox4x32_10((group & MASK32, group >> 32, offset & MASK32, offset >> 32),
                              (seed & MASK32, seed >> 32))
    return (2 * (words[column % 4] >> 9) + 1) / 2**24


@pytest.mark.parametrize("counter, key, expected", [  # Random123's known-answer vectors
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_matches_known_answers(counter, key, expected):
    assert ref_philox4x32_10(counter, key) == list(expected)


def seeds_and_offsets(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeds over the whole int64 range; offsets (sibling << 32) | position, as the engine makes them."""
    seeds = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64)
    offsets = (torch.randint(0, 4, (n,)) << 32) | torch.randint(0, 5000, (n,))
    return seeds.to(device), offsets.to(device)


@pytest.mark.parametrize("num_columns", [1, 6, 37, 64])  # odd widths: the scalar-store path on CUDA
def test_philox_uniform_is_philox4x32_10(device, num_columns):
    seeds, offsets = seeds_and_offsets(5, device)
    out = _ops.philox_uniform(seeds, offsets, num_columns).cpu()
    expected = [[ref_uniform(s, o, j) for j in range(num_columns)] for s, o in zip(seeds.tolist(), offsets.tolist())]
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("num_columns", [1001, 4096])
def test_philox_uniform_cpu_equals_cuda(num_columns):
    seeds, offsets = seeds_and_offsets(33, "cpu")
    on_cpu = _ops.philox_uniform(seeds, offsets, num_columns)
    on_cuda = _ops.philox_uniform(seeds.cuda(), offsets.cuda(), num_columns)
    assert torch.equal(on_cpu, on_cuda.cpu())


def test_philox_uniform_statistics(device):
    seeds, offsets = seeds_and_offsets(64, device)
    u = _ops.philox_uniform(seeds, offsets, 4096).double().cpu()
    assert u.min() > 0 and u.max() < 1
    # 262144 values: the mean's standard deviation is 0.29 / 512 = 5.6e-4; a correlation's is 0.002.
    assert abs(u.mean().item() - 0.5) < 3e-3
    assert abs(u.var().item() - 1 / 12) < 2e-3
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.01
    # Rows that differ by one in offset, then in seed, are uncorrelated too.
    same_seed = torch.full((64,), 7, dtype=torch.int64, device=device)
    by_offset = _ops.philox_uniform(same_seed, torch.arange(64, device=device), 4096).double().cpu()
    by_seed = _ops.philox_uniform(torch.arange(64, device=device), same_seed, 4096).double().cpu()
    for rows in (by_offset, by_seed):
        assert abs(torch.corrcoef(torch.stack([rows[:-1].flatten(), rows[1:].flatten()]))[0, 1]) < 0.01


def test_philox_uniform_rows_do_not_depend_on_the_batch(device):
    seeds, offsets = seeds_and_offsets(10, device)
    full = _ops.philox_uniform(seeds, offsets, 300)
    order = torch.tensor([7, 2, 9, 0], device=device)
    assert torch.equal(_ops.philox_uniform(seeds[order], offsets[order], 300), full[order])
    assert torch.equal(_ops.philox_uniform(seeds[3:4], offsets[3:4], 300), full[3:4])


@pytest.mark.parametrize("change, message", [
    (lambda out, seeds, offsets: (out, seeds.int(), offsets), "seeds must be Long"),
    (lambda out, seeds, offsets: (out, seeds, offsets[:3]), "offsets has 3 elements but out has 4 rows"),
    (lambda out, seeds, offsets: (out.half(), seeds, offsets), "out must be Float"),
    (lambda out, seeds, offsets: (out[:, ::2], seeds, offsets), "out must be contiguous"),
    (lambda out, seeds, offsets: (out, seeds[:, None], offsets), "seeds must have 1 dimensions"),
])
def test_philox_uniform_errors_name_the_argument(device, change, message):
    args = change(torch.empty(4, 10, device=device), *seeds_and_offsets(4, device))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pagedinfer.philox_uniform(*args)


def test_philox_uniform_opcheck(device):
    torch.library.opcheck(torch.ops.pagedinfer.philox_uniform.default,
                          (torch.empty(3, 17, device=device), *seeds_and_offsets(3, device)))


# ---- sampler ---------------------------------------------------------------------------------------

def make_batch(params: list[SamplingParams], vocab_size: int, device: str, *,
               seeds: Optional[list[int]] = None, offsets: Optional[list[int]] = None,
               prompts: Optional[list[list[int]]] = None, outputs: Optional[list[list[int]]] = None,
               banned: Optional[list[list[int]]] = None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, seeds if seeds is not None else [1234] * n,
                               offsets if offsets is not None else list(range(n)),
                               prompts or [[]] * n, outputs or [[]] * n, banned or [[]] * n, vocab_size, device)


def test_build_normalizes_the_parameters():
    params = [SamplingParams(temperature=0.0, top_k=5), SamplingParams(top_k=-1, top_p=0.5),
              SamplingParams(top_k=1000, logprobs=4), SamplingParams(top_k=3, logprobs=2)]
    batch = make_batch(params, 100, "cpu", seeds=[2**64 + 5, -1, 2**63, 0])
    assert batch.temperature.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert batch.top_k.tolist() == [100, 100, 100, 3]  # greedy resets top_k; -1 and > vocab are off
    assert batch.seeds.tolist() == [5, -1, -2**63, 0]  # any Python int, modulo 2^64
    assert batch.num_logprobs == 4 and not batch.all_greedy
    assert not batch.any_penalties and not batch.any_min_p and batch.any_top_k_top_p
    assert batch.logit_bias is None and batch.allowed_token_mask is None and batch.min_tokens_mask is None
    assert batch.output_token_ids.shape == (4, 0) and batch.prompt_token_ids.shape == (4, 0)


def test_build_pads_the_token_histories_penalties_read():
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams(presence_penalty=0.5)]
    batch = make_batch(params, 50, "cpu", prompts=[[1, 2, 3], [4]], outputs=[[], [5, 6]], banned=[[7, 50], [99]])
    assert batch.output_token_ids.tolist() == [[-1, -1], [5, 6]]
    assert batch.prompt_token_ids.tolist() == [[1, 2, 3], [4, -1, -1]]
    assert batch.any_penalties
    # Ids beyond the vocabulary can never be sampled: banning them is a no-op.
    assert batch.min_tokens_mask.nonzero().tolist() == [[0, 7]]


@pytest.mark.parametrize("params, message", [
    (SamplingParams(logit_bias={60: 1.0}), r"logit_bias has token id 60, out of the vocabulary \[0, 50\)"),
    (SamplingParams(allowed_token_ids=[3, 50]), "allowed_token_ids has token id 50"),
])
def test_build_rejects_token_ids_outside_the_vocabulary(params, message):
    with pytest.raises(ValueError, match=message):
        make_batch([params], 50, "cpu")


def test_build_needs_one_entry_per_row():
    with pytest.raises(ValueError, match="2 params, 1 seeds"):
        SamplingBatch.build([SamplingParams()] * 2, [0], [0, 0], [[]] * 2, [[]] * 2, [[]] * 2, 10, "cpu")


def test_greedy_is_argmax(device):
    logits = torch.randn(9, 50, device=device)
    batch = make_batch([SamplingParams(temperature=0.0)] * 9, 50, device)
    assert batch.all_greedy
    assert torch.equal(Sampler()(logits, batch).token_ids, logits.argmax(dim=-1))
    # In a mixed batch the greedy rows still take the argmax.
    mixed = make_batch([SamplingParams(temperature=0.0 if i % 2 else 1.5) for i in range(9)], 50, device)
    assert torch.equal(Sampler()(logits, mixed).token_ids[1::2], logits.argmax(dim=-1)[1::2])


def ref_process_row(x: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                    banned: list[int]) -> torch.Tensor:
    """vLLM's logits processing of one row, token by token."""
    x = x.clone()
    for token, bias in (params.logit_bias or {}).items():
        x[token] += bias
    if params.allowed_token_ids is not None:
        disallowed = torch.ones_like(x, dtype=torch.bool)
        disallowed[params.allowed_token_ids] = False
        x[disallowed] = float("-inf")
    x[banned] = float("-inf")
    for token in set(prompt) | set(output):
        penalty = params.repetition_penalty
        x[token] = x[token] / penalty if x[token] > 0 else x[token] * penalty
    for token in set(output):
        x[token] -= params.frequency_penalty * output.count(token)
        x[token] -= params.presence_penalty
    return x


def test_processing_matches_a_per_row_reference(device):
    vocab = 30
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.7),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, logit_bias={3: 5.0, 29: -2.5}),
        SamplingParams(allowed_token_ids=[1, 4, 9, 16], frequency_penalty=-1.1),
        SamplingParams(presence_penalty=2.0, logit_bias={0: 1.0}),
        SamplingParams(),
    ]
    prompts = [[1, 2, 2, 7], [3, 4, 5], [9, 9], [], [8, 8, 8]]
    outputs = [[2, 2, 2, 11, 12], [], [9, 4, 4], [0, 0, 13], [20]]
    banned = [[], [28], [4], [], [0, 1]]
    logits = torch.randn(5, vocab, device=device) * 3
    batch = make_batch(params, vocab, device, prompts=prompts, outputs=outputs, banned=banned)
    expected = torch.stack([ref_process_row(logits[i].cpu(), *row)
                            for i, row in enumerate(zip(params, prompts, outputs, banned))])
    torch.testing.assert_close(process_logits(logits, batch).cpu(), expected)
    assert torch.equal(Sampler()(logits, batch).token_ids[1].cpu(), expected[1].argmax())


def ref_kept_tokens(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The tokens min_p, top_k and top_p keep, in float64, by their definitions (as vLLM)."""
    x = logits.double() / params.temperature
    probs = x.softmax(dim=-1)
    kept = probs >= params.min_p * probs.max()
    if params.top_k > 0:
        kept &= x >= x[kept].topk(min(params.top_k, int(kept.sum()))).values[-1]
    renormalized = torch.where(kept, probs, 0) / probs[kept].sum()
    order = renormalized.argsort(descending=True)
    mass_before = renormalized[order].cumsum(dim=0) - renormalized[order]
    kept[order[mass_before >= params.top_p]] = False
    return kept


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.7, min_p=0.05),
], ids=["top_k", "top_p", "min_p", "all"])
def test_filters_never_let_a_filtered_token_through(device, params):
    vocab, draws = 40, 4000
    logits = torch.randn(vocab) * 2
    kept = ref_kept_tokens(logits, params)
    batch = make_batch([params] * draws, vocab, device, seeds=[99] * draws, offsets=list(range(draws)))
    counts = torch.bincount(Sampler()(logits.expand(draws, vocab).to(device), batch).token_ids.cpu(),
                            minlength=vocab)
    assert counts[~kept].sum() == 0
    # And the filters drop nothing they should keep: every kept token likely enough shows up.
    probs = torch.where(kept, (logits.double() / params.temperature).softmax(dim=-1), 0)
    assert (counts[probs / probs.sum() > 0.01] > 0).all()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("vary", ["offset", "seed"])
def test_draws_follow_softmax_of_logits_over_temperature(device, vary):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws, params = 30000, SamplingParams(temperature=0.8)
    varying, fixed = list(range(draws)), [5] * draws
    batch = make_batch([params] * draws, 6, device, seeds=varying if vary == "seed" else fixed,
                       offsets=varying if vary == "offset" else fixed)
    tokens = Sampler()(logits.expand(draws, 6).to(device), batch).token_ids.cpu()
    counts = torch.bincount(tokens, minlength=6).double()
    # 5 degrees of freedom: P(chi2 > 30) = 1.5e-5. Temperature 1 instead of 0.8 would give thousands.
    assert chi_square(counts, (logits.double() / 0.8).softmax(dim=0)) < 30


def test_the_same_seed_and_offset_give_the_same_token_in_any_batch(device):
    vocab, n = 1000, 12
    params = [SamplingParams(temperature=0.5 + i / 6, top_k=200 if i % 3 == 0 else -1,
                             top_p=0.9 if i % 4 == 1 else 1.0, seed=i) for i in range(n)]
    seeds, offsets = list(range(100, 100 + n)), [(i % 2 << 32) | 17 * i for i in range(n)]
    logits = torch.randn(n, vocab, device=device)
    tokens = Sampler()(logits, make_batch(params, vocab, device, seeds=seeds, offsets=offsets)).token_ids

    # A reordered subset among rows of other requests.
    order = [9, 4, 0, 11, 6]
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3)]
    batch = make_batch([params[i] for i in order] + others, vocab, device,
                       seeds=[seeds[i] for i in order] + [1, 2], offsets=[offsets[i] for i in order] + [3, 4])
    mixed_logits = torch.cat([logits[order], torch.randn(2, vocab, device=device)])
    assert torch.equal(Sampler()(mixed_logits, batch).token_ids[:len(order)], tokens[order])

    # The noise matters: other offsets give other tokens.
    moved = make_batch(params, vocab, device, seeds=seeds, offsets=[o + 1 for o in offsets])
    assert not torch.equal(Sampler()(logits, moved).token_ids, tokens)


def assert_raw_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor,
                        ranks: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor, k: int) -> None:
    expected = logits.double().log_softmax(dim=-1).cpu()
    token_ids, top_ids = token_ids.cpu(), top_ids.cpu()
    rows = torch.arange(len(token_ids))
    torch.testing.assert_close(logprobs.cpu().double(), expected[rows, token_ids], rtol=0, atol=1e-5)
    assert torch.equal(ranks.cpu(), (expected > expected[rows, token_ids][:, None]).sum(dim=-1) + 1)
    torch.testing.assert_close(top_logprobs.cpu().double(), expected.topk(k).values, rtol=0, atol=1e-5)
    assert torch.equal(torch.gather(expected, 1, top_ids), expected.topk(k).values)


def test_logprobs_come_from_the_raw_logits(device):
    vocab = 64
    logits = torch.randn(4, vocab, device=device) * 2
    # Bias, penalties and temperature steer the choice to low-ranked tokens; logprobs ignore them.
    params = [SamplingParams(temperature=0.0, logit_bias={int(logits[0].argmin()): 100.0}, logprobs=3),
              SamplingParams(temperature=2.0, repetition_penalty=2.0, logprobs=1),
              SamplingParams(logprobs=0, allowed_token_ids=[int(logits[2].argmin())]),
              SamplingParams(temperature=0.3, top_k=2)]
    batch = make_batch(params, vocab, device, outputs=[[1], [2, 3], [], [5]])
    out = Sampler()(logits, batch)
    assert out.top_logprobs.shape == out.top_token_ids.shape == (4, 3)
    assert out.ranks[0] == vocab and out.ranks[2] == vocab
    assert_raw_logprobs(logits, out.token_ids, out.logprobs, out.ranks, out.top_logprobs, out.top_token_ids, 3)


def test_no_top_logprobs_unless_asked(device):
    out = Sampler()(torch.randn(2, 10, device=device), make_batch([SamplingParams()] * 2, 10, device))
    assert out.top_logprobs is None and out.top_token_ids is None


def test_compute_prompt_logprobs(device):
    logits = torch.randn(13, 100, device=device) * 3
    next_ids = torch.randint(0, 100, (13,), device=device)
    assert_raw_logprobs(logits, next_ids, *compute_prompt_logprobs(logits, next_ids, 5), k=5)
    logprobs, ranks, top_logprobs, top_ids = compute_prompt_logprobs(logits, next_ids, 0)
    assert logprobs.shape == ranks.shape == (13,) and top_logprobs is None and top_ids is None


def test_an_empty_batch_samples_nothing(device):
    out = Sampler()(torch.empty(0, 10, device=device), make_batch([], 10, device))
    assert out.token_ids.shape == (0,) and out.logprobs.shape == (0,)
