"""Shared pieces of the training tests: tiny random prepared data and a tiny config (hidden 32, 2 layers,
vocab 128, rows of 64 tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from nextquill_jax.data.prepared_split import TokenizedExample, write_split

VOCAB = 128


def write_random_data(out_dir: Path, *, train: int = 48, val: int = 8, seed: int = 0) -> Path:
    """Random token examples (ids 1..VOCAB-1) whose targets repeat a per-example pattern, so loss can fall."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        if count == 0:
            continue
        examples = []
        for _ in range(count):
            target = np.tile(rng.integers(1, 16, 3), 4)[: rng.integers(6, 12)]
            examples.append(
                TokenizedExample(
                    prompt_with=rng.integers(1, VOCAB, rng.integers(8, 20)).astype(np.int32),
                    prompt_without=rng.integers(1, VOCAB, rng.integers(3, 8)).astype(np.int32),
                    target=target.astype(np.int32),
                )
            )
        write_split(out_dir, split, examples)
    return out_dir


def tiny_config(data_dir: Path, workdir: Path, **sections) -> dict:
    """A config dict for a tiny random qwen2-family model on `data_dir`; `sections` update sections."""
    cfg = {
        "model": {
            "preset": "qwen2.5-0.5b",
            "overrides": {
                "vocab_size": VOCAB,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 8,
            },
            "compute_dtype": "float32",
        },
        "data": {
            "batching": {
                "mode": "pack",
                "seq_len_with": 64,
                "seq_len_without": 32,
                "response_slots": 32,
                "length_multiple": 8,
                "rows_per_batch": 8,
                "num_epochs": 2,
                "read_threads": 0,
                "prefetch_batches": 0,
            }
        },
        "loss": {"variant": "nextquill", "token_chunk": 64, "vocab_chunk": 64},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 1},
        "train": {"workdir": str(workdir), "data_dir": str(data_dir), "seed": 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every_steps": 3, "keep": 2, "async_save": True},
        "eval": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
