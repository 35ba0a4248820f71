"""PEFT adapter directories (models/peft.py): what `write_peft_adapter` writes, `peft.PeftModel` loads onto
the transformers base with logits equal to ours; `read_peft_adapter` reads it back; mismatches are errors."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from nextquill_jax.models import CausalLM, load_pretrained, lora
from nextquill_jax.models.peft import read_peft_adapter, write_peft_adapter

TARGETS = ["attn/(q|k|v|o)_proj", "mlp/(gate|up|down)"]
IDS = np.random.default_rng(0).integers(0, 300, (2, 11))


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def base(request, tiny_hf_config, tmp_path_factory):
    """(transformers model, our model of the same weights, random adapters with B != 0) of one family."""
    family, tied = request.param
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, tied=tied)).eval()
    directory = tmp_path_factory.mktemp(f"{family}_{tied}")
    hf.save_pretrained(directory)
    ours = load_pretrained(directory, compute_dtype="float32")
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    shapes = lora.adapter_shapes(params, lora.target_paths(params, TARGETS), 4, jnp.float32)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    weights = jax.tree.unflatten(
        tree, [0.05 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)]
    )
    return hf, ours, weights, shapes


def test_layers_past_the_ninth_are_named_and_read_by_their_whole_index(tiny_model_config, tmp_path):
    """PEFT names layer 10's q_proj `...layers.10.self_attn.q_proj`: written there from our layer 10 as
    [r, in], and read back from there (every real base has more than ten layers; the tiny ones here two)."""
    cfg = tiny_model_config(num_layers=11)
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    shapes = lora.adapter_shapes(params, lora.target_paths(params, ["attn/q_proj"]), 2, jnp.float32)
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    write_peft_adapter(weights, cfg, tmp_path, rank=2, alpha=4.0)
    a = weights["layers"]["attn"]["q_proj"]["a"]  # [11, D, 2]
    written = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        written["base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight"], a[10].T
    )
    read = read_peft_adapter(tmp_path, cfg, shapes, rank=2, alpha=4.0)
    for x, y in zip(jax.tree.leaves(weights), jax.tree.leaves(read), strict=True):
        np.testing.assert_array_equal(x, y)


def test_peft_loads_our_adapters_with_equal_logits(base, tmp_path):
    hf, ours, weights, _ = base
    write_peft_adapter(weights, ours.cfg, tmp_path, rank=4, alpha=16.0)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
    assert mode("adapter_model.safetensors") == mode("adapter_config.json")  # not its owner's only
    # No base named: null, PEFT's own default, which PEFT reads back as None.
    assert peft.PeftConfig.from_pretrained(tmp_path).base_model_name_or_path is None
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        theirs = adapted(torch.tensor(IDS)).logits.numpy()
        with adapted.disable_adapter():
            plain = adapted(torch.tensor(IDS)).logits.numpy()
    hidden = ours.hidden_states(jnp.asarray(IDS), adapters=lora.Adapters(weights, 16.0 / 4))
    got = np.asarray(ours.logits(hidden))
    assert np.abs(theirs - plain).max() > 1e-2 * np.abs(theirs).max()  # the adapters matter
    np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_read_gives_back_what_was_written_and_mismatches_are_errors(base, tmp_path):
    _, ours, weights, shapes = base
    write_peft_adapter(weights, ours.cfg, tmp_path, rank=4, alpha=16.0)
    read = read_peft_adapter(tmp_path, ours.cfg, shapes, rank=4, alpha=16.0)
    for x, y in zip(jax.tree.leaves(weights), jax.tree.leaves(read), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    # Read for a run whose parameters (and so adapters) are bfloat16: A and B both in that dtype, rounded.
    bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), shapes)
    read = read_peft_adapter(tmp_path, ours.cfg, bf16, rank=4, alpha=16.0)
    for x, y in zip(jax.tree.leaves(weights), jax.tree.leaves(read), strict=True):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x).astype(jnp.bfloat16), y)
    with pytest.raises(ValueError, match="the config asks for rank=8"):
        read_peft_adapter(tmp_path, ours.cfg, shapes, rank=8, alpha=16.0)
    # The same rank, another alpha: read as it is, every adapter term would be scaled by 32 / 4, not 16 / 4.
    with pytest.raises(ValueError, match=r"lora_alpha=16\.0; the config asks for rank=4, alpha=32\.0"):
        read_peft_adapter(tmp_path, ours.cfg, shapes, rank=4, alpha=32.0)
    only_q = {"layers": {"attn": {"q_proj": shapes["layers"]["attn"]["q_proj"]}}}
    with pytest.raises(ValueError, match=r"model\.lora\.targets select"):
        read_peft_adapter(tmp_path, ours.cfg, only_q, rank=4, alpha=16.0)
    with pytest.raises(FileNotFoundError, match=r"nothing does not exist\. Fix: point it at a PEFT adapter"):
        read_peft_adapter(tmp_path / "nothing", ours.cfg, shapes, rank=4, alpha=16.0)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json does not exist, so .* is not a PEFT"):
        read_peft_adapter(tmp_path, ours.cfg, shapes, rank=4, alpha=16.0)


# ------------------------------------------------------------------------------------------------------------
# Adapters peft itself made: plain LoRA reads to peft's logits; anything else is refused by name.

PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]
OUR_TARGETS = ["attn/(q|v)_proj", "mlp/down"]


@pytest.fixture(scope="module")
def llama_dir(tiny_hf_config, tmp_path_factory):
    """A tiny llama base saved as a Hugging Face directory."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama_base")
    transformers.AutoModelForCausalLM.from_config(tiny_hf_config("llama")).save_pretrained(directory)
    return directory


def peft_adapter(base_dir, out, hf_config=None, targets=PEFT_TARGETS, **settings):
    """A peft LoRA adapter (r=4, lora_alpha=12 on `targets`, `settings` added) on the base in `base_dir`
    (or a random model of `hf_config`), every trainable tensor moved off its initial value, saved to `out`;
    returns (the peft model, `out`)."""
    torch.manual_seed(1)
    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if hf_config is None
        else transformers.AutoModelForCausalLM.from_config(hf_config)
    )
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, **settings)
    adapted = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for _, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapted.save_pretrained(out)
    return adapted.eval(), out


def our_shapes(base_dir, targets=OUR_TARGETS):
    ours = load_pretrained(base_dir, compute_dtype="float32")
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    return ours, lora.adapter_shapes(params, lora.target_paths(params, targets), 4, jnp.float32)


def test_a_plain_adapter_peft_made_reads_to_peft_logits(llama_dir, tmp_path):
    adapted, out = peft_adapter(llama_dir, tmp_path / "plain")
    ours, shapes = our_shapes(llama_dir)
    weights = read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    with torch.no_grad():
        theirs = adapted(torch.tensor(IDS)).logits.numpy()
        with adapted.disable_adapter():
            plain = adapted(torch.tensor(IDS)).logits.numpy()
    got = np.asarray(ours.logits(ours.hidden_states(jnp.asarray(IDS), adapters=lora.Adapters(weights, 3.0))))
    assert np.abs(theirs - plain).max() > 1e-2 * np.abs(theirs).max()  # the adapters matter
    np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_bias": True}, "sets lora_bias: true (a trained bias on every lora_B"),
        ({"bias": "all"}, 'sets bias: "all" (the base model\'s biases trained too)'),
        ({"modules_to_save": ["lm_head"]}, 'sets modules_to_save: ["lm_head"] (full trained copies'),
        ({"layers_to_transform": [0]}, "sets layers_to_transform: [0] (adapters on these layers only)"),
        ({"rank_pattern": {"down_proj": 2}}, 'sets rank_pattern: {"down_proj": 2} (another rank'),
        ({"alpha_pattern": {"down_proj": 4}}, 'sets alpha_pattern: {"down_proj": 4} (another lora_alpha'),
        ({"use_rslora": True}, "sets use_rslora: true (scales A·B by lora_alpha / sqrt(r)"),
        ({"use_dora": True}, "sets use_dora: true (DoRA"),
        # peft takes one layer's index as an int too: 0 sets it (layer 0 only) though it is falsy.
        ({"layers_to_transform": 0}, "sets layers_to_transform: 0 (adapters on these layers only)"),
        # PiSSA with fast SVD, as peft spells it ("pissa_niter_[iterations]"): the base was rewritten too.
        (
            {"init_lora_weights": "pissa_niter_4"},
            'sets init_lora_weights: "pissa_niter_4" (an initialisation that also changed the base weights',
        ),
    ],
)
def test_a_setting_that_changes_what_the_adapter_computes_is_refused_by_name(
    llama_dir, tmp_path, settings, message
):
    _, out = peft_adapter(llama_dir, tmp_path / "a", **settings)
    ours, shapes = our_shapes(llama_dir)
    field = next(iter(settings))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    assert str(e.value).endswith(f"Fix: start from a plain LoRA adapter (trained without {field})")


FIELD_FIX = "Fix: write {0} as {1} (such as {2}), or save the adapter anew"
R_FIX = FIELD_FIX.format("r", "an integer", 8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # float(None): a TypeError, which set-up let through as a traceback
        (
            lambda c: {**c, "lora_alpha": None},
            ": lora_alpha is None, not a number. " + FIELD_FIX.format("lora_alpha", "a number", 16),
        ),
        # config.get on a list: an AttributeError
        (lambda c: [], " holds a list, not a JSON object. Fix: save the adapter anew"),
        # compared unequal to rank 4, yet named as "the adapter has r=4 ...; the config asks for rank=4"
        (lambda c: {**c, "r": "4"}, f": r is '4', not an integer. {R_FIX}"),
        (lambda c: {**c, "r": True}, f": r is True, not an integer. {R_FIX}"),
        (lambda c: {k: v for k, v in c.items() if k != "r"}, f": r is missing, not an integer. {R_FIX}"),
    ],
)
def test_an_adapter_config_that_is_no_object_or_has_a_mistyped_rank_or_alpha_is_named(
    llama_dir, tmp_path, edit, message
):
    _, out = peft_adapter(llama_dir, tmp_path / "a")
    file = out / "adapter_config.json"
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    ours, shapes = our_shapes(llama_dir)
    with pytest.raises(ValueError) as e:
        read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    assert str(e.value) == f"{file}{message}"


def test_a_field_peft_does_not_write_is_refused_where_it_is_set_and_every_field_peft_writes_is_known(
    llama_dir, tmp_path
):
    """A field a later peft may add (which may change what the adapter computes) was read as plain LoRA
    without a word; set to nothing it is read. Every field peft's LoraConfig writes is either inert or refused
    where set (`_UNAPPLIED`), so no adapter peft makes today meets the refusal."""
    from nextquill_jax.models.peft import _INERT, _UNAPPLIED

    written = set(peft.LoraConfig(task_type="CAUSAL_LM").to_dict())
    assert written <= _INERT | {name for name, _, _ in _UNAPPLIED}, written - _INERT
    _, out = peft_adapter(llama_dir, tmp_path / "a")
    file = out / "adapter_config.json"
    config = json.loads(file.read_text())
    ours, shapes = our_shapes(llama_dir)
    file.write_text(json.dumps({**config, "use_future_lora": None, "future_config": {}}))
    read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    file.write_text(json.dumps({**config, "use_future_lora": True, "future_config": {"k": 2}}))
    with pytest.raises(ValueError) as e:
        read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    assert str(e.value) == (
        f'{file} sets use_future_lora: true, future_config: {{"k": 2}}, which this package does not know '
        "(peft 0.21's LoRA settings have no such field), so it cannot tell whether the adapter computes "
        "plain LoRA. Fix: remove the field from adapter_config.json if it leaves the adapter plain LoRA, or "
        "start from a plain LoRA adapter"
    )


def test_tensors_the_run_would_not_apply_are_refused_whatever_the_config_says(llama_dir, tmp_path):
    """lora_B.bias tensors under an adapter_config.json that no longer says lora_bias: refused by name."""
    _, out = peft_adapter(llama_dir, tmp_path / "a", lora_bias=True)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": False}))
    ours, shapes = our_shapes(llama_dir)
    with pytest.raises(
        ValueError,
        match=r"holds tensors that are not LoRA A or B matrices .*: base_model\.model\.model\.layers\.0\."
        r"mlp\.down_proj\.lora_B\.bias, .* and 3 more\. Fix",
    ):
        read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)


def test_an_adapter_on_other_kernels_than_the_targets_is_refused(llama_dir, tmp_path):
    """Fewer kernels than model.lora.targets select (q, v, down of all seven), or a module that is no
    projection of the decoder (lm_head, which peft adapts as it does any Linear; a module inside one): refused
    by name, not read in part, ignored, or failed on with a KeyError or IndexError."""
    _, out = peft_adapter(llama_dir, tmp_path / "qvd")
    ours, every = our_shapes(llama_dir, TARGETS)
    with pytest.raises(
        ValueError,
        match=re.escape("the adapter targets ['down_proj', 'q_proj', 'v_proj']; model.lora.targets"),
    ):
        read_peft_adapter(out, ours.cfg, every, rank=4, alpha=12)
    _, out = peft_adapter(llama_dir, tmp_path / "head", targets=[*PEFT_TARGETS, "lm_head"])
    _, shapes = our_shapes(llama_dir)
    with pytest.raises(
        ValueError,
        match=r"not LoRA A or B matrices .*: .*base_model\.model\.lm_head\.lora_A\.weight, "
        r"base_model\.model\.lm_head\.lora_B\.weight\. Fix",
    ):
        read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    # A LoRA pair on a module inside q_proj (as a stacked adapter saves one): its module is not q_proj.
    _, out = peft_adapter(llama_dir, tmp_path / "nested")
    tensors = load_file(out / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    nested = {f"{q}.base_layer.lora_{ab}.weight": tensors[f"{q}.lora_{ab}.weight"] for ab in "AB"}
    save_file({**tensors, **nested}, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"not LoRA A or B matrices .*: {re.escape(q)}\.base_layer\.lora_A"):
        read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)


def test_an_adapter_of_another_peft_type_is_refused_by_its_type(tiny_hf_config, llama_dir, tmp_path):
    """AdaLoRA's config has LoRA's r and lora_alpha (and fields of its own): refused by what it is, not by the
    first field this package does not know."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    config = peft.AdaLoraConfig(r=4, lora_alpha=12, target_modules=PEFT_TARGETS, total_step=10)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path)
    ours, shapes = our_shapes(llama_dir)
    with pytest.raises(
        ValueError, match=r"has peft_type 'ADALORA', not LORA\. Fix: start from a LoRA adapter"
    ):
        read_peft_adapter(tmp_path, ours.cfg, shapes, rank=4, alpha=12)


def test_an_adapter_for_another_base_is_refused_naming_the_tensor_or_the_layers(
    llama_dir, tiny_hf_config, tmp_path
):
    ours, shapes = our_shapes(llama_dir)
    read = lambda out: read_peft_adapter(out, ours.cfg, shapes, rank=4, alpha=12)
    _, wider = peft_adapter(None, tmp_path / "wider", tiny_hf_config("llama", intermediate_size=256))
    with pytest.raises(
        ValueError,
        match=r"tensor base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight has shape "
        r"\[4, 256\], but this base's down_proj needs \[4, 128\] \(r = 4\): the adapter was made for a base "
        r"of other shapes",
    ):
        read(wider)
    _, deeper = peft_adapter(None, tmp_path / "deeper", tiny_hf_config("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"q_proj adapters for layers up to 2, but the base has 2 layers"):
        read(deeper)
    _, plain = peft_adapter(llama_dir, tmp_path / "plain")
    tensors = load_file(plain / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.1.self_attn.q_proj." not in k}, plain / "x")
    (plain / "x").replace(plain / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no q_proj lora_A and lora_B for layers \[1\] of the base's 2"):
        read(plain)
    # One matrix of the pair gone: named as the pair is, not a KeyError when the tensors are read.
    b_only = ".layers.0.self_attn.q_proj.lora_B."
    save_file({k: v for k, v in tensors.items() if b_only not in k}, plain / "x")
    (plain / "x").replace(plain / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no q_proj lora_A and lora_B for layers \[0\] of the base's 2"):
        read(plain)
