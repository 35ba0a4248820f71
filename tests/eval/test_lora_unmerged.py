"""A LoRA run's loaded model (`restore_model` / `initial_model`) is its base carrying the adapters, applied
apart as training applies them (x·W + (alpha / r)·(x·A)·B) in every forward that evaluation, effect reports
and decoding use. In a bfloat16 compute dtype, evaluate's loss pass equals training's in-loop evaluation and
`prefill` / `__call__` the training forward, where the adapters merged into the kernels (rounded to bfloat16
where read) lose part of a small update. Greedy generation and `extend` over the KV cache equal step-by-step
recomputation (float32); in float32 the merged model `export --merged` writes agrees with it.

Each run starts from `model.lora.init_from` adapters with a known small B (its step 0): nothing is trained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.config import load_config
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.eval.evaluate import split_losses
from nextquill_jax.models import CausalLM, load_pretrained, lora, model_preset, save_pretrained
from nextquill_jax.models.generate import GenerationConfig, generate
from nextquill_jax.models.peft import write_peft_adapter
from nextquill_jax.train import adapters, loop, model_setup, setup
from nextquill_jax.train.workdir import restore_model, single_device_mesh
from tests.shared import TINY_EOS_ID

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

TARGETS = ["attn/(q|k|v|o)_proj", "mlp/(gate|up|down)"]
RANK, ALPHA = 4, 8.0
TINY_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, bos_token_id=TINY_EOS_ID, eos_token_ids=(TINY_EOS_ID,), compute_dtype="float32",
)  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_config, write_config, write_random_data):
    """`lora_run(compute_dtype, b_scale)`: the workdir of a LoRA run (base stored in bfloat16) starting from
    init_from adapters whose B is ~`b_scale`, and those adapters' weights."""
    root = tmp_path_factory.mktemp("lora_unmerged")
    hf_dir = root / "base"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **TINY_BASE), rngs=nnx.Rngs(5)), hf_dir)
    ours = load_pretrained(hf_dir, compute_dtype="float32")
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    shapes = lora.adapter_shapes(params, lora.target_paths(params, TARGETS), RANK, jnp.float32)
    data = write_random_data(root / "data", train=8, val=8)

    made = {}

    def make(compute_dtype: str, b_scale: float):
        name = f"{compute_dtype}_{b_scale}"
        if name in made:
            return made[name]
        leaves, tree = jax.tree.flatten(shapes)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        draw = lambda k, s: (0.1 if s.shape[-1] == RANK else b_scale) * jax.random.normal(k, s.shape)  # a, b
        weights = jax.tree.unflatten(tree, [draw(k, s) for k, s in zip(keys, leaves, strict=True)])
        write_peft_adapter(weights, ours.cfg, root / f"adapter_{name}", rank=RANK, alpha=ALPHA)
        workdir = root / f"run_{name}"
        raw = tiny_config(data, workdir)
        lora_cfg = {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "base_dtype": "bfloat16"}
        raw["model"] = {"path": str(hf_dir), "compute_dtype": compute_dtype, "lora": lora_cfg}
        raw["model"]["lora"]["init_from"] = str(root / f"adapter_{name}")
        workdir.mkdir()
        write_config(raw, workdir / "config.yaml")  # a run's directory before its first checkpoint: step 0
        made[name] = workdir, weights
        return made[name]

    return make


def base_and_adapters(workdir, weights):
    """The run's base as training holds it (loaded apart from `restore_model`) and its adapters."""
    cfg = load_config(workdir / "config.yaml")
    section = adapters.base_section(cfg.model)
    graphdef, base = model_setup.load_params(section, single_device_mesh(), cfg.train.seed)
    return nnx.merge(graphdef, adapters.frozen_base(base, cfg.model.lora)), lora.Adapters(
        weights, ALPHA / RANK
    )


def merged_by_hand(workdir, weights) -> CausalLM:
    """The run's model as `restore_model` gave it before: the adapters merged into the kernels in float32
    (`lora.merge`), read in the compute dtype."""
    cfg = load_config(workdir / "config.yaml")
    base, _ = base_and_adapters(workdir, weights)
    params = lora.merge(nnx.to_pure_dict(nnx.state(base, nnx.Param)), weights, ALPHA / RANK)
    mcfg = base.cfg.replace(param_dtype=lora.MERGED_DTYPE)
    assert mcfg.compute_dtype == cfg.model.compute_dtype
    return nnx.merge(model_setup.abstract_model(mcfg)[0], params)


def test_evaluate_loss_equals_training_in_loop_evaluation_in_bfloat16(lora_run, tmp_path):
    """evaluate's loss pass (`split_losses`) on the loaded model is training's in-loop evaluation (the base
    and the adapters apart, `loop.evaluate_split`); the model with the adapters merged gives another loss."""
    workdir, weights = lora_run("bfloat16", 2e-3)
    cfg = load_config(workdir / "config.yaml")
    run = setup.set_up_run(cfg, tmp_path / "in_loop", echo=lambda _: None)
    in_loop = loop.evaluate_split(run, run.initial_params(), None)[loop.EVAL_PREFIX + "loss"]

    loaded = restore_model(workdir, 0, run.mesh)
    split = PreparedSplit(cfg.train.data_dir, cfg.eval.split)
    merged = dataclasses.replace(loaded, model=merged_by_hand(workdir, weights))
    with jax.set_mesh(run.mesh):  # as `evaluate` runs it
        evaluated = split_losses(loaded, split, len(split))["loss"]
        merged_loss = split_losses(merged, split, len(split))["loss"]
    tolerance = 4 * np.spacing(np.float32(in_loop))  # a few float32 roundings of the mean
    assert abs(merged_loss - in_loop) > 10 * tolerance  # merged, the kernels lose part of the update
    assert abs(evaluated - in_loop) <= tolerance


def test_prefill_and_call_apply_the_adapters_as_training_does_in_bfloat16(lora_run):
    """`prefill` (which generation starts with) and `__call__` (the effect report's and effects' forward
    reads `hidden_states` alike) of the loaded model compute the training forward with the adapters apart;
    the merged model's logits differ."""
    workdir, weights = lora_run("bfloat16", 2e-3)
    model = restore_model(workdir, 0, single_device_mesh()).model
    base, adapted = base_and_adapters(workdir, weights)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 12)), jnp.int32)
    want = np.asarray(base.logits(base.hidden_states(ids, adapters=adapted)))  # [2, 12, V]
    prefilled = lambda m: np.asarray(m.prefill(ids, m.init_cache(2, 16))[0])
    np.testing.assert_array_equal(np.asarray(model(ids)), want)
    np.testing.assert_array_equal(prefilled(model), want)
    assert np.abs(prefilled(merged_by_hand(workdir, weights)) - want).max() > 1e-4
    assert nnx.state(model, lora.LoraWeight)  # the adapters travel with the model, apart from its Params


def test_greedy_generation_and_extend_equal_step_by_step_recomputation_with_the_adapters(lora_run):
    """float32, so ids are exact: greedy `generate` (prefill, then `extend` over the KV cache) of the loaded
    model equals argmax decoding by full recomputation of `hidden_states(..., adapters=...)`."""
    workdir, weights = lora_run("float32", 0.05)
    loaded = restore_model(workdir, 0, single_device_mesh())
    base, adapted = base_and_adapters(workdir, weights)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 128, n).tolist() for n in (5, 9, 3)]
    n_new = 8
    got = generate(
        loaded.model,
        prompts,
        GenerationConfig(max_new_tokens=n_new, repetition_penalty=1.0),
        eos_token_ids=[TINY_EOS_ID],
        pad_token_id=0,
        batch_size=2,
    )

    def recomputed(with_adapters: lora.Adapters | None) -> list[list[int]]:
        width = max(map(len, prompts)) + n_new

        @jax.jit
        def next_logits(ids: jax.Array, last: jax.Array) -> jax.Array:
            # ids [1, width] right-padded: attention is causal, so the padding changes no logit up to `last`,
            # and one compilation serves every length.
            return base.logits(base.hidden_states(ids, adapters=with_adapters)[0, last])

        out = []
        for prompt in prompts:
            seq, new = list(prompt), []
            for _ in range(n_new):
                padded = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
                token = int(jnp.argmax(next_logits(padded, len(seq) - 1)))
                if token == TINY_EOS_ID:
                    break
                seq.append(token)
                new.append(token)
            out.append(new)
        return out

    want = recomputed(adapted)
    assert got == want
    assert want != recomputed(None)  # the adapters change what is generated

    ids = jnp.asarray(rng.integers(1, 128, (2, 10)), jnp.int32)  # extend's logits, token by token
    model = loaded.model
    logits, cache = model.prefill(ids[:, :6], model.init_cache(2, 10))
    steps = [logits]
    for t in range(6, 10):
        logits, cache = model.extend(ids[:, t : t + 1], cache)
        steps.append(logits)
    decoded = np.asarray(jnp.concatenate(steps, axis=1))
    full = np.asarray(base.logits(base.hidden_states(ids, adapters=adapted)))
    tolerance = 1e-5 * np.abs(full).max()
    assert np.abs(full - np.asarray(base(ids))).max() > 100 * tolerance  # the adapters matter here
    np.testing.assert_allclose(decoded, full, rtol=0, atol=tolerance)


def test_in_float32_the_exported_merged_model_agrees_with_the_adapters_apart(lora_run):
    """The loaded model's parameters are the base's; `merged_model` (what `export --merged` writes) folds
    the adapters into float32 kernels and computes the same logits to float32 rounding."""
    from nextquill_jax.train.workdir import merged_model

    workdir, weights = lora_run("float32", 2e-3)
    loaded = restore_model(workdir, 0, single_device_mesh())
    base, _ = base_and_adapters(workdir, weights)
    ours, theirs = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (loaded.model, base))
    for got, want in zip(ours, theirs, strict=True):  # the base's own parameters, in the base's dtype
        assert got.dtype == want.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, want)
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 128, (2, 11)), jnp.int32)
    apart = np.asarray(loaded.model(ids))
    with pytest.raises(ValueError, match="the model carries LoRA adapters"):
        save_pretrained(loaded.model, workdir / "hf")  # it would write the base alone
    merged = merged_model(loaded.model)
    assert not nnx.state(merged, lora.LoraWeight)
    assert merged.layers.attn.q_proj[...].dtype == jnp.float32
    tolerance = 1e-5 * np.abs(apart).max()
    assert np.abs(apart - np.asarray(base(ids))).max() > 100 * tolerance  # the update matters here
    np.testing.assert_allclose(np.asarray(merged(ids)), apart, rtol=0, atol=tolerance)


def test_a_graphdef_covering_more_examples_per_row_keeps_the_adapters(lora_run):
    """`covering_graphdef` (a split packing more examples per row than cuDNN's bound M) rebuilds the graph
    with the adapters the model carries, so its state still merges into it."""
    workdir, weights = lora_run("float32", 2e-3)
    model = restore_model(workdir, 0, single_device_mesh()).model
    bounded = nnx.merge(
        model_setup.abstract_model(model.cfg.replace(attention_impl="cudnn", cudnn_max_segments=2))[0],
        nnx.state(model, nnx.Param),
    )
    bounded.attach_adapters(model.attached_adapters().weights, ALPHA / RANK)
    covering = nnx.merge(model_setup.covering_graphdef(bounded, 5), nnx.state(bounded))
    assert covering.cfg.cudnn_max_segments == 5
    for got, want in zip(
        jax.tree.leaves(covering.attached_adapters()), jax.tree.leaves(weights), strict=True
    ):
        np.testing.assert_array_equal(got, want)
