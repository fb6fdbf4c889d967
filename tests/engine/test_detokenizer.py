"""IncrementalDetokenizer with a byte-level BPE tokenizer whose tokens split UTF-8 characters: streamed
text equals the final text, never shows half a character, and stop strings are found across token
boundaries and inside multi-byte text."""

from __future__ import annotations

import pytest

from pagedinfer.detokenizer import IncrementalDetokenizer
from pagedinfer.sampling_params import SamplingParams
from tests.engine.utils import EOS

PROMPT = "Once upon a time"


def stream(tokenizer, token_ids: list[int], finish_at_end: bool = True, stop_terminated: bool = False,
           **params) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feed token_ids one by one, the sequence finishing with the last unless a stop string ends it
    first. Returns (the deltas, the stop string, the detokenizer)."""
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), SamplingParams(**params))
    deltas = []
    for i, token_id in enumerate(token_ids):
        last = i == len(token_ids) - 1
        step = detokenizer.update([token_id], stop_terminated and last, finish_at_end and last)
        deltas.append(step.delta)
        if step.stop_string is not None:
            return deltas, step.stop_string, detokenizer
    return deltas, None, detokenizer


@pytest.mark.parametrize("text", ["héllo 🙂 日本語 wörld", " plain ascii, with spaces ", "🙂🙂"])
def test_stream_is_the_decoded_text_in_whole_characters(tiny_tokenizer, text: str) -> None:
    token_ids = tiny_tokenizer.encode(text)
    deltas, stop, detokenizer = stream(tiny_tokenizer, token_ids)
    assert stop is None
    assert "".join(deltas) == detokenizer.text == text
    assert not any("\ufffd" in delta for delta in deltas)
    if "🙂" in text:  # four byte tokens: nothing shows until the fourth
        assert "" in deltas


def test_an_incomplete_character_at_the_end_is_flushed_when_finished(tiny_tokenizer) -> None:
    token_ids = tiny_tokenizer.encode("ok 🙂")[:-1]  # the emoji's last byte never comes
    deltas, _, detokenizer = stream(tiny_tokenizer, token_ids)
    assert detokenizer.text == "".join(deltas) == tiny_tokenizer.decode(token_ids)
    assert detokenizer.text.startswith("ok ") and detokenizer.text.endswith("\ufffd")


@pytest.mark.parametrize("text, stop, expected, expected_with_stop", [
    ("hello world, again", ["lo wo"], "hel", "hello wo"),            # across token boundaries
    ("Zürich 日本語です", ["本語"], "Zürich 日", "Zürich 日本語"),    # inside multi-byte text
    ("abc abc abd", ["abd", "c a"], "ab", "abc a"),                   # the earliest of several
])
def test_stop_strings(tiny_tokenizer, text: str, stop: list[str], expected: str,
                      expected_with_stop: str) -> None:
    token_ids = tiny_tokenizer.encode(text)
    for include, want in ((False, expected), (True, expected_with_stop)):
        deltas, found, detokenizer = stream(tiny_tokenizer, token_ids, finish_at_end=False, stop=stop,
                                            include_stop_str_in_output=include)
        assert found in stop and text.find(found) == min(text.find(s) for s in stop)
        assert "".join(deltas) == detokenizer.text == want
        # It stopped at the token that completed the stop string.
        assert found in tiny_tokenizer.decode(token_ids[:len(deltas)])
        assert found not in tiny_tokenizer.decode(token_ids[:len(deltas) - 1])


def test_a_possible_stop_string_start_is_held_back(tiny_tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], SamplingParams(stop=["world!"]))
    released = ""
    for token_id in tiny_tokenizer.encode("hello wor"):
        released += detokenizer.update([token_id], False, False).delta
    assert released == "hello "  # "wor" may begin "world!"
    step = detokenizer.update(tiny_tokenizer.encode("k"), False, False)
    assert (step.delta, detokenizer.text) == ("work", "hello work")
    # Released when the sequence finishes for another reason.
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], SamplingParams(stop=["world!"]))
    deltas = [detokenizer.update([t], False, False).delta for t in tiny_tokenizer.encode("a wor")]
    assert "".join(deltas) == "a "
    assert detokenizer.update(tiny_tokenizer.encode("l"), False, True).delta == "worl"


def test_stop_token_text_is_left_out_unless_asked(tiny_tokenizer) -> None:
    token_ids = tiny_tokenizer.encode("stop here.")
    for include in (False, True):
        _, _, detokenizer = stream(tiny_tokenizer, token_ids, stop_terminated=True,
                                   include_stop_str_in_output=include)
        kept = token_ids if include else token_ids[:-1]
        assert detokenizer.text == tiny_tokenizer.decode(kept)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tiny_tokenizer, skip: bool) -> None:
    token_ids = tiny_tokenizer.encode("one") + [EOS] + tiny_tokenizer.encode(" two")
    deltas, _, detokenizer = stream(tiny_tokenizer, token_ids, skip_special_tokens=skip)
    assert "".join(deltas) == detokenizer.text == ("one two" if skip else "one</s> two")


def test_stop_strings_wait_for_min_tokens(tiny_tokenizer) -> None:
    token_ids = tiny_tokenizer.encode("a;b;c")
    assert len(token_ids) == 5
    _, found, detokenizer = stream(tiny_tokenizer, token_ids, finish_at_end=False, stop=[";"], min_tokens=2)
    # The first ";" is the 2nd token: not more than min_tokens yet (vLLM's rule). The second counts.
    assert (found, detokenizer.text) == (";", "a;b")


def test_decodes_a_bounded_window(tiny_tokenizer) -> None:
    """Each step decodes a few recent tokens, not the whole output."""
    decoded_lengths = []

    class Spy:
        encode = staticmethod(tiny_tokenizer.encode)

        def decode(self, token_ids, **kwargs):
            decoded_lengths.append(len(token_ids))
            return tiny_tokenizer.decode(token_ids, **kwargs)

    token_ids = tiny_tokenizer.encode("日本語のテキスト 🙂 " * 30)
    deltas, _, detokenizer = stream(Spy(), token_ids)
    assert "".join(deltas) == tiny_tokenizer.decode(token_ids)
    assert len(token_ids) > 200 and max(decoded_lengths) <= 10
