"""Values that test modules need while they are imported, where a fixture cannot serve: tables that
`@pytest.mark.parametrize` expands, paths that module-level tables are built from, and settings the subprocess
programs (tests/programs) share with the fixtures. Everything else the folders share is a fixture in
tests/conftest.py."""

from pathlib import Path

# The data files the data tests read, and the tiny tokenizer is trained on (tests/fixtures).
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The tiny tokenizer's `<|endoftext|>` (its first special token, id 0): the BOS and EOS of every tiny model
# made from a preset, whose own ids (Qwen's 151643) lie beyond a tiny vocabulary.
TINY_EOS_ID = 0

# The tiny qwen2-family model of the training tests, as keyword overrides of the qwen2.5-0.5b preset (hidden
# 32, 2 layers, 4 query heads and 2 kv heads of 8, 128 ids): `tiny_config` in tests/conftest.py writes them
# into a config's `model.overrides` with `eos_token_ids: [TINY_EOS_ID]`; tests that build the ModelConfig
# directly add `eos_token_ids=(TINY_EOS_ID,)` (a tuple: the config is hashed).
TINY_QWEN = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    bos_token_id=TINY_EOS_ID,
)

# A target id no target of `write_random_data`'s examples has (they use 1..15): its `marked=i` gives
# training example i only this target, so a test can tell the batches that hold that example.
MARKED_TARGET = 16

# The label value the losses ignore (the public code's -100).
IGNORE = -100

# The loss configurations every loss test covers: each variant, with and without weight_alignment where it
# applies, and js with gradient through its weights (the public code's behaviour).
# (variant, weight_alignment, js_detach)
LOSS_CONFIGS = [
    ("sft", False, True),
    ("context_sft", False, True),
    ("mce", False, True),
    ("mce", True, True),
    ("dce", False, True),
    ("js", False, True),
    ("js", False, False),
    ("nextquill", False, True),
    ("nextquill", True, True),
]
LOSS_CONFIG_IDS = [f"{v}{'-wa' if wa else ''}{'' if det else '-jsgrad'}" for v, wa, det in LOSS_CONFIGS]

# The tiny transformers model's fields (two layers, 4 query heads and 2 kv heads of 16): `tiny_hf_config` in
# tests/conftest.py, and the subprocess programs that cannot take that fixture, build from it.
TINY_HF = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
