"""Shared by the data tests: the fixture directory and a tiny fast tokenizer trained on the fixture text.

The tokenizer is byte-level BPE (any text round-trips) with the ChatML special tokens, `<|endoftext|>` as EOS
and a ChatML chat template, so the data code runs exactly as with Qwen's tokenizer but in milliseconds.
"""

from __future__ import annotations

import functools
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
# DPL thresholds small enough for the tiny Amazon fixtures; text and description lengths stay public.
SMALL = dict(
    dpl_min_item_users=2,
    dpl_min_user_reviews=5,
    dpl_num_targets=3,
    dpl_min_profile_item_users=2,
    dpl_min_profile_reviews=2,
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def tiny_tokenizer(vocab_size: int = 700):
    """A PreTrainedTokenizerFast trained on every text file under tests/fixtures (cached per vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(FIXTURES.rglob("*.json*"))]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def save_tiny_tokenizer(out_dir: Path, vocab_size: int = 700) -> Path:
    """Save `tiny_tokenizer(vocab_size)` as a Hugging Face directory and return it."""
    tiny_tokenizer(vocab_size).save_pretrained(out_dir)
    return out_dir
