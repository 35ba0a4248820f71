"""LoRA training (`model.lora`): the step's gradients against autodiff through the merged kernels, no weight
gradient for the frozen base, micro-batching, the state and checkpoints holding adapters only, exact resume,
8 devices against 1, the base as the fixed-DCE reference, export, init_from, and the errors.

Runs in subprocesses (tiny random qwen2 model and data, 12 steps, shared compilation cache):
  A  1 device, uninterrupted;  B  as A, SIGTERM after step 5;  C  resumes B.
  G  1 process of 8 devices, mesh (data=2, fsdp=2, tensor=2), 2 micro-batches. Two processes of 4 devices
     (gloo) cost 3.5x the CPU (64 against 18 CPU-s, 2-core VM, 2026-12-02) and check nothing more about the
     adapters: what is particular to several processes (global arrays made on each, the checkpoint written
     by all) is shared with full fine-tuning, which tests/train/test_runs.py runs as 2 processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.bench.harness import synthetic_batch
from nextquill_jax.config import LoraConfig, ModelRunConfig, load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.loss import LossConfig, loss_from_aux
from nextquill_jax.models import CausalLM, lora, model_preset
from nextquill_jax.models.peft import read_peft_adapter
from nextquill_jax.models.quantize import Int8Weight, NF4Weight, dequantize, quantize_base
from nextquill_jax.parallel import DEFAULT_RULES, logical_to_mesh_spec, make_mesh
from nextquill_jax.train import adapters, loop, model_setup, reference_model, setup
from nextquill_jax.train.export import export_adapter
from nextquill_jax.train.step import StepSettings, batch_loss, make_train_step
from nextquill_jax.train.workdir import restore_model, restore_params
from tests.shared import TINY_EOS_ID, TINY_QWEN

pytestmark = pytest.mark.slow  # run first: see tests/conftest.py

STEPS = 12
MESH8 = {"data": 2, "fsdp": 2, "tensor": 2}
LORA = {"rank": 4, "alpha": 8.0, "targets": ["attn/(q|v|o)_proj", "mlp/down"]}
TINY = dict(**TINY_QWEN, eos_token_ids=(TINY_EOS_ID,), compute_dtype="float32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_runs):
    root = tmp_path_factory.mktemp("lora_runs")
    r = train_runs(root, STEPS)
    out = {"root": root}
    # One after another: B starts once A has filled the cache with the programs it shares (started together,
    # both compiled them), C once B has stopped.
    out["A"] = r.finish(r.start(r.config("A", lora=LORA), 1))
    out["B"] = r.finish(r.start(r.config("B", lora=LORA), 1, "--fault", "sigterm", "--fault-step", "5"))
    out["C"] = r.finish(r.start(str(root / "B.yaml"), 1))
    g_cfg = r.config("G", lora=LORA, mesh=MESH8, train={"micro_batches": 2})  # A's 8 rows per batch
    out["G"] = r.finish(r.start(g_cfg, 8))
    return out


def test_the_state_and_checkpoints_hold_adapters_only_and_resume_is_exact(runs, run_losses, read_state):
    root = runs["root"]
    full = read_state(root / "A" / "checkpoints" / str(STEPS))
    resumed = read_state(root / "B" / "checkpoints" / str(STEPS))  # C resumed B in its workdir
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(full["params"])[0]}
    assert names == {
        f"['layers']['{m}']['{k}']['{ab}']"
        for m, k in (("attn", "q_proj"), ("attn", "v_proj"), ("attn", "o_proj"), ("mlp", "down"))
        for ab in "ab"
    }
    assert "resuming from" in runs["C"].stdout
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(x, y)
    first, last = run_losses(root / "A")[1], run_losses(root / "A")[STEPS]
    assert last < first - 0.02, (first, last)  # the adapters learn


def test_eight_devices_match_one_device_and_shard_like_their_kernels(runs, run_losses):
    root = runs["root"]
    one, got = run_losses(root / "A"), run_losses(root / "G")
    assert sorted(got) == sorted(one)
    for step in one:
        assert abs(got[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], got[step])
    specs = runs["G"].result["params"]
    model_cfg = model_setup.model_config(load_config(root / "G.yaml").model)
    model = nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0)))
    checked = 0
    for (module, name), n_in in lora.INPUT_AXES.items():
        key = f"['layers']['{module}']['{name}']"
        if f"{key}['a']" not in specs:
            continue
        checked += 1
        axes = tuple(nnx.get_partition_spec(nnx.state(model, nnx.Param))["layers"][module][name].get_value())
        want_a = logical_to_mesh_spec((*axes[: 1 + n_in], None), DEFAULT_RULES)
        want_b = logical_to_mesh_spec((axes[0], None, *axes[1 + n_in :]), DEFAULT_RULES)
        assert specs[f"{key}['a']"].replace(" ", "") == str(want_a).replace(" ", "")
        assert specs[f"{key}['b']"].replace(" ", "") == str(want_b).replace(" ", "")
    assert checked == 4  # LORA's targets: q, v, o and down


def test_a_resume_with_lora_removed_is_an_error_naming_the_key(runs, tmp_path):
    workdir = tmp_path / "A"
    shutil.copytree(runs["root"] / "A", workdir)
    cfg = load_config(runs["root"] / "A.yaml", [f"train.workdir={workdir}", f"train.max_steps={STEPS + 1}"])
    full = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
    with pytest.raises(
        ConfigError,
        match=r"another config.*: model\.lora: <absent> -> null; model\.lora\.alpha: 8\.0 -> <absent>",
    ):
        loop.train(full, workdir, echo=lambda _: None)


def test_a_resume_that_changes_a_preset_base_names_the_changed_key(runs, tmp_path):
    """A random preset base is made from train.seed and model.overrides: changing either makes another base,
    which the config check names (the base check ran first and named the same preset twice, with the fix
    'point model.path at that base again' for a run without one). On a copy of run A's workdir."""
    workdir = tmp_path / "A"
    shutil.copytree(runs["root"] / "A", workdir)
    saved = load_config(workdir / "config.yaml")
    seed, width = saved.train.seed, saved.model.overrides["intermediate_size"]
    for change, listed in (
        (f"train.seed={seed + 1}", f"train.seed: {seed} -> {seed + 1}"),
        (
            f"model.overrides.intermediate_size={width + 32}",
            f"model.overrides.intermediate_size: {width} -> {width + 32}",
        ),
    ):
        with pytest.raises(
            ConfigError, match=rf"value first: {re.escape(listed)}\. A resume may change only"
        ):
            loop.train(load_config(workdir / "config.yaml", [change]), workdir, echo=lambda _: None)


def test_a_lora_workdir_restores_as_its_base_carrying_the_adapters(runs):
    workdir = runs["root"] / "A"
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    loaded = restore_model(workdir, mesh=mesh)
    restored = restore_params(workdir, mesh=mesh)
    cfg = restored.config
    graphdef, base = model_setup.load_params(adapters.base_section(cfg.model), mesh, cfg.train.seed)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 12)))
    with_adapters = nnx.merge(graphdef, base).hidden_states(
        ids, adapters=lora.Adapters(restored.params, cfg.model.lora.scale)
    )
    np.testing.assert_allclose(loaded.model.hidden_states(ids), with_adapters, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))),
        jax.tree.leaves(base),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)  # the base itself: the adapters are carried apart
    # The run as another run's fixed-DCE reference model: the same model, its adapters carried along.
    overrides = ["loss.variant=dce", "loss.dce=fixed", f"loss.reference_model={workdir}"]
    loaded = reference_model.load_reference(load_config(workdir / "config.yaml", overrides), mesh)
    reference = nnx.merge(loaded.graphdef, loaded.params)
    assert reference.attached_adapters() is not None
    np.testing.assert_allclose(reference.hidden_states(ids), with_adapters, rtol=1e-5, atol=1e-5)


def test_restore_model_computes_in_a_chosen_dtype_from_the_same_parameters(runs):
    """`compute_dtype` replaces the run's (float32 here) in the model and in the config it returns, for a
    checkpoint and for step 0; the base and the adapters are the checkpoint's, so the bfloat16 logits are the
    float32 ones within bfloat16's rounding (and not equal to them: the dtype took effect). A dtype that is
    neither is refused before anything is read."""
    workdir = runs["root"] / "A"
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 12)))
    for step in (None, 0):
        own, chosen = (restore_model(workdir, step, mesh, compute_dtype=d) for d in (None, "bfloat16"))
        assert (own.model.cfg.compute_dtype, chosen.model.cfg.compute_dtype) == ("float32", "bfloat16")
        assert chosen.config.model.compute_dtype == "bfloat16" and chosen.step == own.step
        for model_state in (lambda m: nnx.state(m, nnx.Param), lambda m: m.attached_adapters()):
            jax.tree.map(np.testing.assert_array_equal, model_state(chosen.model), model_state(own.model))
        exact, rounded = np.asarray(own.model(ids)), np.asarray(chosen.model(ids), np.float32)
        # Within bfloat16's rounding (measured ~4e-3 of the logits' norm), and not the float32 values.
        assert 0 < np.linalg.norm(rounded - exact) / np.linalg.norm(exact) < 2e-2
    with pytest.raises(ValueError, match=r"^compute_dtype must be one of \['float32', 'bfloat16'\]"):
        restore_model(runs["root"] / "no_such_run", compute_dtype="float16")


def test_a_run_started_from_init_from_adapters_resumes_after_that_directory_moved(runs, tmp_path):
    """A resume restores its adapters from its checkpoint and reads no init_from file: a run started from
    A's exported adapters, then stopped (its last step's checkpoint removed), resumes once those adapters
    moved away; set-up refused it ("does not exist"), and the config it must keep could not name the new
    place. A fresh run from the moved path is still refused before its workdir is created."""
    adapter_dir, workdir = tmp_path / "peft", tmp_path / "run"
    export_adapter(runs["root"] / "A", adapter_dir)
    cfg = load_config(runs["root"] / "A.yaml")
    lora_cfg = dataclasses.replace(cfg.model.lora, init_from=str(adapter_dir))
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, lora=lora_cfg),
        train=dataclasses.replace(cfg.train, max_steps=2),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1, keep=2),
    )
    assert loop.train(cfg, workdir, echo=lambda _: None).status == "finished"
    shutil.rmtree(workdir / "checkpoints" / "2")
    adapter_dir.rename(tmp_path / "moved")
    said = []
    result = loop.train(cfg, workdir, echo=said.append)
    assert result.status == "finished" and result.step == 2
    assert any("resuming from" in line for line in said)
    with pytest.raises(ConfigError, match=f"model.lora.init_from {str(adapter_dir)!r}"):
        loop.train(cfg, tmp_path / "fresh", echo=lambda _: None)
    assert not (tmp_path / "fresh").exists()


def test_export_adapter_and_init_from_round_trip(runs, tmp_path):
    workdir = runs["root"] / "A"
    out = tmp_path / "peft"
    export_adapter(workdir, out)
    # A random preset base (qwen2.5-0.5b's architecture at test size): no name loads it, so none is given.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    saved = restore_params(workdir).params
    cfg = load_config(runs["root"] / "A.yaml")
    model_cfg = model_setup.model_config(adapters.base_section(cfg.model))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
    read = read_peft_adapter(out, model_cfg, shapes, rank=LORA["rank"], alpha=LORA["alpha"])
    lora_cfg = dataclasses.replace(cfg.model.lora, init_from=str(out))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    abstract, shardings = adapters.adapter_layout(lora_cfg, model_cfg, mesh)
    started = adapters.initial_adapters(lora_cfg, model_cfg, abstract, shardings, seed=0)
    for x, y, z in zip(jax.tree.leaves(saved), jax.tree.leaves(read), jax.tree.leaves(started), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    assert adapters.init_from_note(dataclasses.replace(cfg.model, lora=lora_cfg)) is None  # no base named
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "/models/other"})
    )
    assert adapters.init_from_note(dataclasses.replace(cfg.model, lora=lora_cfg)) == (
        f"note: model.lora.init_from {str(out)!r} holds adapters made for the base '/models/other' (its "
        "adapter_config.json's base_model_name_or_path); this run's base is a random model.preset "
        "'qwen2.5-0.5b'"
    )
    with pytest.raises(ConfigError, match=r"r=4, lora_alpha=8\.0; the config asks for rank=8"):
        adapters.initial_adapters(
            dataclasses.replace(lora_cfg, rank=8), model_cfg, *adapters.adapter_layout(
                dataclasses.replace(lora_cfg, rank=8), model_cfg, mesh
            ), seed=0,
        )  # fmt: skip


def test_fresh_adapters_are_drawn_from_the_runs_seed(runs):
    """`train.seed` draws a fresh run's A (B = 0): two seeds give two starts."""
    cfg = load_config(runs["root"] / "A.yaml")
    assert cfg.model.lora.init_from is None
    model_cfg = model_setup.model_config(adapters.base_section(cfg.model))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    abstract, shardings = adapters.adapter_layout(cfg.model.lora, model_cfg, mesh)
    start = lambda seed: jax.tree.leaves(
        adapters.initial_adapters(cfg.model.lora, model_cfg, abstract, shardings, seed=seed)
    )
    a0, a1 = start(0)[0], start(1)[0]  # the first kernel's A
    assert np.any(np.asarray(a0)) and not np.array_equal(np.asarray(a0), np.asarray(a1))
    np.testing.assert_array_equal(np.asarray(start(1)[0]), np.asarray(a1))


def test_a_lora_checkpoint_on_an_nf4_base_restores_its_float32_adapters_unrounded(
    tmp_path, write_random_data, tiny_config, read_state
):
    """The adapters train in `model.param_dtype` (float32) whatever the base is stored as; a restore laid
    out as the base (bfloat16 beside nf4) rounds them as it reads, so evaluate, effects and export would
    read other adapters than the run trained. `restore_params` gives the checkpoint's arrays bit for bit."""
    data = write_random_data(tmp_path / "data", train=16, val=0)
    raw = tiny_config(data, tmp_path / "run", optim={"warmup_steps": 0}, train={"max_steps": 1})
    raw["model"]["lora"] = {"rank": 4, "targets": ["attn/q_proj", "mlp/down"], "base_dtype": "nf4"}
    cfg = load_config(None, base=raw)
    assert loop.train(cfg, tmp_path / "run", echo=lambda _: None).status == "finished"
    saved = jax.tree.leaves(read_state(tmp_path / "run" / "checkpoints" / "1")["params"])
    restored = jax.tree.leaves(restore_params(tmp_path / "run").params)
    assert len(saved) == len(restored) == 4  # A and B of two kernels
    for want, got in zip(saved, restored, strict=True):
        assert np.asarray(got).dtype == want.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got), want)
    rounded = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    assert all(np.any(rounded(x) != x) for x in saved)  # every one would change, B trained too
    # The base beside them is held in bfloat16 outside its nf4 kernels (half float32's memory), as documented.
    base = nnx.to_pure_dict(nnx.state(restore_model(tmp_path / "run").model, nnx.Param))
    assert base["embed"].dtype == base["layers"]["input_norm"]["scale"].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------------------
# The step, in this process.


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, base params, adapters with B != 0, a packed batch) of a tiny model."""
    cfg = model_preset("qwen2.5-0.5b", **TINY)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    base = nnx.to_pure_dict(state)
    shapes = lora.adapter_shapes(base, lora.target_paths(base, LORA["targets"]), 4, jnp.float32)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    weights = jax.tree.unflatten(
        tree, [0.1 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)]
    )
    batch, _ = synthetic_batch(
        4, 64, 2, context_tokens=8, entry_tokens=10, target_tokens=8, vocab=128, length_multiple=8
    )
    return graphdef, base, weights, jax.tree.map(jnp.asarray, batch)


SETTINGS = StepSettings(loss=LossConfig(variant="nextquill"), token_chunk=64, vocab_chunk=64, lora_scale=2.0)


@pytest.fixture(scope="module")
def adapter_gradients(tiny):
    """`adapter_gradients(remat)`: (gradient, aux) of the tiny batch's loss for the adapters, under the
    model's `remat` policy; computed once per policy (the gradient test and the micro-batch test share
    "none"). Compiled: op by op, the scans over layers and loss tiles dispatch for tens of seconds."""
    _, base, weights, batch = tiny
    done = {}

    def get(remat: str):
        if remat not in done:
            graphdef = _graphdef(remat)
            loss = lambda w: batch_loss(w, graphdef, batch, SETTINGS, base=base)
            done[remat] = jax.jit(jax.grad(loss, has_aux=True))(weights)
        return done[remat]

    return get


def _graphdef(remat: str):
    model_cfg = model_preset("qwen2.5-0.5b", **TINY, remat_policy=remat)
    return nnx.split(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]


@pytest.fixture(scope="module")
def merged_gradient(tiny):
    """Autodiff of the loss through the merged kernels base + scale B A, for the adapters: the reference.
    Without remat: a remat policy changes what the backward pass recomputes, not the gradient."""
    _, base, weights, batch = tiny
    full, graphdef = dataclasses.replace(SETTINGS, lora_scale=None), _graphdef("none")
    loss = lambda w: batch_loss(lora.merge(base, w, 2.0), graphdef, batch, full)[0]
    return jax.jit(jax.grad(loss))(weights)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_adapter_gradients_equal_autodiff_through_the_merged_kernels(
    adapter_gradients, merged_gradient, remat
):
    ours, _ = adapter_gradients(remat)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(merged_gradient), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * float(jnp.abs(y).max()))


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in `jaxpr` and the jaxprs inside it (scan, remat, custom_vjp)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _dot_output_shapes(inner)
    return shapes


def test_the_frozen_base_gets_no_weight_gradient(tiny):
    graphdef, base, weights, batch = tiny
    kernels = [base["layers"][module][name] for module, name in lora.INPUT_AXES]
    kernel_shapes = {tuple(x.shape[1:]) for x in kernels}  # one layer's kernel: a weight gradient's shape
    lora_grad = jax.make_jaxpr(jax.grad(lambda w: batch_loss(w, graphdef, batch, SETTINGS, base=base)[0]))(
        weights
    )
    full = dataclasses.replace(SETTINGS, lora_scale=None)
    full_grad = jax.make_jaxpr(jax.grad(lambda p: batch_loss(p, graphdef, batch, full)[0]))(base)
    assert kernel_shapes & set(_dot_output_shapes(full_grad.jaxpr))  # the check sees weight gradients
    assert kernel_shapes & set(_dot_output_shapes(lora_grad.jaxpr)) == set()


def test_four_micro_batches_give_the_one_batch_lora_update(tiny, adapter_gradients):
    """With plain SGD(1) the update is minus the gradient itself (Adam would amplify float noise where it
    is ~0). The one-batch update is the step's without micro-batches, value_and_grad of batch_loss on the
    whole batch: the gradient test computes that gradient already, so only the 4-micro-batch step compiles."""
    import optax

    graphdef, base, weights, batch = tiny
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    tx = optax.sgd(1.0)
    settings = dataclasses.replace(SETTINGS, micro_batches=4)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(1.0), settings, mesh))
    with jax.set_mesh(mesh):
        state, metrics = step(setup.new_state(weights, tx, 0), batch, None, base)
    update = jax.tree.map(lambda new, old: new - old, state.params, weights)
    gradient, aux = adapter_gradients("none")
    assert float(loss_from_aux(aux, SETTINGS.loss)) == pytest.approx(float(metrics["loss"]), rel=1e-6)
    # new - old loses the float32 rounding of the parameters themselves: atol is 1e-6 of their scale.
    for g, x, w in zip(
        jax.tree.leaves(gradient), jax.tree.leaves(update), jax.tree.leaves(weights), strict=True
    ):
        np.testing.assert_allclose(-g, x, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


def test_the_base_reference_equals_a_separately_loaded_frozen_base(
    tmp_path, write_random_data, tiny_config, run_losses
):
    from nextquill_jax.models import save_pretrained

    hf_dir = tmp_path / "base"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **TINY), rngs=nnx.Rngs(5)), hf_dir)
    # No val split, so no evaluation: compiling its step cost a quarter of the test, and nothing here reads
    # it. Two steps: the second runs on adapters the first updated against the reference.
    data = write_random_data(tmp_path / "data", val=0)
    results = {}
    for reference in ("base", str(hf_dir)):
        name = "own" if reference == "base" else "separate"
        raw = tiny_config(data, tmp_path / name, loss={"dce": "fixed", "reference_model": reference})
        raw["model"] = {"path": str(hf_dir), "compute_dtype": "float32", "lora": dict(LORA)}
        raw["train"]["max_steps"] = 2
        raw["checkpoint"]["async_save"] = False
        cfg = load_config(None, base=raw)
        result = loop.train(cfg, tmp_path / name, echo=lambda _: None)
        results[name] = (run_losses(tmp_path / name), jax.device_get(result.state.params))
    assert sorted(results["own"][0]) == [1, 2] and results["own"][0] == results["separate"][0]
    for x, y in zip(jax.tree.leaves(results["own"][1]), jax.tree.leaves(results["separate"][1]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_run_saved_before_the_content_fingerprint_resumes_with_a_note_and_a_merged_base_is_refused(
    tmp_path, monkeypatch, write_random_data, tiny_config
):
    from safetensors.numpy import load_file, save_file

    from nextquill_jax.models import save_pretrained

    base, workdir = tmp_path / "base", tmp_path / "w"
    save_pretrained(CausalLM(model_preset("qwen2.5-0.5b", **TINY), rngs=nnx.Rngs(5)), base)
    raw = tiny_config(write_random_data(tmp_path / "data", val=0), workdir)  # no evaluation to compile
    raw["model"] = {"path": str(base), "compute_dtype": "float32", "lora": dict(LORA)}
    raw["checkpoint"]["async_save"] = False
    raw["train"]["max_steps"] = 2
    cfg = load_config(None, base=raw)
    earlier = lambda model, seed: {
        "source": model.path,
        "fingerprint": adapters.legacy_fingerprint(model, seed),
    }
    schedule = loop.actions_at
    with monkeypatch.context() as patch:  # step 1 saved as earlier versions saved it (no "scheme"), then stop
        patch.setattr(adapters, "base_identity", earlier)
        patch.setattr(loop, "actions_at", lambda *a, stop: schedule(*a, stop=stop or a[0] == 1))
        assert loop.train(cfg, workdir, echo=lambda _: None).status == "preempted"
    notes = []
    assert loop.train(cfg, workdir, echo=notes.append).last_checkpoint == 2
    assert any("recorded its base with the fingerprint of earlier versions" in note for note in notes)
    # The reported case: the base overwritten in place by an export of the same shapes, v projections merged.
    weights = load_file(base / "model.safetensors")
    for name in [name for name in weights if name.endswith("v_proj.weight")]:
        weights[name] = weights[name] + np.float32(1e-3) * np.ones_like(weights[name])
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    for step in (2, 1):  # the content fingerprint, and the earlier one (which reads all of so small a file)
        with pytest.raises(
            ConfigError, match=rf"checkpoints/{step} was trained on the base .* their own base"
        ):
            restore_params(workdir, step)


def test_bad_lora_settings_are_errors(tmp_path, tiny_config):
    raw = tiny_config(tmp_path, tmp_path / "w")
    for lora_cfg, message in (
        ({"rank": 0}, "rank must be >= 1"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"targets": ["attn/query"]}, "matches no parameter"),
    ):
        raw["model"]["lora"] = lora_cfg
        with pytest.raises(ConfigError, match=message):
            cfg = load_config(None, base=raw)
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
            adapters.adapter_layout(cfg.model.lora, model_preset("qwen2.5-0.5b", **TINY), mesh)
    assert LoraConfig().scale == 2.0


def test_the_base_check_names_both_directions_and_a_changed_base():
    lora_run = {"source": "models/A", "scheme": adapters.CONTENT_SCHEME, "fingerprint": "a" * 64}
    other = {"source": "models/B", "scheme": adapters.CONTENT_SCHEME, "fingerprint": "b" * 64}
    legacy = lambda: pytest.fail("only a checkpoint without a scheme reads the earlier fingerprint")
    with pytest.raises(ConfigError, match="holds a full fine-tuning checkpoint but the config asks for LoRA"):
        adapters.check_same_base(None, lora_run, "w/checkpoints/3", legacy)
    with pytest.raises(ConfigError, match="holds a LoRA adapters checkpoint but the config asks for full"):
        adapters.check_same_base(lora_run, None, "w/checkpoints/3", legacy)
    with pytest.raises(ConfigError, match=r"trained on the base models/A .* now models/B"):
        adapters.check_same_base(lora_run, other, "w/checkpoints/3", legacy)
    assert adapters.check_same_base(lora_run, dict(lora_run), "w/checkpoints/3", legacy) is None
    assert adapters.check_same_base(None, None, "w/checkpoints/3", legacy) is None


def test_the_frozen_base_is_quantized_as_base_dtype_says_and_evaluated_dequantized(tiny_model_config):
    """model.lora.base_dtype int8 / nf4: training holds the projection kernels quantized (`frozen_base`), and
    evaluation and export read them back dequantized from that same quantization (`base_as_trained`, so they
    see the base training saw, not the float one); a float base_dtype leaves the parameters as they are."""
    params = nnx.to_pure_dict(nnx.state(CausalLM(tiny_model_config(), rngs=nnx.Rngs(0)), nnx.Param))
    for kind, stored in (("int8", Int8Weight), ("nf4", NF4Weight)):
        cfg = LoraConfig(base_dtype=kind)
        assert isinstance(adapters.frozen_base(params, cfg)["layers"]["mlp"]["down"], stored), kind
        want = dequantize(quantize_base(params, kind))  # each checked against NumPy in test_quantize.py
        got = adapters.base_as_trained(params, cfg)
        assert not np.array_equal(got["layers"]["mlp"]["down"], params["layers"]["mlp"]["down"]), kind
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for kind in ("float32", "bfloat16"):
        cfg = LoraConfig(base_dtype=kind)
        assert adapters.frozen_base(params, cfg) is params and adapters.base_as_trained(params, cfg) is params


def test_init_from_adapters_made_for_this_path_base_get_no_note(tmp_path):
    """The note is for adapters made for another base: none where their base_model_name_or_path is this run's
    model.path, however spelt (here with a "..": the same directory resolved), one where it names another."""
    base, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter_dir.mkdir()
    config = adapter_dir / "adapter_config.json"
    model = ModelRunConfig(path=str(base), lora=LoraConfig(init_from=str(adapter_dir)))
    config.write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "adapter" / ".." / "base")}))
    assert adapters.init_from_note(model) is None
    config.write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "other")}))
    assert adapters.init_from_note(model) == (
        f"note: model.lora.init_from {str(adapter_dir)!r} holds adapters made for the base "
        f"{str(tmp_path / 'other')!r} (its adapter_config.json's base_model_name_or_path); this run's base "
        f"is model.path {str(base)!r}"
    )


def test_lora_dropout_draws_a_mask_key_per_step_and_per_micro_batch(tiny, monkeypatch):
    """With `lora_dropout` > 0 every micro-batch of every step gets its own dropout key (so its own masks):
    two steps of 2 micro-batches hand the adapters 4 distinct keys, and a rerun of the same step the same
    ones (deterministic from the state's rng and step). The keys are read as the step hands them to
    `Adapters` (a debug callback); with dropout 0 no key is made at all. Survived before (mutation audit
    6a): one key for all micro-batches of a step, one key for all steps, and a key made with dropout 0."""
    import optax

    from nextquill_jax.train import step as step_module

    graphdef, base, weights, batch = tiny
    seen: list[tuple[int, ...]] = []
    record = lambda key: seen.append(tuple(np.asarray(jax.random.key_data(key)).ravel().tolist()))

    def adapters_recording(params, scale, dropout, key):
        if key is None:
            seen.append(None)
        else:
            jax.debug.callback(record, key)
        return lora.Adapters(params, scale, dropout, key)

    monkeypatch.setattr(step_module, "Adapters", adapters_recording)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    tx = optax.sgd(1.0)
    loss = LossConfig(variant="context_sft")  # denominators from the labels: no forward pre-pass
    settings = dataclasses.replace(SETTINGS, loss=loss, micro_batches=2, lora_dropout=0.5)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(1.0), settings, mesh))
    with jax.set_mesh(mesh):
        state = setup.new_state(weights, tx, 0)
        first, _ = step(state, batch, None, base)
        jax.effects_barrier()
        keys_0 = set(seen)
        step(first, batch, None, base)
        jax.effects_barrier()
        keys_01 = set(seen)
        step(state, batch, None, base)  # step 0 again
        jax.effects_barrier()
    assert None not in keys_01 and len(keys_0) == 2 and len(keys_01) == 4, seen
    assert set(seen) == keys_01
    seen.clear()
    no_dropout = dataclasses.replace(settings, lora_dropout=0.0)
    jax.eval_shape(
        make_train_step(graphdef, tx, optax.constant_schedule(1.0), no_dropout, mesh),
        state,
        batch,
        None,
        base,
    )
    assert seen and set(seen) == {None}


def test_the_eval_step_applies_no_lora_dropout(tiny):
    """Evaluation is deterministic: with `lora_dropout` 0.5 the eval step's aux is that of the same adapters
    with dropout 0, while the training loss with a dropout key differs from it (so the comparison can see
    dropout). Survived before (mutation audit 12b, S42): the eval step handing the adapters a dropout
    key."""
    from nextquill_jax.train.step import make_eval_step

    graphdef, base, weights, batch = tiny
    dropout = dataclasses.replace(SETTINGS, lora_dropout=0.5)
    fast = {"xla_backend_optimization_level": 0}
    evaluate = lambda s: jax.jit(make_eval_step(graphdef, s), compiler_options=fast)(
        weights, batch, None, base
    )
    with_dropout, without = evaluate(dropout), evaluate(dataclasses.replace(SETTINGS, lora_dropout=0.0))
    for k in without:
        np.testing.assert_array_equal(np.asarray(with_dropout[k]), np.asarray(without[k]), err_msg=k)
    trained = jax.jit(
        lambda w: batch_loss(w, graphdef, batch, dropout, base=base, key=jax.random.PRNGKey(0))[0],
        compiler_options=fast,
    )(weights)
    assert abs(float(trained) - float(loss_from_aux(without, SETTINGS.loss))) > 1e-4


def test_accumulated_lora_dropout_steps_take_their_denominators_from_the_dropped_out_forward(tiny):
    """Dynamic DCE weights (smoothed) under LoRA dropout and 2 micro-batches: the step's gradient is that
    of the global-batch loss of the forward passes it runs, micro-batch i with dropout key
    fold_in(fold_in(rng, step), i), its denominators (Σω, from those passes' DCE) included. Reference:
    jax.grad of the sum of the two micro-batches' (rows 0, 2 and 1, 3) `batch_loss` with those keys and
    the global denominators `combine_aux` gives of those same forward passes, no accumulation code
    involved; with SGD(1) the update is minus the gradient. Survived before (mutation audit 12b, S53): the
    forward-only pre-pass that counts the denominators run without dropout, so its Σω belonged to other
    forward passes than the gradient's."""
    import optax

    from nextquill_jax.loss import DENOMINATOR_KEYS, combine_aux

    graphdef, base, weights, batch = tiny
    # Smoothed weights (tests/loss/custom_weighting.py): Σω moves with every DCE, not only at the threshold.
    loss = LossConfig(weighting="tests.loss.custom_weighting:soft_weights")
    settings = dataclasses.replace(SETTINGS, loss=loss, micro_batches=2, lora_dropout=0.5)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    tx = optax.sgd(1.0)
    fast = {"xla_backend_optimization_level": 0}
    step = jax.jit(
        make_train_step(graphdef, tx, optax.constant_schedule(1.0), settings, mesh), compiler_options=fast
    )
    state = setup.new_state(weights, tx, 0)
    with jax.set_mesh(mesh):
        new, _ = step(state, batch, None, base)
    key = jax.random.fold_in(state.rng, state.step)
    micro = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    keys = [jax.random.fold_in(key, i) for i in range(2)]
    aux_of = jax.jit(lambda mb, k: batch_loss(weights, graphdef, mb, settings, base=base, key=k)[1])
    combined = combine_aux(
        *(aux_of(mb, k) for mb, k in zip(micro, keys, strict=True))
    )  # the global denominators of these forward passes (no gradient)
    denominators = {k: combined[k] for k in (*DENOMINATOR_KEYS, "n_sum") if k in combined}

    def global_loss(w):
        return sum(
            batch_loss(w, graphdef, mb, settings, denominators, base, k)[0]
            for mb, k in zip(micro, keys, strict=True)
        )

    grads = jax.jit(jax.grad(global_loss), compiler_options=fast)(weights)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        moved = functools.reduce(lambda d, k: d[k.key], path, new.params)
        start = functools.reduce(lambda d, k: d[k.key], path, weights)
        g = np.asarray(g)
        np.testing.assert_allclose(
            np.asarray(start) - np.asarray(moved),
            g,
            rtol=1e-4,
            atol=1e-5 * np.abs(g).max(),
            err_msg=str(path),
        )
