"""PEFT adapter directories (models/peft.py): what `write_peft_adapter` writes, `peft.PeftModel` loads onto
the transformers base with logits equal to ours; `read_peft_adapter` reads it back; mismatches are errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from nextquill_jax.models import load_pretrained, lora
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


def test_peft_loads_our_adapters_with_equal_logits(base, tmp_path):
    hf, ours, weights, _ = base
    write_peft_adapter(weights, ours.cfg, tmp_path, rank=4, alpha=16.0)
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
    with pytest.raises(ValueError, match="the config asks for rank=8"):
        read_peft_adapter(tmp_path, ours.cfg, shapes, rank=8, alpha=16.0)
    only_q = {"layers": {"attn": {"q_proj": shapes["layers"]["attn"]["q_proj"]}}}
    with pytest.raises(ValueError, match=r"model\.lora\.targets select"):
        read_peft_adapter(tmp_path, ours.cfg, only_q, rank=4, alpha=16.0)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        read_peft_adapter(tmp_path / "nothing", ours.cfg, shapes, rank=4, alpha=16.0)
