"""Our Llama-family models (Llama, Mistral, Qwen2) against HF transformers on the same tiny
checkpoints, float32: whole-prompt prefill, chunked prefill and decoding over a paged cache, and greedy
generation."""

from __future__ import annotations

import pytest
import torch

from pagedinfer.config import ModelConfig
from pagedinfer.models.loader import load_model
from tests.models.utils import VARIANTS, PagedDriver, assert_logits_close, load_hf

BLOCK_SIZE = 4  # small, so that short prompts span several blocks and end in partial ones


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def load_both(folder, device: str):
    config = ModelConfig.from_pretrained(folder, dtype="float32", device=device)
    return config, load_model(config, device), load_hf(folder, device)


def random_prompts(lengths: list[int], vocab_size: int) -> list[list[int]]:
    return [torch.randint(vocab_size, (n,)).tolist() for n in lengths]


@torch.inference_mode()
def hf_logits(hf, tokens: list[int], device: str) -> torch.Tensor:
    return hf(torch.tensor([tokens], device=device)).logits[0].float()


def test_prefill_matches_hf(checkpoint, variant: str, device: str) -> None:
    config, model, hf = load_both(checkpoint(variant), device)
    prompts = random_prompts([13, 1, 6], config.vocab_size)
    driver = PagedDriver(model, config, prompts, BLOCK_SIZE, device)
    # All three prompts whole, in one step.
    for prompt, logits in zip(prompts, driver.step([len(p) for p in prompts])):
        assert_logits_close(logits, hf_logits(hf, prompt, device))


def test_paged_chunks_and_decode_match_hf(checkpoint, variant: str, device: str) -> None:
    """Sequences advance by prompt chunks and single tokens over their cached context, in mixed
    batches, and every position's logits equal HF's over the whole sequence."""
    config, model, hf = load_both(checkpoint(variant), device)
    sequences = random_prompts([21, 11, 9], config.vocab_size)
    driver = PagedDriver(model, config, sequences, BLOCK_SIZE, device)
    schedule = [
        [5, 3, 0],  # prefill starts (the third sequence waits)
        [7, 1, 9],  # a chunk, a single token, a whole prompt
        [1, 4, 0],
        [1, 1, 0],  # every sequence fed a single token: the decode path
        [6, 2, 0],
        [1, 0, 0],
    ]
    assert [sum(col) for col in zip(*schedule)] == [len(s) for s in sequences]
    ours: list[list[torch.Tensor]] = [[] for _ in sequences]
    for num_new in schedule:
        fed = [i for i, n in enumerate(num_new) if n > 0]
        for i, logits in zip(fed, driver.step(num_new)):
            ours[i].append(logits)
    for tokens, chunks in zip(sequences, ours):
        assert_logits_close(torch.cat(chunks), hf_logits(hf, tokens, device))


def test_greedy_generation_matches_hf(checkpoint, variant: str, device: str) -> None:
    config, model, hf = load_both(checkpoint(variant), device)
    prompts = random_prompts([7, 12], config.vocab_size)
    num_new_tokens = 20
    driver = PagedDriver(model, config, prompts, BLOCK_SIZE, device, room_to_generate=num_new_tokens)
    generated: list[list[int]] = [[] for _ in prompts]
    num_new = [len(p) for p in prompts]
    for _ in range(num_new_tokens):
        for i, logits in enumerate(driver.step(num_new)):
            token = int(logits[-1].argmax())
            generated[i].append(token)
            driver.append(i, token)
        num_new = [1] * len(prompts)
    for prompt, tokens in zip(prompts, generated):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            # The explicit mask: without one, HF takes prompt tokens equal to pad_token_id for padding.
            # No eos: all num_new_tokens are generated, as in our loop.
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=num_new_tokens, eos_token_id=None, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_model_as_close_to_float32_as_hf(checkpoint, device: str, dtype: torch.dtype) -> None:
    """In the dtypes models are served in, our logits are about as far from HF's float32 ones as HF's
    own in that dtype are (a bug would be far beyond 16-bit rounding)."""
    folder = checkpoint("gqa2")
    config = ModelConfig.from_pretrained(folder, dtype=dtype, device=device)
    model, hf = load_model(config, device), load_hf(folder, device)
    hf_16bit = load_hf(folder, device).to(dtype)
    sequences = random_prompts([19, 6], config.vocab_size)
    driver = PagedDriver(model, config, sequences, BLOCK_SIZE, device)
    ours: list[list[torch.Tensor]] = [[] for _ in sequences]
    for num_new in ([12, 6], [6, 0], [1, 0]):
        fed = [i for i, n in enumerate(num_new) if n > 0]
        for i, logits in zip(fed, driver.step(num_new)):
            ours[i].append(logits)
    for tokens, chunks in zip(sequences, ours):
        exact = hf_logits(hf, tokens, device)
        hf_error = (hf_logits(hf_16bit, tokens, device) - exact).abs().max().item()
        our_error = (torch.cat(chunks) - exact).abs().max().item()
        assert our_error <= 2 * hf_error + 1e-3, (our_error, hf_error)
