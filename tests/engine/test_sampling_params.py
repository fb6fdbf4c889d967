"""SamplingParams: vLLM's defaults, validation that names the field, and the model's generation defaults."""

import copy
import pickle

import pytest

from pagedinfer.sampling_params import GenerationDefaults, SamplingParams


def test_defaults_are_vllms():
    params = SamplingParams()
    assert (params.n, params.best_of, params.presence_penalty, params.frequency_penalty) == (1, None, 0, 0)
    assert (params.repetition_penalty, params.temperature, params.top_p, params.top_k) == (1, 1.0, 1.0, -1)
    assert (params.min_p, params.seed, params.stop, params.stop_token_ids) == (0, None, [], [])
    assert (params.max_tokens, params.min_tokens) == (16, 0)
    assert params.logprobs is None and params.prompt_logprobs is None
    assert not params.include_stop_str_in_output and not params.ignore_eos
    assert params.skip_special_tokens and params.spaces_between_special_tokens
    assert params.logit_bias is None and params.allowed_token_ids is None
    assert not params.is_greedy


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(7,)).stop_token_ids == [7]


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 0}, "best_of"),
    ({"best_of": 2, "temperature": 0.0}, "best_of"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"seed": 1.5}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"logit_bias": {"12": 1.0}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [3, -1]}, "allowed_token_ids"),
])
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


def test_error_message_shows_the_value():
    with pytest.raises(ValueError, match=r"^temperature must be non-negative, got -1$"):
        SamplingParams(temperature=-1)


def test_accepted_edge_values():
    SamplingParams(top_k=0)
    SamplingParams(top_k=1, top_p=1e-3, min_p=1.0, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(max_tokens=None, min_tokens=100)
    SamplingParams(n=2, best_of=4, seed=-3, logprobs=0, prompt_logprobs=5)
    SamplingParams(min_tokens=16, max_tokens=16, logit_bias={5: -100.0, 6: 3}, allowed_token_ids=[0, 9])


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_greedy_turns_truncation_off(temperature):
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=5, min_p=0.2, n=3)
    assert params.is_greedy
    assert (params.top_p, params.top_k, params.min_p) == (1.0, -1, 0.0)


def test_fields_set_tracks_what_the_caller_passed():
    assert SamplingParams().fields_set == frozenset()
    assert SamplingParams(2, temperature=1.0).fields_set == {"n", "temperature"}
    params = SamplingParams(top_p=0.9)
    assert copy.deepcopy(params).fields_set == {"top_p"}
    assert pickle.loads(pickle.dumps(params)).fields_set == {"top_p"}


def test_generation_defaults_fill_only_unset_fields():
    defaults = GenerationDefaults.from_generation_config(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64, "do_sample": True,
         "bos_token_id": 1})
    assert defaults == GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20, max_tokens=64)

    params = SamplingParams(temperature=1.0, max_tokens=8).with_defaults(defaults)
    # Explicitly passed values win even when they equal vLLM's defaults.
    assert (params.temperature, params.max_tokens) == (1.0, 8)
    assert (params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (0.9, 20, 0.0, 1.0)

    unchanged = SamplingParams(max_tokens=8)
    assert unchanged.with_defaults(GenerationDefaults()) is unchanged


def test_generation_defaults_are_validated_and_respect_greedy():
    params = SamplingParams(temperature=0.0).with_defaults(GenerationDefaults(top_p=0.8, top_k=40))
    assert params.is_greedy and (params.top_p, params.top_k) == (1.0, -1)
    with pytest.raises(ValueError, match="^top_p "):
        SamplingParams().with_defaults(GenerationDefaults(top_p=0.0))
