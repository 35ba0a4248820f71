"""Generation against transformers' `generate` (PyTorch, the reference): greedy with repetition penalty on a
tiny random Qwen2 and on the packaged SmolLM2-135M, batches of prompts of different lengths (left padding +
attention mask), per-row EOS; the logits processors against transformers' own on random logits; sampling
limits; one compile per prompt-length bucket; sharded decoding equal to unsharded."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from nextquill_jax.models import load_pretrained, load_tokenizer, model_from_hf
from nextquill_jax.models.generate import (
    FLOAT32_SAFE,
    GenerationConfig,
    ProcessorSettings,
    choose_tokens,
    decoder,
    generate,
    generate_ids,
    left_pad,
    process_logits,
    prompt_bucket,
    strip_after_eos,
)
from nextquill_jax.models.gguf import read_gguf
from nextquill_jax.models.packaged import packaged_model_path

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

VOCAB = 300
PAD = 0
GREEDY = GenerationConfig(max_new_tokens=16, repetition_penalty=1.2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch's two intra-op threads spin against JAX's on a 2-core machine (10x slower generate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_hf_config):
    """A tiny random Qwen2 (with q/k/v biases, vocab VOCAB, hidden 64, 2 layers, untied head), saved by
    transformers."""
    torch.manual_seed(0)
    config = tiny_hf_config("qwen2", tied=False, vocab_size=VOCAB, rope_theta=10000.0)
    reference = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init's, so the argmax is not a near tie everywhere
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("tiny_qwen2")
    reference.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(transformers model, our model), both loaded from the saved directory."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return reference.eval(), load_pretrained(tiny_dir)


def reference_generate(
    model, ids: np.ndarray, mask: np.ndarray, cfg: GenerationConfig, eos: int, pad: int, penalty=None
):
    """transformers' greedy generate: new tokens [B, max_new_tokens], `pad` after an early stop. `penalty`: a
    RepetitionPenaltyLogitsProcessor used instead of generate's own from `cfg.repetition_penalty`."""
    penalising = {"repetition_penalty": cfg.repetition_penalty}
    if penalty is not None:
        penalising = {"logits_processor": transformers.LogitsProcessorList([penalty])}
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **penalising,
        )
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, cfg.max_new_tokens - new.shape[1])), constant_values=pad)


def prompts_of(lengths, seed=1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, n).tolist() for n in lengths]


LENGTHS = [5, 11, 17, 3, 9, 20, 14]


@pytest.fixture(scope="module")
def tiny_case(tiny):
    """Prompts of different lengths (left-padded to 20) and transformers' tokens for them, with an EOS token
    chosen from transformers' own output so that row 0 stops early while other rows go on."""
    reference, _ = tiny
    prompts = prompts_of(LENGTHS)
    ids, mask = left_pad(prompts, max(LENGTHS), PAD)
    free = reference_generate(reference, ids, mask, GREEDY, eos=VOCAB + 1, pad=PAD)  # no EOS can occur
    step = next(
        s for s in range(3, 12) if free[0, s] not in free[1:, : s + 1] and free[0, s] not in free[0, :s]
    )
    eos = int(free[0, step])
    expected = reference_generate(reference, ids, mask, GREEDY, eos=eos, pad=PAD)
    assert expected[0, step] == eos and (expected[0, step + 1 :] == PAD).all()
    assert (expected[:, -1] != PAD).any(), "some row should run to max_new_tokens"
    return prompts, ids, mask, eos, expected


def test_greedy_matches_transformers_tiny_qwen2(tiny, tiny_case):
    _, model = tiny
    _, ids, mask, eos, expected = tiny_case
    ours = generate_ids(model, ids, mask, GREEDY, eos_token_ids=[eos], pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)


def test_without_penalty_matches_transformers_and_penalty_matters(tiny, tiny_case):
    reference, model = tiny
    _, ids, mask, eos, with_penalty = tiny_case
    cfg = GenerationConfig(max_new_tokens=16, repetition_penalty=1.0)
    expected = reference_generate(reference, ids, mask, cfg, eos=eos, pad=PAD)
    ours = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(expected, with_penalty)  # the penalty changes this model's output


def test_left_padding_is_not_penalised(tiny, tiny_case):
    """transformers leaves the left padding out of the repetition penalty (`prompt_ignore_length`): with the
    pad token set to a token greedy decoding picks first in a padded row (and no prompt holds), the tokens
    still match; penalising the padding (transformers' processor without `prompt_ignore_length`) would change
    them."""
    reference, model = tiny
    prompts, _, _, eos, expected = tiny_case
    used = {t for p in prompts for t in p} | {eos}
    pad = next(
        int(expected[r, 0])
        for r in range(len(prompts))
        if len(prompts[r]) < 20 and expected[r, 0] not in used
    )
    ids, mask = left_pad(prompts, max(LENGTHS), pad)
    want = reference_generate(reference, ids, mask, GREEDY, eos=eos, pad=pad)
    ours = generate_ids(model, ids, mask, GREEDY, eos_token_ids=[eos], pad_token_id=pad)
    np.testing.assert_array_equal(ours, want)
    penalty = transformers.RepetitionPenaltyLogitsProcessor(GREEDY.repetition_penalty)
    penalising = reference_generate(reference, ids, mask, GREEDY, eos=eos, pad=pad, penalty=penalty)
    assert not np.array_equal(penalising, want)


def test_a_penalty_on_the_generated_tokens_only_matches_transformers_prompt_ignore_length(tiny, tiny_case):
    """`repetition_penalty_prompt: false` against transformers' greedy generate with its processor told to
    ignore the whole (left-padded) prompt (`prompt_ignore_length`): the same tokens; and not those of the
    penalty over the prompt, nor of no penalty (the choice matters for this model)."""
    reference, model = tiny
    _, ids, mask, eos, over_prompt = tiny_case
    cfg = dataclasses.replace(GREEDY, repetition_penalty_prompt=False)
    penalty = transformers.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, ids.shape[1])
    expected = reference_generate(reference, ids, mask, cfg, eos=eos, pad=PAD, penalty=penalty)
    ours = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(ours, over_prompt)
    unpenalised = dataclasses.replace(GREEDY, repetition_penalty=1.0)
    assert not np.array_equal(
        ours, generate_ids(model, ids, mask, unpenalised, eos_token_ids=[eos], pad_token_id=PAD)
    )


def before_eos(rows: np.ndarray, eos: int) -> list[list[int]]:
    """Each row's tokens before its first `eos` (all of them without one): what `generate` returns, stated
    in plain Python."""
    return [row[: row.index(eos)] if eos in row else row for row in np.asarray(rows).tolist()]


def test_generate_batches_by_length_with_one_compile_per_bucket(tiny, tiny_case):
    """generate() in batches of 2 sorted by length (3,5 | 9,11 | 14,17 | 20 + a dummy row): per prompt,
    transformers' tokens before EOS, in the prompts' order; the decode loop compiles once for the two
    batches in bucket 16 and once for the two in bucket 32 (no other test decodes 2 rows)."""
    _, model = tiny
    prompts, _, _, eos, expected = tiny_case
    jitted = decoder(None)
    before = jitted._cache_size()
    compiled = []
    ours = generate(
        model,
        prompts,
        GREEDY,
        eos_token_ids=[eos],
        pad_token_id=PAD,
        batch_size=2,
        on_batch=lambda done, total: compiled.append((done, total, jitted._cache_size() - before)),
    )
    assert [prompt_bucket(n) for n in (5, 11, 17, 20)] == [16, 16, 32, 32]
    assert compiled == [(2, 7, 1), (4, 7, 1), (6, 7, 2), (7, 7, 2)]  # prompts done of 7, compiles
    assert ours == before_eos(expected, eos)
    assert len(ours[0]) < GREEDY.max_new_tokens and max(len(r) for r in ours) == GREEDY.max_new_tokens


@contextlib.contextmanager
def counted_decode_steps(monkeypatch) -> Iterator[list[int]]:
    """A list that gains an entry per decode step (`CausalLM.extend` call) run inside the block. The decoding
    loops are traced afresh on entry (`decoder`'s cache cleared), to trace the counting `extend`, and again
    on exit, so the counting loops stay out of the other tests."""
    from nextquill_jax.models.causal_lm import CausalLM

    steps, extend = [], CausalLM.extend

    def counted(self, *args, **kwargs):
        jax.debug.callback(lambda: steps.append(1))
        return extend(self, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "extend", counted)
    decoder.cache_clear()
    try:
        yield steps
    finally:
        decoder.cache_clear()


def test_dummy_rows_that_fill_a_batch_do_not_keep_the_decode_loop_running(tiny, monkeypatch):
    """One prompt whose first greedy token is its EOS, in a batch filled to 4 rows (as `generate` fills a
    split's last batch): the loop runs one decode step, as for the prompt alone, not on to max_new_tokens
    while the dummy rows (which never stop on that EOS by themselves) go on; the tokens equal transformers'.
    Steps are counted by a callback in `CausalLM.extend`, traced afresh (`decoder`'s cache cleared)."""
    reference, model = tiny
    prompt = np.array([[5, 17, 42, 99]])
    mask = np.ones_like(prompt)
    cfg = dataclasses.replace(GREEDY, max_new_tokens=40)
    eos = int(generate_ids(model, prompt, mask, GREEDY, eos_token_ids=[VOCAB - 1], pad_token_id=PAD)[0, 0])
    with counted_decode_steps(monkeypatch) as steps:
        counts, outputs = [], []
        for rows in (1, 4):
            steps.clear()
            outputs.append(
                generate_ids(model, prompt, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD, rows=rows)
            )
            jax.effects_barrier()
            counts.append(len(steps))
    assert counts == [1, 1]
    expected = reference_generate(reference, prompt, mask, cfg, eos, PAD)
    for out in outputs:
        np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == eos and (out[0, 1:] == PAD).all()


def test_the_loop_runs_one_model_step_per_token_and_pads_the_columns_after_it_stopped(tiny, monkeypatch):
    """A prompt that never emits its EOS within max_new_tokens = 3 costs 3 decode steps (each step's
    `CausalLM.extend` feeds the token just chosen), not a 4th whose token has no column; one whose first token
    is its EOS stops the loop after 1, and the columns it never reached hold the pad id (here one outside
    the vocabulary, so no generated token can pass for it), as transformers' tokens padded to max_new_tokens
    do. Steps are counted as in the test above."""
    reference, model = tiny
    prompt = np.array([[5, 17, 42, 99]])
    mask = np.ones_like(prompt)
    cfg, pad = dataclasses.replace(GREEDY, max_new_tokens=3), VOCAB + 7
    free = reference_generate(reference, prompt, mask, cfg, eos=VOCAB + 1, pad=PAD)[0]  # no EOS can occur
    never = next(t for t in range(1, VOCAB) if t not in free)
    with counted_decode_steps(monkeypatch) as steps:
        for eos, want_steps in ((never, 3), (int(free[0]), 1)):
            steps.clear()
            ours = generate_ids(model, prompt, mask, cfg, eos_token_ids=[eos], pad_token_id=pad)
            jax.effects_barrier()
            assert len(steps) == want_steps, eos
            np.testing.assert_array_equal(ours, reference_generate(reference, prompt, mask, cfg, eos, pad))
    assert ours[0].tolist() == [free[0], pad, pad]


def test_sampling_limits_equal_greedy(tiny, tiny_case):
    _, model = tiny
    _, ids, mask, eos, expected = tiny_case
    for cfg in (
        GenerationConfig(max_new_tokens=16, do_sample=True, top_k=1, temperature=1.0, top_p=1.0, seed=3),
        GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1e-6, top_k=0, top_p=1.0, seed=4),
    ):
        ours = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)
        np.testing.assert_array_equal(ours, expected, err_msg=str(cfg))


def test_sampling_draws_vary_with_seed_and_repeat_with_it(tiny, tiny_case):
    _, model = tiny
    _, ids, mask, eos, _ = tiny_case
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, seed=0)
    a = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)
    b = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)
    c = generate_ids(
        model,
        ids,
        mask,
        GenerationConfig(**{**cfg.__dict__, "seed": 1}),
        eos_token_ids=[eos],
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_prompts_sample_depends_on_its_index_not_on_its_batch(tiny, tiny_case):
    """Sampling keys each prompt by the seed and its index in `prompts`: the same samples with any batch size,
    alone or among the others, when later prompts are left out (the 3, 5, 9, 11 and 14-token prompts also get
    another amount of left padding: 16 slots alone or in a batch of 4, 32 together). The first draws equal
    jax.random.categorical with that key (seed, index, step 0) on transformers' logits of each prompt /
    temperature. 16 new tokens and batches of 7 and 4: the decode loops the greedy tests compile (settings
    are traced), so only the batches of one compile here."""
    reference, model = tiny
    prompts, ids, mask, eos, _ = tiny_case
    cfg = GenerationConfig(
        max_new_tokens=16, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=7
    )
    sample = lambda batch, size: generate(
        model, batch, cfg, eos_token_ids=[eos], pad_token_id=PAD, batch_size=size
    )
    together = sample(prompts, len(prompts))
    assert sample(prompts, 4) == sample(prompts, 1) == together
    assert sample(prompts[:3], 4) == together[:3] and sample(prompts[:1], 4) == together[:1]
    assert len({tuple(t) for t in together}) == len(prompts)  # the draws differ: the check has teeth

    drawn = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)[:, 0]
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1]
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(7), i), 0) for i in range(len(prompts))]
    expected = [int(jax.random.categorical(k, z / 2.0)) for k, z in zip(keys, logits.numpy(), strict=True)]
    assert drawn.tolist() == expected
    # generate() sorts the prompts by length: its rows are not the prompts' indices
    assert [t[:1] for t in together] == [[t] if t != eos else [] for t in expected]
    with pytest.raises(ValueError) as e:
        generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD, example_ids=[0, 1])
    assert str(e.value) == (
        f"example_ids must be {len(prompts)} ints in [0, 2**31), one per row of input_ids, got [0, 1]"
    )


def test_every_sampled_step_draws_with_its_own_key_as_the_docstring_states(tiny, tiny_case):
    """Each step t of row b draws `jax.random.categorical(fold_in(fold_in(key(seed), b), t), logits / T)`:
    stated here step by step on transformers' logits of each prompt (unpadded) and its tokens so far, to the
    row's EOS. The test above checks step 0 only; a key that did not change with the step would replay one
    noise at every step (the same Gumbel draw for a token each time), which this catches."""
    reference, model = tiny
    prompts, ids, mask, eos, _ = tiny_case
    cfg = GenerationConfig(
        max_new_tokens=16,
        do_sample=True,
        temperature=2.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        seed=11,
    )
    expected = np.full((len(prompts), cfg.max_new_tokens), PAD)
    for row, prompt in enumerate(prompts):
        tokens, key = list(prompt), jax.random.fold_in(jax.random.key(cfg.seed), row)
        for step in range(cfg.max_new_tokens):
            with torch.no_grad():
                logits = reference(input_ids=torch.tensor([tokens])).logits[0, -1].numpy()
            token = int(jax.random.categorical(jax.random.fold_in(key, step), logits / cfg.temperature))
            expected[row, step] = token
            tokens.append(token)
            if token == eos:
                break
    ours = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)
    # At temperature 2 the draws stray from greedy decoding: a key schedule that is wrong would show.
    assert (expected[:, 1:] != PAD).sum() > 50


def test_pad_id_outside_the_vocabulary_gives_the_same_tokens(tiny, tiny_case):
    """A tokenizer's added <pad> at len(tokenizer) >= V (or a negative one) is only padding and the token of
    finished rows: the tokens before EOS are transformers' (with pad 0), and after EOS each row holds the pad
    id. (Fed into the model, the pad id's NaN embedding reached every row through masked attention.)"""
    _, model = tiny
    prompts, ids, mask, eos, expected = tiny_case
    for pad in (VOCAB, VOCAB + 200, -1):
        padded = np.where(mask > 0, ids, pad)
        ours = generate_ids(model, padded, mask, GREEDY, eos_token_ids=[eos], pad_token_id=pad)
        np.testing.assert_array_equal(np.where(ours == pad, PAD, ours), expected, err_msg=f"pad {pad}")
        assert (ours == pad).any()
    assert generate(model, prompts, GREEDY, eos_token_ids=[eos], pad_token_id=VOCAB, batch_size=4) == (
        before_eos(expected, eos)
    )


def test_a_pad_id_that_is_an_eos_id_cuts_each_row_at_its_first_eos(tiny, tiny_case):
    """Tokenizers without a pad token pad with their EOS (the fix the pad error suggests): a finished row
    then repeats the EOS to the end, and each prompt's tokens are those before the first, transformers'
    (`before_eos`), not all but the trailing ones. By hand first: rows that hold EOS ids several times."""
    rows = np.array([[5, 2, 2, 2], [7, 8, 9, 3], [4, 3, 2, 2], [1, 6, 6, 6]])
    assert strip_after_eos(rows, [2, 3]) == [[5], [7, 8, 9], [4], [1, 6, 6, 6]]
    _, model = tiny
    prompts, _, _, eos, expected = tiny_case
    ours = generate(model, prompts, GREEDY, eos_token_ids=[eos], pad_token_id=eos, batch_size=4)
    assert ours == before_eos(expected, eos)


def test_token_ids_outside_the_vocabulary_are_refused(tiny):
    """Prompt tokens (under mask 1) and EOS ids must be in [0, V): an id >= V embeds as NaN, a negative id
    wraps around to another token's embedding. Padding (mask 0) may hold any id."""
    _, model = tiny
    mask, ok = np.array([[0, 1, 1, 1]]), np.array([[7, 5, 4, 6]])
    for bad in (VOCAB, -3):
        with pytest.raises(ValueError, match=rf"prompt token id {bad} \(row 0, position 2\).*\[0, {VOCAB}\)"):
            generate_ids(model, np.array([[7, 5, bad, 6]]), mask, GREEDY, eos_token_ids=[1], pad_token_id=0)
        with pytest.raises(ValueError, match=rf"prompt 1 holds token ids \[{bad}\].*\[0, {VOCAB}\)"):
            generate(model, [[5, 6], [5, bad]], GREEDY, eos_token_ids=[1], pad_token_id=0)
        with pytest.raises(ValueError, match=rf"eos_token_ids \[{bad}\] are outside .*\[0, {VOCAB}\)"):
            generate_ids(model, ok, mask, GREEDY, eos_token_ids=[1, bad], pad_token_id=0)
    # Of several, the first in row order is named, and all are counted.
    several = np.array([[7, VOCAB + 1, 4, -3], [7, 5, VOCAB, 6]])
    with pytest.raises(ValueError, match=rf"id {VOCAB + 1} \(row 0, position 1\).*; 3 such tokens in all"):
        generate_ids(model, several, np.vstack([mask, mask]), GREEDY, eos_token_ids=[1], pad_token_id=0)


def test_an_int_eos_is_one_id_and_ids_that_are_not_ints_are_refused_by_name(tiny, tiny_case):
    """transformers spells one end token as a bare int (`eos_token_id=7`): it is the list of that id, id 0
    included (it was 'not iterable', and 0 'empty'); None or a non-int EOS or pad id is refused by name."""
    _, model = tiny
    prompts, ids, mask, eos, expected = tiny_case
    np.testing.assert_array_equal(
        generate_ids(model, ids, mask, GREEDY, eos_token_ids=eos, pad_token_id=PAD), expected
    )
    np.testing.assert_array_equal(
        generate_ids(model, ids, mask, GREEDY, eos_token_ids=np.int64(eos), pad_token_id=np.int32(PAD)),
        expected,
    )
    assert generate(model, prompts, GREEDY, eos_token_ids=eos, pad_token_id=PAD, batch_size=4) == (
        before_eos(expected, eos)
    )
    assert strip_after_eos(expected, eos) == strip_after_eos(expected, [eos])
    zero = GenerationConfig(max_new_tokens=4)
    np.testing.assert_array_equal(
        generate_ids(model, ids, mask, zero, eos_token_ids=0, pad_token_id=PAD),
        generate_ids(model, ids, mask, zero, eos_token_ids=[0], pad_token_id=PAD),
    )
    fix_eos = "Fix: pass the tokenizer's eos_token_id"
    for bad in (None, "7", b"\x07", [eos, None], 7.0, True):  # bytes iterate as ints: still refused
        message = f"eos_token_ids must be a token id (int) or a list of them, got {bad!r}. {fix_eos}"
        with pytest.raises(ValueError) as e:
            generate_ids(model, ids, mask, GREEDY, eos_token_ids=bad, pad_token_id=PAD)
        assert str(e.value) == message
        with pytest.raises(ValueError) as e:
            generate(model, prompts, GREEDY, eos_token_ids=bad, pad_token_id=PAD)
        assert str(e.value) == message
    fix_pad = "Fix: pass the tokenizer's pad_token_id, or its eos_token_id when it has none"
    for bad in (None, 0.0, "0"):
        message = f"pad_token_id must be a token id (an int32), got {bad!r}. {fix_pad}"
        with pytest.raises(ValueError) as e:
            generate_ids(model, ids, mask, GREEDY, eos_token_ids=[eos], pad_token_id=bad)
        assert str(e.value) == message
        with pytest.raises(ValueError) as e:
            generate(model, prompts, GREEDY, eos_token_ids=[eos], pad_token_id=bad)
        assert str(e.value) == message


def test_zero_new_tokens_checks_the_inputs_and_runs_nothing_on_the_model(tiny, tiny_case, monkeypatch):
    """`max_new_tokens` 0 (evaluate's losses-only mode) returns no tokens without compiling or running a
    prefill, and still refuses what it would refuse with tokens to generate."""
    _, model = tiny
    prompts, ids, mask, eos, _ = tiny_case

    def no_decoder(*args, **kwargs):
        raise AssertionError("max_new_tokens 0 must not build or run the decoder")

    monkeypatch.setattr("nextquill_jax.models.generate.decoder", no_decoder)
    zero = GenerationConfig(max_new_tokens=0)
    out = generate_ids(model, ids, mask, zero, eos_token_ids=[eos], pad_token_id=PAD)
    assert out.shape == (len(ids), 0) and out.dtype == np.int32
    assert generate(model, prompts, zero, eos_token_ids=[eos], pad_token_id=PAD, batch_size=2) == [
        [] for _ in prompts
    ]
    with pytest.raises(ValueError, match="not left-padded"):
        generate_ids(model, ids, mask[:, ::-1], zero, eos_token_ids=[eos], pad_token_id=PAD)
    with pytest.raises(ValueError, match="example_ids must be"):
        generate_ids(model, ids, mask, zero, eos_token_ids=[eos], pad_token_id=PAD, example_ids=[0])


def test_prompt_buckets():
    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 256, 257, 600, 2048)] == [
        16,
        16,
        32,
        128,
        256,
        512,
        768,
        2048,
    ]


def test_bad_inputs_are_refused(tiny):
    _, model = tiny
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="not left-padded"):
        generate_ids(model, ids, np.array([[1, 1, 0, 0]]), GREEDY, eos_token_ids=[1], pad_token_id=0)
    with pytest.raises(ValueError, match="have no token"):
        generate_ids(model, ids, np.zeros((1, 4), np.int32), GREEDY, eos_token_ids=[1], pad_token_id=0)
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        generate_ids(model, ids, np.ones((1, 4), np.int32), GREEDY, eos_token_ids=[], pad_token_id=0)
    for bad in (
        {"max_new_tokens": -1},
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        # Each of these raised a TypeError or an OverflowError naming no field (the last two only once
        # decoding started, after evaluate's loss pass).
        {"temperature": "0.8"},
        {"top_p": "0.9"},
        {"repetition_penalty": None},
        {"top_k": 2**31},
        {"max_new_tokens": 2**31},
    ):
        with pytest.raises(ValueError, match=f"GenerationConfig.{next(iter(bad))} must be"):
            GenerationConfig(**bad)
    assert GenerationConfig(temperature=np.float32(0.5), top_p=1, top_k=np.iinfo(np.int32).max).top_p == 1
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id \(an int32\), got 1099511627776"):
        generate_ids(model, ids, np.ones((1, 4), np.int32), GREEDY, eos_token_ids=[1], pad_token_id=2**40)


def test_an_empty_prompt_is_refused_by_its_index_among_the_prompts(tiny):
    """`generate` sorts the prompts by length before padding them: the empty one (index 1 here) comes first
    in its batch, so only a check before the sort names the prompt the caller knows (left_pad's own error
    would say "prompt 0", its place in the batch)."""
    _, model = tiny
    with pytest.raises(ValueError, match=r"^prompts \[1\] are empty$"):
        generate(model, [[5, 6], [], [7]], GREEDY, eos_token_ids=[1], pad_token_id=0)


def test_the_seed_and_the_example_ids_are_refused_exactly_where_they_would_wrap(tiny):
    """The sampling key keeps a seed's low 32 bits and the rows' example ids are int32: a seed of 2**32
    would sample as seed 0, an example id of 2**31 as -2**31, each silently another prompt's noise. The
    largest values that do not wrap are taken (max_new_tokens 0: the checks run, the model does not)."""
    _, model = tiny
    assert GenerationConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ValueError, match=r"GenerationConfig.seed must be an int in \[0, 2\*\*32\)"):
        GenerationConfig(seed=2**32)
    ids, mask = np.ones((1, 4), np.int32), np.ones((1, 4), np.int32)
    zero = GenerationConfig(max_new_tokens=0)
    out = generate_ids(model, ids, mask, zero, eos_token_ids=[1], pad_token_id=0, example_ids=[2**31 - 1])
    assert out.shape == (1, 0)
    with pytest.raises(ValueError, match=r"example_ids must be 1 ints in \[0, 2\*\*31\)"):
        generate_ids(model, ids, mask, zero, eos_token_ids=[1], pad_token_id=0, example_ids=[2**31])


def test_temperatures_and_penalties_that_overflow_float32_logits_are_refused_and_the_bounds_are_safe():
    """A temperature of 1e-39 overflowed the float32 logits to inf (1e-46 rounded to 0): the sampler drew
    token 0 or 1 in place of the argmax, silently. At the bounds the processed logits stay finite and the
    sampled token is the argmax of the processed logits, at a logit scale of 100."""
    for bad in ({"temperature": 1e-39}, {"temperature": 1e-46}, {"temperature": 1e7},
                {"repetition_penalty": 1e-39}, {"repetition_penalty": 1e39}):  # fmt: skip
        with pytest.raises(ValueError, match=f"GenerationConfig.{next(iter(bad))} must be in .*overflow"):
            GenerationConfig(do_sample=True, **bad)
    from nextquill_jax.subcommand import logit_scale  # the flags' bounds, stated without JAX

    assert [logit_scale(str(bound)) for bound in FLOAT32_SAFE] == list(FLOAT32_SAFE)
    for outside in (FLOAT32_SAFE[0] / 2, FLOAT32_SAFE[1] * 2):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \[1e-06, 1e\+06\], got"):
            logit_scale(str(outside))
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 30, jnp.float32)  # [B, V]
    logits = logits.at[:, 7].set(100.0)
    seen = jnp.zeros((4, 50), bool).at[:, :7].set(True)  # penalised, both signs
    keys = jax.random.split(jax.random.key(0), 4)
    for temperature in FLOAT32_SAFE[:1]:
        for penalty in FLOAT32_SAFE:
            cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   repetition_penalty=penalty)  # fmt: skip
            settings = ProcessorSettings.of(cfg)
            processed = process_logits(logits, seen, settings)
            assert bool(jnp.isfinite(processed).all()), (temperature, penalty)
            argmax = np.asarray(processed).argmax(-1).tolist()  # 7, or a seen token at a penalty < 1
            assert np.asarray(choose_tokens(logits, seen, settings, keys)).tolist() == argmax
            assert (argmax == [7] * 4) == (penalty > 1)


def test_ids_and_masks_that_would_change_the_tokens_silently_are_refused(tiny, tiny_case):
    """Each of these decoded other tokens without a word (the audit's cases): a mask of 2 (the prefill's
    segment ids, which the decode steps' segment 1 then could not see), a float id (truncated, 5.7 as 5), an
    int64 id past int32 (2**32 + 5 wrapped to 5, inside the vocabulary); a bool mask is a 0/1 mask."""
    _, model = tiny
    _, ids, mask, eos, expected = tiny_case  # expected: transformers' tokens
    np.testing.assert_array_equal(
        generate_ids(
            model, ids, np.asarray(mask).astype(bool), GREEDY, eos_token_ids=[eos], pad_token_id=PAD
        ),
        expected,
    )
    with pytest.raises(ValueError, match=r"attention_mask holds \[2\]; it must be 0 \(padding\) or 1"):
        generate_ids(model, ids, 2 * np.asarray(mask), GREEDY, eos_token_ids=[eos], pad_token_id=PAD)
    with pytest.raises(ValueError, match="input_ids must hold integers, got dtype float64"):
        generate_ids(model, np.asarray(ids, np.float64), mask, GREEDY, eos_token_ids=[eos], pad_token_id=PAD)
    wrapped = np.asarray(ids, np.int64).copy()
    wrapped[0, -1] = 2**32 + 5
    with pytest.raises(ValueError, match=rf"prompt token id {2**32 + 5} \(row 0, position"):
        generate_ids(model, wrapped, mask, GREEDY, eos_token_ids=[eos], pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt 1 must hold integers, got dtype float64"):
        generate(model, [[5, 6], [5.7, 6.2]], GREEDY, eos_token_ids=[eos], pad_token_id=PAD)


def test_a_cache_of_another_row_count_is_refused_by_prefill_and_extend(tiny):
    _, model = tiny
    cache = model.init_cache(4, 8)
    ids = jnp.ones((2, 3), jnp.int32)
    for step in (model.prefill, model.extend):
        with pytest.raises(ValueError, match="the KV cache holds 4 rows but the input has 2"):
            step(ids, cache)


# ------------------------------------------------------------------------------------------------------------
# Prefill through the configured attention against the dense prefill over the whole cache (`extend`, the only
# path before `prefill`).

PREFILL_FAMILIES = {
    "llama": dict(tied=False),
    "qwen2": dict(tied=False),  # q/k/v biases
    "qwen3": dict(tied=True, head_dim=24),  # q/k norms
}
# Left-padded to prompt_bucket(300) = 512 slots: the first 212 are padding in every row (blockwise skips its
# pad-only blocks), blocks 1-3 mix padding and tokens, row 1 is 503 padding slots and 9 tokens.
PREFILL_LENGTHS = [300, 9, 140]
PREFILL_STEPS = 8


@pytest.fixture(scope="module", params=list(PREFILL_FAMILIES))
def family_weights(request, tiny_hf_config):
    """(HF config dict, tensors by HF name) of a tiny random transformers model of the family, weights moved
    well off their init so that greedy decoding has no near ties."""
    torch.manual_seed(0)
    config = tiny_hf_config(
        request.param, vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=1024,
        **PREFILL_FAMILIES[request.param],
    )  # fmt: skip
    reference = AutoModelForCausalLM.from_config(config)
    tensors = {}
    for name, p in reference.state_dict().items():
        if not (config.tie_word_embeddings and name == "lm_head.weight"):
            tensors[name] = (p + 0.3 * torch.randn_like(p)).numpy()
    return config.to_dict(), tensors


@pytest.fixture(scope="module")
def prefill_batch():
    """ids, mask [3, 512] left-padded as generate_ids pads them, and positions from 0 at each first token."""
    prompts = prompts_of(PREFILL_LENGTHS, seed=5)
    ids, mask = left_pad(prompts, prompt_bucket(max(PREFILL_LENGTHS)), PAD)
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def compiled_calls(model, ids, mask, positions) -> tuple[dict, dict]:
    """`prefill` and `extend` of `model` compiled for the prompt batch, each as f(cache) -> (logits [B, T, V],
    cache), and their compiled temporary memory {name: bytes}."""
    graphdef, state = nnx.split(model)
    cache = model.init_cache(len(ids), ids.shape[1] + PREFILL_STEPS)
    calls, temp = {}, {}
    for method in ("prefill", "extend"):
        f = jax.jit(lambda s, *args, m=method: getattr(nnx.merge(graphdef, s), m)(*args))
        compiled = f.lower(state, ids, cache, positions, mask).compile()
        calls[method] = lambda c, compiled=compiled: compiled(state, ids, c, positions, mask)
        temp[method] = compiled.memory_analysis().temp_size_in_bytes
    return calls, temp


def greedy(model, prefill, mask: np.ndarray, steps: int, step) -> np.ndarray:
    """Greedy tokens [B, steps] (no penalty, no EOS) as `generate_ids` decodes them: the prompt through
    `prefill` (f(cache) -> (logits, cache)), then one-token `extend` steps (`step`, from `extend_step`) from
    each row's next position."""
    state = nnx.state(model)
    logits, cache = prefill(model.init_cache(len(mask), mask.shape[1] + steps))
    next_position, tokens = mask.sum(axis=1).astype(np.int32), []
    for i in range(steps):
        tokens.append(np.asarray(logits[:, -1].argmax(-1), np.int32))
        logits, cache = step(state, tokens[-1][:, None], cache, (next_position + i)[:, None])
    return np.stack(tokens, axis=1)


def extend_step(model):
    """`model`'s one-token `extend`, jitted: f(state, ids, cache, positions) -> (logits, cache)."""
    graphdef = nnx.graphdef(model)
    return jax.jit(lambda s, ids, cache, pos: nnx.merge(graphdef, s).extend(ids, cache, pos, last_only=True))


def max_rel_diff(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_prefill_through_configured_attention_equals_dense_prefill(family_weights, prefill_batch):
    """Prefill through blockwise attention (`xla`, the default) gives the dense whole-cache prefill's
    (`extend`'s) logits at every real token and its keys/values at every real slot, without its float32
    scores [B, H, T, S] (compiled temporary memory), and greedy decoding after it gives the dense path's
    tokens. `cudnn` is refused on CPU: prefill runs the configured attention. A prompt longer than the cache
    is refused."""
    ids, mask, positions = prefill_batch
    model = model_from_hf(*family_weights)
    assert model.cfg.attention_impl == "xla"
    calls, temp = compiled_calls(model, ids, mask, positions)
    cache = model.init_cache(len(ids), ids.shape[1] + PREFILL_STEPS)
    (ours, our_cache), (dense, dense_cache) = calls["prefill"](cache), calls["extend"](cache)
    real = mask.astype(bool)
    assert max_rel_diff(np.asarray(ours)[real], np.asarray(dense)[real]) <= 1e-5
    t = ids.shape[1]  # the prompt's slots; the PREFILL_STEPS after them are unwritten
    for got, want in ((our_cache.k, dense_cache.k), (our_cache.v, dense_cache.v)):
        assert max_rel_diff(np.asarray(got)[:, :, :t][:, real], np.asarray(want)[:, :, :t][:, real]) <= 1e-5
    np.testing.assert_array_equal(our_cache.segment_ids, dense_cache.segment_ids)
    assert int(our_cache.index) == int(dense_cache.index) == t
    scores = len(ids) * model.cfg.num_heads * t * cache.max_len * 4
    assert temp["extend"] >= scores > 2 * temp["prefill"], (temp, scores)

    step = extend_step(model)  # one compile for both decodes
    expected = greedy(model, calls["extend"], mask, PREFILL_STEPS, step)
    np.testing.assert_array_equal(greedy(model, calls["prefill"], mask, PREFILL_STEPS, step), expected)
    assert len(np.unique(expected)) > PREFILL_STEPS  # not one repeated token: the comparison can fail

    cudnn = model_from_hf(*family_weights, attention_impl="cudnn")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        cudnn.prefill(ids, cache, positions, mask)
    with pytest.raises(ValueError, match="512 tokens does not fit the KV cache's max_len 511"):
        model.prefill(ids, model.init_cache(len(ids), 511), positions, mask)


def test_prefill_into_a_bfloat16_cache_attends_to_the_keys_the_cache_holds(family_weights):
    """A float32 model may keep its cache in bfloat16 (`init_cache(dtype=)`): every later step reads the
    prompt's keys and values rounded to it, and so must the prefill's own attention, as the dense path's
    (`extend`, which reads them back from the cache) does; unrounded, the prompt's logits, the first token
    generated among them, move by bfloat16 rounding (5.6e-3 to 1.4e-2 of the largest here). Rounded, they
    agree to 1e-6, or to 2.5e-4 where the two attentions' float32 differences (~1e-6) round a key of a later
    layer across a bfloat16 step (qwen3 here): the bound is 1e-3."""
    model = model_from_hf(*family_weights)
    ids, mask = left_pad(prompts_of([7, 12, 3], seed=4), 16, PAD)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(len(ids), 20, dtype=jnp.bfloat16)
    run = lambda method: jax.jit(
        lambda s, c: getattr(nnx.merge(graphdef, s), method)(ids, c, positions, mask)
    )
    (ours, our_cache), (dense, _) = run("prefill")(state, cache), run("extend")(state, cache)
    assert our_cache.k.dtype == jnp.bfloat16
    real = mask.astype(bool)
    assert max_rel_diff(np.asarray(ours)[real], np.asarray(dense)[real]) <= 1e-3


# ------------------------------------------------------------------------------------------------------------
# The processors against transformers' on random logits.


def reference_processors(cfg: GenerationConfig, prompt_ignore_length) -> transformers.LogitsProcessorList:
    """transformers' processors for `cfg`, built the way `_get_logits_processor` builds them."""
    processors = transformers.LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        processors.append(
            transformers.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, prompt_ignore_length)
        )
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            processors.append(transformers.TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k != 0:
            processors.append(transformers.TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            processors.append(transformers.TopPLogitsWarper(cfg.top_p))
    return processors


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(repetition_penalty=1.3),
        GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
        GenerationConfig(do_sample=True, temperature=1.0, top_k=7, top_p=1.0, repetition_penalty=1.0),
        GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=0.8, repetition_penalty=1.0),
        GenerationConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2),
        GenerationConfig(do_sample=True, temperature=1.5, top_k=20, top_p=0.5, repetition_penalty=0.8),
        # The edges: the most probable token survives any top_p; a top_k above the vocabulary keeps it all.
        GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1e-9, repetition_penalty=1.0),
        GenerationConfig(do_sample=True, temperature=1.0, top_k=200, top_p=1.0, repetition_penalty=1.0),
    ],
    ids=[
        "penalty",
        "temperature",
        "top_k",
        "top_p",
        "public_code_sampling",
        "all",
        "tiny_top_p",
        "top_k_over_v",
    ],
)
def test_processors_match_transformers(cfg):
    rng = np.random.default_rng(0)
    b, v, width = 4, 97, 12
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    history = rng.integers(0, v, (b, width))  # each row: `pad` leading padding columns, then its tokens
    pad = np.array([0, 3, 7, 11])
    seen = np.zeros((b, v), bool)
    for row in range(b):
        seen[row, history[row, pad[row] :]] = True
    ours = np.asarray(process_logits(logits, seen, ProcessorSettings.of(cfg)))
    theirs = reference_processors(cfg, torch.tensor(pad))(torch.tensor(history), torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6, atol=0)
    if cfg.top_k > v:
        assert kept.all()
    elif cfg.top_p < 1e-6:
        assert (kept.sum(axis=1) == 1).all() and (ours.argmax(axis=1) == logits.argmax(axis=1)).all()
    elif cfg.do_sample and (cfg.top_k or cfg.top_p < 1):
        assert kept.sum(axis=1).min() > 0 and kept.sum(axis=1).max() < v  # the masks are not trivial
    if cfg.repetition_penalty != 1:
        assert (ours[seen & kept] != logits[seen & kept] / (cfg.temperature if cfg.do_sample else 1)).all()


# ------------------------------------------------------------------------------------------------------------
# SmolLM2-135M (real weights, packaged GGUF).


@pytest.fixture(scope="module")
def smollm():
    """(transformers LlamaForCausalLM, our CausalLM, tokenizer), both models from ONE read of the GGUF file.

    `read_gguf` equals transformers' own GGUF loader tensor for tensor (tests/models/test_gguf.py); reading
    the file once instead of also through `from_pretrained(..., gguf_file=...)` saves ~15 s of CPU.
    """
    config, tensors = read_gguf(packaged_model_path("smollm2-135m"))
    reference = LlamaForCausalLM.from_pretrained(
        None,
        config=LlamaConfig(**config),
        state_dict={name: torch.from_numpy(t) for name, t in tensors.items()},
        dtype=torch.float32,
    )
    assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()  # tied
    return reference.eval(), model_from_hf(config, tensors), load_tokenizer("smollm2-135m")


def test_greedy_matches_transformers_smollm2(smollm):
    reference, model, tokenizer = smollm
    texts = ["The capital of France is", "Once upon a time, a small robot", "Rain again today, so I"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 3
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, max(len(p) for p in prompts), pad)
    cfg = GenerationConfig(max_new_tokens=12, repetition_penalty=1.2)
    expected = reference_generate(reference, ids, mask, cfg, eos=eos, pad=pad)
    ours = generate_ids(model, ids, mask, cfg, eos_token_ids=[eos], pad_token_id=pad)
    np.testing.assert_array_equal(ours, expected)


# ------------------------------------------------------------------------------------------------------------
# Sharded decoding.


def test_sharded_equals_unsharded(tiny, tiny_dir, tiny_case, tmp_path, programs):
    """8 CPU devices, mesh data=2 x fsdp=2 x tensor=2 (rows over data+fsdp, padded from 7 to 8; heads and
    vocabulary over tensor): greedy tokens equal transformers' (= unsharded, above) and sampled tokens equal
    the unsharded model's."""
    _, model = tiny
    _, ids, mask, eos, greedy = tiny_case
    sampled = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=40, top_p=0.9)
    unsharded = generate_ids(model, ids, mask, sampled, eos_token_ids=[eos], pad_token_id=PAD)
    np.savez(tmp_path / "case.npz", ids=ids, mask=mask)
    result = programs.run(
        "models_generate_sharded.py",
        tiny_dir,
        tmp_path / "case.npz",
        "--eos",
        eos,
        "--pad",
        PAD,
        "--sampled",
        json.dumps(dataclasses.asdict(sampled)),
        devices=8,
    ).result
    assert result["q_proj_devices"] == 8
    for name, expected in (("greedy", greedy), ("sampled", unsharded)):
        np.testing.assert_array_equal(np.asarray(result[name]), expected, err_msg=name)


@pytest.mark.parametrize(
    ("logits", "cfg"),
    [
        (
            [[0.0, 2.0, 2.0, 1.0]],
            GenerationConfig(do_sample=True, top_k=1, top_p=1.0, repetition_penalty=1.0),
        ),
        # Softmax 0.25 each: ascending cumulative [0.25, 0.5, 0.75, 1], exactly 1 - top_p at the first.
        (
            [[0.0, 0.0, 0.0, 0.0]],
            GenerationConfig(do_sample=True, top_k=0, top_p=0.75, repetition_penalty=1.0),
        ),
    ],
    ids=["top_k_keeps_ties_with_the_kth", "top_p_removes_a_cumulative_equal_to_the_cut"],
)
def test_the_filters_boundaries_match_transformers(logits, cfg):
    """Values at a filter's edge, which random logits never reach: the k-th largest value's ties stay (both
    2s for k = 1), and a token whose cumulative probability equals 1 - top_p goes (3 of 4 stay)."""
    logits = np.asarray(logits, np.float32)
    seen = np.zeros(logits.shape, bool)
    ours = np.asarray(process_logits(logits, seen, ProcessorSettings.of(cfg)))
    history = torch.zeros((1, 1), dtype=torch.long)
    theirs = reference_processors(cfg, torch.tensor([0]))(history, torch.tensor(logits)).numpy()
    # How many stay, not which of equal values: which tie torch's sort puts first is its own detail.
    kept = (~np.isneginf(ours)).sum()
    assert kept == (~np.isneginf(theirs)).sum() == (2 if cfg.top_k else 3)
    np.testing.assert_array_equal(np.sort(ours[~np.isneginf(ours)]), np.sort(theirs[~np.isneginf(theirs)]))


def test_every_end_token_id_stops_a_row_as_in_transformers(tiny, tiny_case):
    """Several EOS ids (a model's own config may list more than one): a row stops at whichever comes first,
    against transformers' generate with the same list; the second id stops another row here."""
    reference, model = tiny
    _, ids, mask, eos, expected = tiny_case
    row, step = 1, 4
    other = int(expected[row, step])
    assert other != eos and other not in expected[row, :step]
    want = reference_generate(reference, ids, mask, GREEDY, eos=[other, eos], pad=PAD)
    assert want[row, step] == other and (want[row, step + 1 :] == PAD).all()  # stopped by the first id
    assert eos in want[0] and (want[0, want[0].tolist().index(eos) + 1 :] == PAD).all()  # by the second
    ours = generate_ids(model, ids, mask, GREEDY, eos_token_ids=[other, eos], pad_token_id=PAD)
    np.testing.assert_array_equal(ours, want)
