"""Batched text generation with the KV cache: greedy or sampled, with transformers' logits processors.

One compiled function serves a whole generation: prefill of the (left-padded) prompts through the model's
configured attention (`CausalLM.prefill`: blockwise, cuDNN or splash never form scores over the whole cache),
then a `lax.while_loop` of one-token steps (dense attention over the cache) that stops when every row has
emitted an end-of-sequence token or `max_new_tokens` are out. Prompt lengths are rounded up to a bucket
(`prompt_bucket`) by adding left padding, and rows are padded to a fixed count, so a split of prompts of many
lengths compiles once per bucket.

The logits processors follow transformers (`generation/logits_process.py`, `_get_logits_processor`),
applied in its order to the float32 logits of the last position:
  1. `RepetitionPenaltyLogitsProcessor`: every token already in the row (its real prompt tokens, not
     padding, and the tokens generated so far) has its logit divided by the penalty if positive, multiplied
     if negative.
  2. with sampling only: `TemperatureLogitsWarper` (logits / temperature), `TopKLogitsWarper` (logits below
     the k-th largest set to -inf; ties with it kept), `TopPLogitsWarper` (ascending sort, tokens whose
     cumulative probability is <= 1 - top_p removed, the most probable always kept).
Then greedy takes the first argmax, sampling draws from softmax of the processed logits (each row with its
own key: the seed folded with its example's index, then with the step). A finished row emits
`pad_token_id` from the step after its end-of-sequence token on, as transformers does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextquill_jax.models import CausalLM, KVCache
from nextquill_jax.parallel import DEFAULT_RULES, LogicalRules, batch_shard_count, logical_to_sharding

SMALLEST_BUCKET = 16
# Prompts up to POWER_OF_TWO_UP_TO tokens round up to a power of two, longer ones to a multiple of it.
POWER_OF_TWO_UP_TO = 256


# The temperature and the repetition penalty scale float32 logits (|z| of tens): within this range neither
# overflows them, and at its ends the distribution is already the argmax's or uniform (or the penalty all
# but bans a token, or all but forces it).
FLOAT32_SAFE = (1e-6, 1e6)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Defaults: the public NextQuill code (greedy, repetition penalty 1.2; its temperature
    0.8 and top-p 0.95 are set but unused because sampling is off; top-k is transformers' default 50).

    Fields:
        `max_new_tokens`: tokens generated per row at most (the end-of-sequence token included; >= 0). 0:
            no generation: `evaluate` (and `compare`) then measure only the teacher-forced losses, with no
            predictions and no text metrics.
        `do_sample`: sample from the processed distribution instead of taking the argmax.
        `temperature`: divides the logits (sampling only); in [1e-6, 1e6].
        `top_k`: keep the k most probable tokens (sampling only); 0 turns it off.
        `top_p`: keep the smallest set of most probable tokens whose probability reaches top_p (sampling
            only); in (0, 1], 1 turns it off.
        `repetition_penalty`: in [1e-6, 1e6]; the logits of tokens already in the row (prompt included)
            are divided by it where positive and multiplied where negative (transformers'); 1 turns it off.
            Applied in greedy decoding too. The prompt's tokens count, so it also penalises copying the
            user's history (benchmarks/STUDY.md: on the synthetic users, 1.2 took the fine-tuned models'
            preference recall from 0.35-0.44 to 0.00-0.03, seeds 0-2).
        `repetition_penalty_prompt`: whether the penalty counts the prompt's tokens (true: transformers' and
            the public code's decoding); false: only the tokens generated so far, so that copying from the
            prompt (the user's history) is not penalised while repeating oneself still is (transformers'
            RepetitionPenaltyLogitsProcessor with `prompt_ignore_length` the prompt's length). In the study
            (benchmarks/STUDY.md, seeds 0-2) false brought recall and ROUGE back near no penalty's.
        `seed`: the sampling seed, in [0, 2**32); each prompt draws its noise from it and the prompt's index
            among those generated for (in `evaluate`, its index in the split), so the same seed, prompts,
            order and settings give the same samples, whatever the batch size (`generate`).

    Raises:
        ValueError: naming the field, for a value of another type or out of range.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    repetition_penalty_prompt: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**31:
            raise ValueError(
                f"GenerationConfig.max_new_tokens must be an int >= 0 (0: no generation, the losses only), "
                f"got {n!r}"
            )
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"GenerationConfig.do_sample must be true or false, got {self.do_sample!r}")
        # The range checks below compare numbers: a string or None would fail there with a TypeError.
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"GenerationConfig.{name} must be a number, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"GenerationConfig.temperature must be > 0, got {self.temperature!r}; for greedy decoding "
                "set do_sample=False"
            )
        low, high = FLOAT32_SAFE
        if not low <= self.temperature <= high:
            raise ValueError(
                f"GenerationConfig.temperature must be in [{low:g}, {high:g}], got {self.temperature!r}: the "
                f"float32 logits are divided by it, and far smaller values overflow them to inf (arbitrary "
                f"tokens are sampled; for greedy decoding set do_sample=False), far larger ones sample every "
                f"token alike"
            )
        # The decode loop holds top_k as an int32 (a vocabulary is far smaller).
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise ValueError(f"GenerationConfig.top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"GenerationConfig.repetition_penalty must be > 0 (1: off), got {self.repetition_penalty!r}"
            )
        if not low <= self.repetition_penalty <= high:
            raise ValueError(
                f"GenerationConfig.repetition_penalty must be in [{low:g}, {high:g}] (1: off), got "
                f"{self.repetition_penalty!r}: the float32 logits are divided or multiplied by it, and "
                f"values far outside overflow them to inf"
            )
        if not isinstance(self.repetition_penalty_prompt, bool):
            raise ValueError(
                "GenerationConfig.repetition_penalty_prompt must be true or false, got "
                f"{self.repetition_penalty_prompt!r}"
            )
        # JAX keeps a seed's low 32 bits (2**32 samples as 0 does, -1 as 2**32 - 1) and refuses one past
        # 2**63 only when decoding starts, after evaluate's loss pass.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"GenerationConfig.seed must be an int in [0, 2**32), got {self.seed!r}")


# ------------------------------------------------------------------------------------------------------------
# Logits processors: pure functions of logits [B, V] float32. Their settings may be traced scalars, so one
# compiled decode loop serves every temperature / top-k / top-p / penalty.


class ProcessorSettings(NamedTuple):
    """A GenerationConfig's processor settings as arrays (traced inside the decode loop: no recompilation)."""

    do_sample: jax.Array  # bool []
    temperature: jax.Array  # float32 []
    top_k: jax.Array  # int32 [], 0 = off
    top_p_cut: jax.Array  # float32 [], 1 - top_p computed in float64 as transformers does; 0 = off
    repetition_penalty: jax.Array  # float32 []
    penalise_prompt: jax.Array  # bool []: the prompt's tokens count as seen

    @classmethod
    def of(cls, cfg: GenerationConfig) -> ProcessorSettings:
        """The settings of `cfg` as arrays (traced values: one compiled decode serves every setting)."""
        return cls(
            do_sample=jnp.asarray(cfg.do_sample),
            temperature=jnp.asarray(cfg.temperature, jnp.float32),
            top_k=jnp.asarray(cfg.top_k, jnp.int32),
            top_p_cut=jnp.asarray(1.0 - cfg.top_p, jnp.float32),
            repetition_penalty=jnp.asarray(cfg.repetition_penalty, jnp.float32),
            penalise_prompt=jnp.asarray(cfg.repetition_penalty_prompt),
        )


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """logits [B, V], seen [B, V] bool (token already in the row) -> [B, V]: seen logits divided by `penalty`
    where positive, multiplied where negative (transformers' RepetitionPenaltyLogitsProcessor). A penalty of 1
    returns the logits unchanged (exactly)."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def temperature_scale(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """logits [B, V] / temperature (transformers' TemperatureLogitsWarper)."""
    return logits / temperature


def top_k_filter(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """logits [B, V] with every value below the row's k-th largest set to -inf (ties with it stay), as
    transformers' TopKLogitsWarper; k >= 1, clipped to V."""
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, logits.shape[-1])
    descending = -jnp.sort(-logits, axis=-1)  # [B, V]
    kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, (*logits.shape[:-1], 1)), axis=-1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def _remove_low_cumulative(logits: jax.Array, cut: float | jax.Array) -> jax.Array:
    """logits [B, V] with the tokens outside the nucleus set to -inf, as transformers' TopPLogitsWarper with
    p = 1 - cut: sort ascending, remove tokens whose cumulative probability is <= cut, always keep the most
    probable one."""
    order = jnp.argsort(logits, axis=-1)  # ascending, [B, V]
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= cut).at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def _warp(logits: jax.Array, settings: ProcessorSettings) -> jax.Array:
    """The sampling warpers in transformers' order: temperature, top-k, top-p (each off at its neutral
    value)."""
    logits = temperature_scale(logits, settings.temperature)
    logits = jnp.where(settings.top_k > 0, top_k_filter(logits, settings.top_k), logits)
    return jnp.where(settings.top_p_cut > 0, _remove_low_cumulative(logits, settings.top_p_cut), logits)


def process_logits(logits: jax.Array, seen: jax.Array, settings: ProcessorSettings) -> jax.Array:
    """transformers' processors in its order (module docstring): logits [B, V], seen [B, V] bool -> the
    processed logits [B, V] float32 (-inf where filtered out): the repetition penalty, then the sampling
    warpers where `settings.do_sample` (computed only then)."""
    logits = repetition_penalty(logits.astype(jnp.float32), seen, settings.repetition_penalty)
    return jax.lax.cond(settings.do_sample, lambda: _warp(logits, settings), lambda: logits)


def choose_tokens(
    logits: jax.Array, seen: jax.Array, settings: ProcessorSettings, keys: jax.Array
) -> jax.Array:
    """The next token of every row, [B] int32, from the last-position logits [B, V]: the first argmax of the
    processed (penalised) logits, or (do_sample) a draw from their softmax, row b's with `keys[b]` (keys
    [B])."""
    processed = process_logits(logits, seen, settings)
    draw = jax.vmap(jax.random.categorical)  # one key per row: a row's draw does not depend on the others
    return jax.lax.cond(
        settings.do_sample,
        lambda: draw(keys, processed).astype(jnp.int32),
        lambda: jnp.argmax(processed, axis=-1).astype(jnp.int32),
    )


# ------------------------------------------------------------------------------------------------------------
# Padding and buckets (host side).


def prompt_bucket(length: int) -> int:
    """The padded prompt length for a prompt of `length` tokens: a power of two (at least SMALLEST_BUCKET) up
    to POWER_OF_TWO_UP_TO, then a multiple of POWER_OF_TWO_UP_TO. Prefill wastes at most half its work, and a
    split with prompts up to 2048 tokens compiles at most 12 shapes."""
    if length <= POWER_OF_TWO_UP_TO:
        return max(SMALLEST_BUCKET, 1 << max(0, length - 1).bit_length())
    return -(-length // POWER_OF_TWO_UP_TO) * POWER_OF_TWO_UP_TO


def left_pad(
    prompts: Sequence[Sequence[int]], length: int, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (input_ids [B, length] int32, attention_mask [B, length] int32), padded on the left.

    Raises:
        ValueError: an empty prompt, or one longer than `length` (naming its index).
    """
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        if n == 0 or n > length:
            raise ValueError(f"prompt {i} has {n} tokens; each prompt needs 1..{length} tokens")
        ids[i, length - n :] = np.asarray(prompt, np.int32)
        mask[i, length - n :] = 1
    return ids, mask


def _integers(values: Any, name: str) -> np.ndarray:
    """`values` as a NumPy array of its own integer dtype (bool too), never cast: a float id would be
    truncated and an id past int32 would wrap to another token before `_check_token_ids` could see it.

    Raises:
        ValueError: an array of any other dtype, naming `name`.
    """
    array = np.asarray(values)
    if array.dtype.kind not in "iub" and array.size:
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _check_left_padded(attention_mask: np.ndarray) -> None:
    # The mask is also the prefill's segment ids and position steps: a value other than 0 and 1 would hide
    # the prompt from the decode steps (segment 1) or shift the positions, silently.
    odd = np.setdiff1d(attention_mask, [0, 1])
    if odd.size:
        raise ValueError(
            f"attention_mask holds {odd[:10].tolist()}; it must be 0 (padding) or 1 (a token), as "
            "transformers' tokenizers give it"
        )
    real = attention_mask != 0
    if not real.any(axis=1).all():
        raise ValueError(f"rows {np.flatnonzero(~real.any(axis=1)).tolist()} of attention_mask have no token")
    # Left padding: once a row's tokens start, no padding follows.
    bad = np.flatnonzero((np.diff(real.astype(np.int8), axis=1) < 0).any(axis=1))
    if bad.size:
        raise ValueError(
            f"attention_mask rows {bad.tolist()} are not left-padded (padding after a token); generation "
            "needs the padding on the left, as transformers' tokenizers give with padding_side='left'"
        )


def _check_token_ids(
    input_ids: np.ndarray, attention_mask: np.ndarray, eos_token_ids: Sequence[int], vocab_size: int
) -> None:
    """Refuse prompt tokens (mask != 0) and end-of-sequence ids outside [0, vocab_size): the embedding of an
    id >= V is NaN and a negative id wraps around to another token, both silently. Padding may hold any id."""
    real = attention_mask != 0
    bad = real & ((input_ids < 0) | (input_ids >= vocab_size))  # [B, P]
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"prompt token id {int(input_ids[row, col])} (row {row}, position {col}) is outside the model's "
            f"vocabulary [0, {vocab_size}); {int(bad.sum())} such tokens in all. Fix: tokenize with the "
            "model's own tokenizer, or load a model whose vocab_size covers the tokenizer's ids"
        )
    outside = [int(t) for t in eos_token_ids if not 0 <= int(t) < vocab_size]
    if outside:
        raise ValueError(
            f"eos_token_ids {outside} are outside the model's vocabulary [0, {vocab_size}): such a token "
            "can never be generated, so no row would stop. Fix: pass the tokenizer's end-of-sequence ids"
        )


def _stop_and_pad_ids(eos_token_ids: int | Sequence[int], pad_token_id: int) -> tuple[tuple[int, ...], int]:
    """`eos_token_ids` as a tuple of ints (a bare int, transformers' `eos_token_id` spelling, is one id) and
    `pad_token_id` as an int.

    Raises:
        ValueError: `eos_token_ids` empty or holding anything but ints, or `pad_token_id` not an int32 (None
            included), naming the argument and the fix.
    """
    is_id = lambda x: isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)
    ids = [eos_token_ids] if is_id(eos_token_ids) else eos_token_ids
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray) or not all(map(is_id, ids)):
        raise ValueError(
            f"eos_token_ids must be a token id (int) or a list of them, got {eos_token_ids!r}. Fix: pass the "
            "tokenizer's eos_token_id"
        )
    if len(ids) == 0:
        raise ValueError("eos_token_ids is empty: give at least one end-of-sequence token id")
    # Rows are int32: a pad id past that range would fail as an OverflowError naming nothing.
    if not is_id(pad_token_id) or not -(2**31) <= pad_token_id < 2**31:
        raise ValueError(
            f"pad_token_id must be a token id (an int32), got {pad_token_id!r}. Fix: pass the tokenizer's "
            "pad_token_id, or its eos_token_id when it has none"
        )
    return tuple(int(t) for t in ids), int(pad_token_id)


# ------------------------------------------------------------------------------------------------------------
# The compiled decode loop.


def _decode(
    state: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    key: jax.Array,
    example_ids: jax.Array,
    live: jax.Array,
    settings: ProcessorSettings,
    pad_token_id: jax.Array,
    *,
    graphdef: Any,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    cache_shardings: KVCache | None,
) -> jax.Array:
    """input_ids / attention_mask [B, P] (left-padded), example_ids [B] int32 (row b samples with
    fold_in(key, example_ids[b]) folded with the step), live [B] bool (False: a dummy row, finished from the
    start, so that the loop stops once the live rows have), pad_token_id int32 [] -> new tokens
    [B, max_new_tokens] int32 (pad_token_id throughout a dummy row)."""
    model: CausalLM = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    n = max_new_tokens

    def constrain(cache: KVCache) -> KVCache:
        if cache_shardings is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, cache_shardings)

    mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, P], 0 at each row's first token
    cache = constrain(model.init_cache(b, p + n))
    # Padding enters the model as token 0: a pad id outside the vocabulary would embed as NaN, and masked
    # attention weights of 0 times NaN values are NaN. Its value is otherwise unused (masked out).
    prefill_ids = jnp.where(mask > 0, input_ids, 0)  # [B, P]
    logits, cache = model.prefill(prefill_ids, cache, positions, mask, last_only=True)  # [B, 1, V]
    vocab = logits.shape[-1]
    rows = jnp.arange(b)
    # Padding is not penalised: its ids become `vocab`, out of bounds, and the scatter drops them (as it drops
    # prompt ids beyond the logits' vocabulary, which transformers does not penalise either).
    prompt_ids = jnp.where(mask > 0, input_ids, vocab)
    seen = jnp.zeros((b, vocab), jnp.bool_)  # [B, V]
    seen = seen.at[rows[:, None], prompt_ids].set(settings.penalise_prompt, mode="drop")
    eos = jnp.asarray(eos_token_ids, jnp.int32)
    example_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)  # [B]
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    def cond(carry):
        i, _, _, _, finished, _, _ = carry
        return (i < n) & ~jnp.all(finished)

    def body(carry):
        i, logits, cache, seen, finished, next_position, out = carry
        token = choose_tokens(logits[:, -1], seen, settings, step_keys(example_keys, i))  # [B]
        token = jnp.where(finished, pad_token_id, token)
        out = out.at[:, i].set(token)
        seen = seen.at[rows, token].set(True)
        finished = finished | jnp.isin(token, eos)
        # One step more than needed at the end (its logits are unused): simpler than a conditional model call.
        logits, cache = model.extend(token[:, None], cache, next_position[:, None], last_only=True)
        return i + 1, logits, constrain(cache), seen, finished, next_position + 1, out

    carry = (
        jnp.zeros((), jnp.int32),
        logits,
        cache,
        seen,
        ~live,
        mask.sum(axis=1),  # the next token's position: the row's real prompt length
        jnp.full((b, n), pad_token_id, jnp.int32),
    )
    return jax.lax.while_loop(cond, body, carry)[-1]


@functools.lru_cache(maxsize=8)
def decoder(mesh: Mesh | None = None) -> Any:
    """The jitted decode function for `mesh` (None: one device), shared by every call with that mesh.

    Its signature: `(state, input_ids [B, P], attention_mask [B, P], key, example_ids [B], live [B], settings,
    pad_token_id, *, graphdef, max_new_tokens, eos_token_ids, cache_shardings) -> [B, max_new_tokens] int32`
    (replicated on the mesh). It compiles once per (model graph, B, P, max_new_tokens, stop tokens): the
    processor settings, the example ids, which rows are live and the pad token are traced.
    `decoder(mesh)._cache_size()` counts the compiled versions.
    """
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    static = ("graphdef", "max_new_tokens", "eos_token_ids", "cache_shardings")
    return jax.jit(_decode, static_argnames=static, out_shardings=out)


def _cache_shardings(model: CausalLM, batch: int, max_len: int, mesh: Mesh, rules: LogicalRules) -> KVCache:
    """KV cache shardings: rows by the `batch` rule, key/value heads by the `kv_heads` rule."""
    kv = PartitionSpec("layers", "batch", None, "kv_heads", "head_dim")
    abstract = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    logical = KVCache(k=kv, v=kv, segment_ids=PartitionSpec("batch", None), index=PartitionSpec())
    return logical_to_sharding(logical, mesh, rules, shapes=abstract)


def generate_ids(
    model: CausalLM,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    cfg: GenerationConfig,
    *,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    rows: int | None = None,
    example_ids: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> np.ndarray:
    """Generate for a left-padded batch; returns the new tokens [B, max_new_tokens] int32 as transformers'
    `generate(...)[:, P:]` lays them out: the end-of-sequence token included, `pad_token_id` after it (and in
    every column after the last row finished). `max_new_tokens` 0 returns [B, 0] after checking the inputs,
    running nothing on the model (no prefill).

    Args:
        model: the model (its parameters sharded on `mesh` when one is given).
        input_ids, attention_mask: [B, P] int, left-padded (mask 0 on padding); every row has a token.
        cfg: decoding settings.
        eos_token_ids: tokens that end a row: a list of one or more ids, or one id as an int (transformers'
            `eos_token_id` spelling).
        pad_token_id: the token emitted by finished rows (and used as left padding). Any int32 id, inside
            the vocabulary or not (e.g. a tokenizer's added <pad> at len(tokenizer)): padding enters the
            model as token 0 under mask 0, so it does not change the tokens.
        rows: pad the batch with dummy rows up to this many (a fixed row count keeps one compiled shape for
            every batch of a split); None: B rounded up to a multiple of the mesh's batch shards.
        example_ids: [B] ints in [0, 2**31): row b samples with the key `fold_in(key(cfg.seed),
            example_ids[b])` (folded with the step), so its draws do not depend on the other rows; `generate`
            passes each prompt's index. None: 0..B-1, the rows' own indices. Greedy decoding ignores them.
        mesh, rules: run sharded: rows over the `batch` rule's axes, parameters and the KV cache by `rules`.

    The prompt length is padded on the left to `prompt_bucket(P)`, so prompts whose lengths share a bucket
    share a compiled function.

    Raises:
        ValueError: shapes that differ, a row without tokens, padding that is not on the left, no EOS token,
            an EOS or pad id that is not an int, a prompt token (mask != 0) or EOS id outside
            [0, vocab_size) (naming it), `rows` below B or not a multiple of the mesh's batch shards, or
            `example_ids` not B ints in [0, 2**31).
    """
    input_ids, attention_mask = _integers(input_ids, "input_ids"), _integers(attention_mask, "attention_mask")
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, P]"
        )
    eos_token_ids, pad_token_id = _stop_and_pad_ids(eos_token_ids, pad_token_id)
    _check_left_padded(attention_mask)
    _check_token_ids(input_ids, attention_mask, eos_token_ids, model.cfg.vocab_size)
    input_ids, attention_mask = input_ids.astype(np.int32), attention_mask.astype(np.int32)
    b, p = input_ids.shape
    shards = 1 if mesh is None else batch_shard_count(mesh, rules)
    target_rows = -(-b // shards) * shards if rows is None else rows
    if target_rows < b or target_rows % shards:
        raise ValueError(
            f"rows={rows} must be >= the batch's {b} rows and a multiple of the {shards} batch shards"
        )
    examples = _example_ids(example_ids, b)
    if cfg.max_new_tokens == 0:  # nothing to decode: no prefill either
        return np.zeros((b, 0), np.int32)
    bucket = prompt_bucket(p)
    ids = np.full((target_rows, bucket), pad_token_id, np.int32)
    mask = np.zeros((target_rows, bucket), np.int32)
    ids[:b, bucket - p :], mask[:b, bucket - p :] = input_ids, attention_mask
    ids[b:, -1], mask[b:, -1] = 0, 1  # dummy rows: one token (id 0) each, their output discarded
    examples = np.pad(examples, (0, target_rows - b))  # the dummy rows' noise is discarded with their output
    # Dummy rows start finished: else the loop would run on (to max_new_tokens) until one emitted an EOS.
    live = np.arange(target_rows) < b

    graphdef, state = nnx.split(model)
    key = jax.random.key(cfg.seed)
    cache_shardings = None
    if mesh is not None:
        sharding = logical_to_sharding(PartitionSpec("batch", None), mesh, rules)
        # Every process holds the whole batch and hands each of its devices that device's rows.
        ids, mask = (
            jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index]) for a in (ids, mask)
        )
        by_row = logical_to_sharding(PartitionSpec("batch"), mesh, rules)
        examples, live = (
            jax.make_array_from_callback(a.shape, by_row, lambda index, a=a: a[index])
            for a in (examples, live)
        )
        cache_shardings = _cache_shardings(model, target_rows, bucket + cfg.max_new_tokens, mesh, rules)
    # The mesh in context: splash and cuDNN's packed attention run per device under it
    # (`attention._per_shard`); without it they would see the whole batch.
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = decoder(mesh)(
            state,
            ids,
            mask,
            key,
            examples,
            live,
            ProcessorSettings.of(cfg),
            jnp.asarray(pad_token_id, jnp.int32),
            graphdef=graphdef,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_ids=eos_token_ids,
            cache_shardings=cache_shardings,
        )
    return np.asarray(jax.device_get(out))[:b]


def _example_ids(example_ids: Sequence[int] | None, b: int) -> np.ndarray:
    """`generate_ids`' `example_ids` as [b] int32 (default 0..b-1).

    Raises:
        ValueError: not b ints in [0, 2**31).
    """
    if example_ids is None:
        return np.arange(b, dtype=np.int32)
    given = np.asarray(example_ids)
    if given.shape != (b,) or given.dtype.kind not in "iu" or ((given < 0) | (given >= 2**31)).any():
        raise ValueError(
            f"example_ids must be {b} ints in [0, 2**31), one per row of input_ids, got {example_ids!r}"
        )
    return given.astype(np.int32)


def strip_after_eos(tokens: np.ndarray, eos_token_ids: int | Sequence[int]) -> list[list[int]]:
    """[B, N] generated tokens -> per row the tokens before its first end-of-sequence token (`eos_token_ids`:
    a list of ids, or one as an int)."""
    out = []
    for row in np.asarray(tokens):
        ends = np.flatnonzero(np.isin(row, eos_token_ids))
        out.append(row[: ends[0] if ends.size else len(row)].tolist())
    return out


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    batch_size: int = 8,
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate for any number of prompts (token lists); returns per prompt its new tokens before the first
    end-of-sequence token, in the prompts' order.

    Prompts are sorted by length and decoded `batch_size` at a time (the last batch padded with dummy rows),
    so a batch holds prompts of similar lengths and every batch has the same row count. `on_batch(done,
    total)` is called after each batch.

    Sampling draws a prompt's noise from `cfg.seed` and the prompt's index in `prompts` (`generate_ids`'
    `example_ids`), not from its row: the same seed, prompts in the same order and decoding settings give the
    same samples with any `batch_size`, and a prompt keeps its sample when prompts after it are left out
    (`evaluate --max-examples`). Its batch still sets how much left padding it gets (the bucket of the
    batch's longest prompt), which can move its logits by floating-point rounding and so, rarely, change a
    sampled token; and a prompt at another index (another split, or the prompts reordered) draws other
    noise.

    Raises:
        ValueError: an empty prompt, a prompt token outside [0, vocab_size) (naming the prompt), `batch_size`
            < 1 or not a multiple of the mesh's batch shards; and as `generate_ids` (whose `eos_token_ids`
            and `pad_token_id` these are).
    """
    eos_token_ids, pad_token_id = _stop_and_pad_ids(eos_token_ids, pad_token_id)
    shards = 1 if mesh is None else batch_shard_count(mesh, rules)
    if batch_size < 1 or batch_size % shards:
        raise ValueError(
            f"batch_size {batch_size} must be >= 1 and a multiple of the mesh's {shards} batch shards"
        )
    lengths = np.asarray([len(p) for p in prompts])
    if (lengths == 0).any():
        raise ValueError(f"prompts {np.flatnonzero(lengths == 0).tolist()[:10]} are empty")
    vocab = model.cfg.vocab_size
    for i, prompt in enumerate(prompts):
        ids = _integers(prompt, f"prompt {i}")  # [n]
        if ((ids < 0) | (ids >= vocab)).any():
            outside = ids[(ids < 0) | (ids >= vocab)].tolist()
            raise ValueError(
                f"prompt {i} holds token ids {outside[:10]} outside the model's vocabulary [0, {vocab}). "
                "Fix: tokenize with the model's own tokenizer, or load a model whose vocab_size covers them"
            )
    order = np.argsort(lengths, kind="stable")
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], int(lengths[chunk].max()), pad_token_id)
        tokens = generate_ids(
            model,
            ids,
            mask,
            cfg,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            rows=batch_size,
            example_ids=chunk,
            mesh=mesh,
            rules=rules,
        )
        for i, row in zip(chunk, strip_after_eos(tokens, eos_token_ids), strict=True):
            results[i] = row
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return results
