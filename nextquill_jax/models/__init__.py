"""Causal LMs (Llama, Qwen2/2.5, Qwen3) in Flax NNX, with Hugging Face / GGUF import and export."""

from typing import Any

from .causal_lm import CausalLM
from .config import ModelConfig, RopeScaling
from .hf import load_pretrained, model_from_hf, save_pretrained
from .kv_cache import KVCache
from .presets import model_preset

__all__ = [
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "load_pretrained",
    "load_tokenizer",
    "model_from_hf",
    "model_preset",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: tokenizers pull in transformers' tokenizer stack, which model code never needs.
    if name == "load_tokenizer":
        from .tokenizers import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
