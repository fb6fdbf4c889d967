"""Engine configuration: frozen dataclasses, and the one place that knows the quirks of HF configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pagedinfer.models.model_path import resolve_model_path

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a checkpoint, with every default already resolved."""

    model: str  # the local HF folder (or .gguf file) the weights come from
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[Llama3RopeScaling]
    max_position_embeddings: int
    max_model_len: int  # the longest sequence the engine serves (sizes the RoPE cache)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    # Per layer: how many of the latest keys (its own included) a query attends to; -1: all of them.
    layer_sliding_windows: tuple[int, ...]
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not 0 < self.max_model_len <= self.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} must be in "
                             f"[1, max_position_embeddings = {self.max_position_embeddings}]")
        if len(self.layer_sliding_windows) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_sliding_windows)} sliding windows for "
                             f"{self.num_hidden_layers} layers")

    @classmethod
    def from_pretrained(cls, model: str | Path, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cuda",
                        max_model_len: Optional[int] = None) -> ModelConfig:
        """Read config.json (and generation_config.json for the stop tokens) of a local HF folder, or
        the metadata of a .gguf file."""
        path = Path(model)
        if path.suffix == ".gguf":
            from pagedinfer.models.gguf_loader import hf_config_from_gguf
            hf_config, eos_token_ids = hf_config_from_gguf(path)
        else:
            hf_config = json.loads((path / "config.json").read_text())
            eos_token_ids = _eos_token_ids(path, hf_config)
        return cls.from_hf_config(hf_config, model=str(path), dtype=dtype, device=device,
                                  max_model_len=max_model_len, eos_token_ids=eos_token_ids)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], model: str = "", dtype: str | torch.dtype = "auto",
                       device: str | torch.device = "cuda", max_model_len: Optional[int] = None,
                       eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
        """Build from the dict of a config.json, written by transformers 4.x or 5.x."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ValueError(f"the config of {model or 'the model'} names no architecture")
        heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope(hf)
        max_position = hf.get("max_position_embeddings", 2048)
        attention_bias = hf.get("attention_bias", False)
        return cls(
            model=model,
            architecture=architectures[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            # Older configs omit it: multi-head attention.
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            # Some models (e.g. Mistral Nemo) decouple head_dim from hidden_size / heads.
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position,
            max_model_len=max_model_len or max_position,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=attention_bias or architectures[0] in _QKV_BIAS_ARCHITECTURES,
            o_proj_bias=attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            layer_sliding_windows=_layer_sliding_windows(hf, architectures[0]),
            # transformers 5 writes "dtype", 4.x wrote "torch_dtype".
            dtype=resolve_dtype(dtype, hf.get("dtype") or hf.get("torch_dtype"), device),
            eos_token_ids=eos_token_ids or _as_ids(hf.get("eos_token_id")),
        )


def resolve_dtype(requested: str | torch.dtype, checkpoint_dtype: Optional[str],
                  device: str | torch.device) -> torch.dtype:
    """The model's dtype. "auto" takes the checkpoint's (float32 if it names none), except float16 on
    the CPU, which becomes float32: CPU half arithmetic is slow and loses range."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"unknown dtype {requested!r}: use 'auto' or one of {sorted(_DTYPES)}")
        return _DTYPES[requested]
    dtype = _DTYPES.get(checkpoint_dtype or "float32", torch.float32)
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


# What these architectures' HF code hard-wires rather than reads from the config.
_QKV_BIAS_ARCHITECTURES = {"Qwen2ForCausalLM"}  # biased q/k/v projections, unbiased o_proj
_SLIDING_WINDOW_OFF_BY_DEFAULT = {"Qwen2ForCausalLM"}  # a missing use_sliding_window means false
_SLIDING_WINDOW_ARCHITECTURES = {"MistralForCausalLM", "Qwen2ForCausalLM"}  # HF Llama ignores the key


def _layer_sliding_windows(hf: dict[str, Any], architecture: str) -> tuple[int, ...]:
    """Each layer's window, as transformers decides it. Qwen2 configs carry a sliding_window even when
    use_sliding_window is false, and then it is off. When on, it applies to the layers layer_types calls
    "sliding_attention"; without layer_types (written by transformers 4), to the layers from
    max_window_layers on: Qwen2's rule, which covers every layer of Mistral (no max_window_layers)."""
    num_layers = hf["num_hidden_layers"]
    enabled = architecture in _SLIDING_WINDOW_ARCHITECTURES and hf.get(
        "use_sliding_window", architecture not in _SLIDING_WINDOW_OFF_BY_DEFAULT)
    window = hf.get("sliding_window") if enabled else None
    if window is None:
        return (-1,) * num_layers
    first_sliding = hf.get("max_window_layers", 0)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    return tuple(window if kind == "sliding_attention" else -1 for kind in layer_types)


def _rope(hf: dict[str, Any]) -> tuple[float, Optional[Llama3RopeScaling]]:
    """(theta, scaling). transformers 5 keeps both in "rope_parameters"; 4.x has "rope_theta" and
    "rope_scaling", whose type key was first "type", then "rope_type"."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
    return theta, Llama3RopeScaling(
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params["original_max_position_embeddings"],
    )


def read_generation_config(model: str | Path) -> dict[str, Any]:
    """The contents of a model folder's generation_config.json; empty where there is none (a .gguf)."""
    path = Path(model) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _eos_token_ids(folder: Path, hf_config: dict[str, Any]) -> tuple[int, ...]:
    """generation_config.json has the chat models' full stop list (Llama 3 has several); config.json
    often only the base model's."""
    return (_as_ids(read_generation_config(folder).get("eos_token_id"))
            or _as_ids(hf_config.get("eos_token_id")))


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: `block_size` tokens a block, `num_gpu_blocks` of them (None: the model
    runner sizes the pool, to `gpu_memory_utilization` of the card, or `cpu_kv_cache_space_gib`)."""

    block_size: int = 16
    num_gpu_blocks: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    swap_space_gib: float = 4.0
    # On the CPU the pool has a fixed size (vLLM's VLLM_CPU_KVCACHE_SPACE): there is no card to fill.
    cpu_kv_cache_space_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError(f"num_gpu_blocks must be > 0, got {self.num_gpu_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.swap_space_gib < 0:
            raise ValueError(f"swap_space_gib must be >= 0, got {self.swap_space_gib}")
        if self.cpu_kv_cache_space_gib <= 0:
            raise ValueError(f"cpu_kv_cache_space_gib must be > 0, got {self.cpu_kv_cache_space_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: at most `max_num_seqs` running sequences, and `max_num_batched_tokens`
    new tokens a step (decodes and prompt chunks alike; a longer prompt is split into chunks). When the
    KV cache is full, the newest sequence is preempted: its KV recomputed later ("recompute"), or
    moved to the CPU swap space and back ("swap")."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', "
                             f"got {self.preemption_mode!r}")


# Default token budget a step, vLLM's for offline use: big steps amortize the weight reads on a GPU;
# on the CPU compute is the limit and smaller steps keep decodes flowing between prompt chunks.
_DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 4096}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from, every "auto" and default resolved (`create`)."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    tokenizer: Optional[str]  # a local HF folder or .gguf file; None: no tokenizer (token ids in and out)
    load_format: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    enforce_eager: bool = False  # never capture CUDA graphs of decode steps

    @classmethod
    def create(cls, model: str, tokenizer: Optional[str] = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", max_model_len: Optional[int] = None,
               max_num_seqs: int = 256, max_num_batched_tokens: Optional[int] = None,
               block_size: int = 16, enable_prefix_caching: bool = True,
               num_gpu_blocks_override: Optional[int] = None, gpu_memory_utilization: float = 0.9,
               swap_space: float = 4.0, preemption_mode: str = "recompute",
               kv_cache_space: float = 4.0, load_format: str = "auto",
               seed: int = 0, trust_remote_code: bool = False,
               skip_tokenizer_init: bool = False, enforce_eager: bool = False) -> EngineConfig:
        """The one place defaults are decided: device "auto" is CUDA when available, else the CPU;
        max_num_batched_tokens defaults to 8192 on CUDA and 4096 on the CPU (at least max_num_seqs)."""
        model = resolve_model_path(model, "model")
        tokenizer = None if tokenizer is None else resolve_model_path(tokenizer, "tokenizer")
        resolved_device = resolve_device(device)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(_DEFAULT_MAX_NUM_BATCHED_TOKENS[resolved_device.type],
                                         max_num_seqs)
        return cls(
            model=ModelConfig.from_pretrained(model, dtype, resolved_device, max_model_len),
            cache=CacheConfig(block_size=block_size, num_gpu_blocks=num_gpu_blocks_override,
                              gpu_memory_utilization=gpu_memory_utilization, swap_space_gib=swap_space,
                              cpu_kv_cache_space_gib=kv_cache_space),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_prefix_caching=enable_prefix_caching,
                                      preemption_mode=preemption_mode),
            device=resolved_device,
            tokenizer=None if skip_tokenizer_init else str(tokenizer or model),
            load_format=load_format,
            seed=seed,
            trust_remote_code=trust_remote_code,
            enforce_eager=enforce_eager,
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """The engine's device: "auto" is CUDA when a device is present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested, but no CUDA device is available")
    return resolved
