"""Incremental detokenization: the text each step adds to a sequence, and its stop strings.

Decoding the whole output every step would cost O(length) per token. Instead a short window of recent
tokens is decoded (vLLM's prefix/read offsets): tokens [prefix_offset, read_offset) are already text and
only give the new ones their context (a SentencePiece tokenizer drops a text's leading space; a byte-level
BPE token may hold half a character), and the new text is the window's decode minus its context's.

What is streamed is final: text is released only once its characters are complete (no U+FFFD from a
split UTF-8 character), and an end that may be the start of a stop string is held back until the next
tokens tell.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pagedinfer.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, for its context (vLLM's choice of 5).
_PROMPT_CONTEXT = 5


@dataclass(frozen=True)
class DetokenizedStep:
    delta: str               # text released this step
    stop_string: str | None  # the stop string found this step: the sequence ends


class IncrementalDetokenizer:
    """The output text of one sequence, fed its tokens step by step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stop: list[str] = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._window = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._window)
        self._text = ""        # the complete output text so far, cut at a stop string
        self._num_released = 0  # characters of _text released
        self._num_output_tokens = 0

    @property
    def text(self) -> str:
        """The text released so far: what a stream has shown."""
        return self._text[:self._num_released]

    def update(self, new_token_ids: list[int], stop_terminated: bool, finished: bool) -> DetokenizedStep:
        """Add a step's tokens. stop_terminated: the last one is the EOS or stop token that ended the
        sequence, left out of the text unless include_stop_str_in_output. finished: the sequence has
        ended, so everything held back is released."""
        self._num_output_tokens += len(new_token_ids)
        if stop_terminated and not self._include_stop:
            new_token_ids = new_token_ids[:-1]
        num_checked = len(self._text)
        for token_id in new_token_ids:
            self._window.append(token_id)
            self._text += self._read_window(flush=False)
        if finished:  # an incomplete character at the very end is all the text there will be
            self._text += self._read_window(flush=True)
        stop_string = None
        if self._stop and self._num_output_tokens > self._min_tokens:  # vLLM's min_tokens rule
            stop_string = self._cut_at_stop_string(num_checked)
        released = len(self._text)
        if not (finished or stop_string):
            released -= self._stop_string_start_length()
        delta = self._text[self._num_released:released]
        self._num_released = released
        return DetokenizedStep(delta, stop_string)

    def _read_window(self, flush: bool) -> str:
        """The text of the tokens after read_offset, if it is complete (or flush), moving both offsets
        past them; else "" and the tokens wait for the rest of their character."""
        context = self._decode(self._window[self._prefix_offset:self._read_offset])
        text = self._decode(self._window[self._prefix_offset:])
        if len(text) <= len(context) or (text.endswith("\ufffd") and not flush):
            return ""
        # Only the last read tokens stay as context: the window stays a few tokens long.
        del self._window[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._window)
        return text[len(context):]

    def _decode(self, token_ids: list[int]) -> str:
        # No clean-up of spaces: it would make the text of a window differ from that of the whole.
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def _cut_at_stop_string(self, num_checked: int) -> str | None:
        """The first stop string that ends after the first num_checked characters (those were checked
        before); cuts the text before it, or after it with include_stop_str_in_output."""
        start = max(0, num_checked - max(map(len, self._stop)) + 1)
        found = [(index, stop) for stop in self._stop if (index := self._text.find(stop, start)) >= 0]
        if not found:
            return None
        index, stop = min(found, key=lambda match: match[0])
        self._text = self._text[:index + len(stop) if self._include_stop else index]
        return stop

    def _stop_string_start_length(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        return max((n for stop in self._stop for n in range(1, len(stop))
                    if self._text.endswith(stop[:n])), default=0)
