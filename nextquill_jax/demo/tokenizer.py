"""A small byte-level BPE tokenizer trained in-process on a corpus of records, for tiny demo models.

Qwen's 151,936-token vocabulary would make the LM head the bulk of a tiny model's compute; the synthetic
benchmark has a few hundred distinct words, so a ~1,000-token BPE trained on its training split encodes
nearly every word as one token and keeps the model small and fast. Byte-level pre-tokenisation (Qwen's split
regex) means any text still encodes, word pieces falling back to bytes. The ChatML markers of the prompt
templates are added as special tokens so each is one token; `<|endoftext|>` is the EOS and padding token, as
in Qwen's base models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE on `texts`, save it to `out_dir` as a Hugging Face tokenizer directory
    (`tokenizer.json`, `tokenizer_config.json`; loadable by `models.load_tokenizer(out_dir)`) and return it as
    a `PreTrainedTokenizerFast` with EOS = pad = `<|endoftext|>` (id 0).

    `vocab_size` counts the 256 byte tokens and the special tokens; training stops earlier when no pair of
    tokens occurs twice.

    Raises:
        ValueError: `vocab_size` too small to hold the bytes and the special tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nextquill_jax.models.tokenizers import QWEN_SPLIT_REGEX

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (256 bytes + special tokens), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def record_texts(
    records_path: str | Path, template_name: str, *, max_history: int, split: str = "train"
) -> Iterator[str]:
    """The texts a model sees for the `split` records of a generic JSONL file: each record's prompt with its
    `max_history` most recent history entries, its prompt without history, and its target (rendered with the
    data pipeline's own template code, so the tokenizer is trained on exactly the prompt strings)."""
    from nextquill_jax.data.templates import load_template, render_prompt

    template = load_template(template_name)
    with open(records_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("split", "train") != split:
                continue
            entries = list(reversed(record["history"][-max_history:])) if max_history else []
            yield render_prompt(template, record["context"], entries or None)
            yield render_prompt(template, record["context"], None)
            yield record["target"]
