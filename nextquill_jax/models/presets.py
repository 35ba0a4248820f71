"""Architectures of published checkpoints, copied from their Hugging Face `config.json` files.

Use through `model_preset(name)`. Token ids are those of the base checkpoints for Qwen2.5 and Llama 3.2,
of the released (instruct-capable) checkpoints for Qwen3, and of SmolLM2-135M-Instruct (the packaged GGUF).
"""

from __future__ import annotations

from typing import Any

from nextquill_jax.models.config import ModelConfig, RopeScaling

_QWEN_VOCAB = 151936
_QWEN_ENDOFTEXT = 151643
_QWEN_IM_END = 151645

_LLAMA32_ROPE = RopeScaling(
    type="llama3",
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def _qwen25(
    hidden: int,
    mlp: int,
    layers: int,
    heads: int,
    kv: int,
    *,
    tied: bool,
    vocab: int = _QWEN_VOCAB,
    max_pos: int = 32768,
) -> ModelConfig:
    return ModelConfig(
        family="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tied,
        qkv_bias=True,
        bos_token_id=_QWEN_ENDOFTEXT,
        eos_token_ids=(_QWEN_ENDOFTEXT,),
    )


def _qwen3(hidden: int, mlp: int, layers: int, heads: int, kv: int) -> ModelConfig:
    return ModelConfig(
        family="qwen3",
        vocab_size=_QWEN_VOCAB,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        bos_token_id=_QWEN_ENDOFTEXT,
        eos_token_ids=(_QWEN_IM_END,),
    )


def _llama32(hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=8192,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=hidden // heads,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        rope_scaling=_LLAMA32_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001,),
    )


PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, tied=True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, tied=True, max_pos=131072),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, tied=True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, tied=False, vocab=152064, max_pos=131072),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8),
    "llama3.2-1b": _llama32(2048, 16, 32),
    "llama3.2-3b": _llama32(3072, 28, 24),
    "smollm2-135m": ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=2,
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The architecture of a published model ("qwen2.5-0.5b", "qwen3-1.7b", "llama3.2-1b", ...) with
    `overrides` applied to any field.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        ValueError: an override with an invalid value.
    """
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides)
