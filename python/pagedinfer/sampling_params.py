"""How to sample one request: vLLM's `SamplingParams` (same names, defaults and checks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Below this temperature sampling is greedy (vLLM's threshold): dividing logits by it would overflow.
_GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's own sampling defaults (its generation_config); None where the model sets none."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any]) -> GenerationDefaults:
        """From the contents of generation_config.json (or `GenerationConfig.to_diff_dict()`).
        Not from a `GenerationConfig`'s attributes: those carry transformers' defaults (top_k=50)."""
        return cls(temperature=config.get("temperature"), top_p=config.get("top_p"),
                   top_k=config.get("top_k"), min_p=config.get("min_p"),
                   repetition_penalty=config.get("repetition_penalty"),
                   max_tokens=config.get("max_new_tokens"))


@dataclass
class SamplingParams:
    """Sampling parameters of one request, validated on construction (`ValueError` naming the field).

    `stop` and `stop_token_ids` are normalized to lists. A temperature below 1e-5 means greedy; greedy
    resets top_p, top_k and min_p to "off". top_k of -1 or 0 is off. max_tokens=None generates until
    max_model_len. `allowed_token_ids` restricts sampling to those tokens.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> SamplingParams:
        # Remember which fields the caller gave: the model's generation_config fills only the others.
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        self._fields_set = frozenset(names[:len(args)]) | frozenset(kwargs)
        return self

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        if self.is_greedy:
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0

    @property
    def fields_set(self) -> frozenset[str]:
        """The fields the caller passed explicitly."""
        return self._fields_set

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    def with_defaults(self, defaults: GenerationDefaults) -> SamplingParams:
        """A copy where the fields the caller did not set take the model's defaults."""
        updates = {name: value for name, value in dataclasses.asdict(defaults).items()
                   if value is not None and name not in self._fields_set}
        return dataclasses.replace(self, **updates) if updates else self

    def _validate(self) -> None:
        _check_int("n", self.n, minimum=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, minimum=1)
            _require(self.best_of >= self.n,
                     f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}")
            _require(not (self.is_greedy and self.best_of > 1),
                     f"best_of must be 1 when using greedy sampling, got {self.best_of}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        _require(self.repetition_penalty > 0.0,
                 f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")
        _require(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _require(isinstance(self.top_k, int) and (self.top_k in (-1, 0) or self.top_k >= 1),
                 f"top_k must be -1 or 0 (disabled), or at least 1, got {self.top_k!r}")
        _require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        _require(all(isinstance(s, str) and s for s in self.stop),
                 f"stop must contain only non-empty strings, got {self.stop!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens,
                 f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                 f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        if self.logit_bias is not None:
            _require(all(isinstance(t, int) and isinstance(b, (int, float))
                         for t, b in self.logit_bias.items()),
                     f"logit_bias must map token ids (int) to biases (float), got {self.logit_bias!r}")
        if self.allowed_token_ids is not None:
            _require(len(self.allowed_token_ids) > 0, "allowed_token_ids must not be empty when given")
            for token_id in self.allowed_token_ids:
                _check_int("allowed_token_ids", token_id, minimum=0)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    # bool is an int to Python, never to a caller who wrote n=True.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if minimum is None:
        _require(is_int, f"{name} must be an integer, got {value!r}")
    else:
        _require(is_int and value >= minimum, f"{name} must be an integer >= {minimum}, got {value!r}")
