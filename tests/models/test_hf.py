"""Hugging Face import errors and conversions: every mismatch between a checkpoint and its config is an error
naming the tensor; dtype conversion; directory / name resolution. Tensors come from transformers models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from nextquill_jax.models import load_pretrained, model_from_hf

# Vocab 96, hidden 32, mlp 64 on `tiny_hf_config`'s 2 layers, 4 heads and 2 kv heads (of 8): the shapes below.
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=64)


def checkpoint(config) -> tuple[dict, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return config.to_dict(), {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def qwen2(tiny_hf_config):
    return checkpoint(tiny_hf_config("qwen2", tied=False, **SIZES))


def test_missing_tensor_is_named(qwen2):
    config, tensors = qwen2
    broken = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(KeyError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\]"):
        model_from_hf(config, broken)


def test_unexpected_tensor_is_named(qwen2):
    config, tensors = qwen2
    extra = {**tensors, "model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(KeyError, match=r"unexpected \['model.layers.0.mlp.extra_proj.weight'\]"):
        model_from_hf(config, extra)


def test_shape_mismatch_is_named_with_both_shapes(qwen2):
    config, tensors = qwen2
    wrong = {**tensors, "model.layers.0.self_attn.q_proj.weight": np.zeros((32, 31), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.self_attn.q_proj.weight: file has \(32, 31\), config implies \(32, 32\)",
    ):
        model_from_hf(config, wrong)


def test_tied_checkpoint_may_store_the_identical_head_but_not_a_different_one(tiny_hf_config):
    config, tensors = checkpoint(tiny_hf_config("llama", tied=True, **SIZES))
    assert np.array_equal(
        tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    )  # torch stores both
    model = model_from_hf(config, tensors)
    assert model.lm_head is None
    different = {**tensors, "lm_head.weight": tensors["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        model_from_hf(config, different)


def test_old_rotary_buffers_are_recognised_and_skipped(qwen2):
    """Older checkpoints store each layer's rotary `inv_freq`: not an unexpected tensor (as any other extra
    name is, above), and it changes no parameter."""
    config, tensors = qwen2
    with_buffer = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    flat = lambda model: {
        k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    loaded, plain = flat(model_from_hf(config, with_buffer)), flat(model_from_hf(config, tensors))
    assert loaded.keys() == plain.keys()
    assert all(np.array_equal(loaded[k], plain[k]) for k in plain)


def test_bfloat16_parameters_are_the_rounded_checkpoint_values(qwen2):
    config, tensors = qwen2
    model = model_from_hf(config, tensors, dtype="bfloat16")
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    q = np.asarray(params[("layers", "attn", "q_proj")].get_value())
    assert q.dtype == ml_dtypes.bfloat16 and q.shape == (2, 32, 4, 8)
    expected = (
        tensors["model.layers.1.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16).T.reshape(32, 4, 8)
    )
    assert np.array_equal(q[1], expected)
    assert model.cfg.param_dtype == "bfloat16"


def test_values_too_large_for_float16_are_refused_naming_the_tensor(qwen2):
    """float16's largest value is 65504: a larger weight loaded as inf, silently."""
    config, tensors = qwen2
    large = tensors["model.layers.1.mlp.up_proj.weight"].copy()
    large[0, :3] = [7e4, -1e5, 65504.0]
    changed = {**tensors, "model.layers.1.mlp.up_proj.weight": large}
    with pytest.raises(
        ValueError,
        match=r"^model\.layers\.\{i\}\.mlp\.up_proj\.weight: 2 values \(largest magnitude 100000\) are too "
        r"large for float16 \(largest 65504\) and would load as inf; fix: load the model in a dtype of wider "
        r"range",
    ):
        model_from_hf(config, changed, dtype="float16")
    for dtype in ("bfloat16", "float32"):  # the same tensors fit these
        params = nnx.state(model_from_hf(config, changed, dtype=dtype), nnx.Param)
        up = np.asarray(dict(nnx.to_flat_state(params))[("layers", "mlp", "up")].get_value())
        assert up[1, 1, 0] == np.float32(-1e5).astype(up.dtype) and np.all(np.isfinite(up))
    at_limit = {**tensors, "model.layers.1.mlp.up_proj.weight": np.clip(large, -65504, 65504)}
    params = nnx.state(model_from_hf(config, at_limit, dtype="float16"), nnx.Param)
    assert dict(nnx.to_flat_state(params))[("layers", "mlp", "up")].get_value()[1, 1, 0] == -65504


def test_unknown_name_and_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        load_pretrained("no-such-model")
    with pytest.raises(
        FileNotFoundError, match=r"config\.json does not exist, so .* is no Hugging Face .*Fix"
    ):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{'vocab_size': 96}", r"is not valid JSON \(Expecting property name .*line 1 column 2"),
        ("[1, 2]", "holds a list, not a JSON object"),
    ],
)
def test_a_damaged_config_json_is_named_with_the_fix(tmp_path, text, problem):
    """It was a bare JSONDecodeError (or for a list AttributeError: 'list' object has no attribute 'get')."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(
        ValueError, match=rf"^{tmp_path}/config\.json {problem}.*\. Fix: copy or download the model's"
    ):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"42", "holds a int, not a JSON object"),
        (b'"text"', "holds a str, not a JSON object"),
        (b"\xff{}", "is not valid JSON ("),  # not UTF-8: UnicodeDecodeError, a ValueError
    ],
)
def test_read_json_object_names_any_value_that_is_not_an_object_and_text_that_is_not_utf8(
    tmp_path, content, problem
):
    """Any JSON value but an object is refused naming its type (json.loads gives int and str for these), and
    bytes that are not UTF-8 are named as not valid JSON with the fix. Mutations that survived before:
    `not isinstance(content, dict)` -> `isinstance(content, list)`, `except ValueError` ->
    `except json.JSONDecodeError`."""
    from nextquill_jax.json_object import read_json_object

    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_json_object(path, "copy it again.")
    assert str(e.value).startswith(f"{path} {problem}") and str(e.value).endswith(". Fix: copy it again.")


def test_a_json_object_reads_as_utf8_whatever_the_locale_says(tmp_path):
    """A config.json with non-ASCII text (a chat template, an author's name) reads under a locale whose
    encoding is ASCII (`LC_ALL=C` without Python's locale coercion or UTF-8 mode, as some cluster images run
    jobs): `read_text()` took the locale's encoding, so the file was refused as "not valid JSON"."""
    path = tmp_path / "config.json"
    path.write_bytes('{"name": "Qwen \u00e9t\u00e9 \u2014 \u4f60\u597d"}'.encode())
    program = (
        "import locale, sys; from nextquill_jax.json_object import read_json_object; "
        "print(locale.getpreferredencoding(False)); "
        "print(ascii(read_json_object(sys.argv[1], 'x')['name']))"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run(
        [sys.executable, "-c", program, str(path)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    encoding, name = done.stdout.splitlines()
    assert encoding.lower() not in ("utf-8", "utf8")  # the locale the test is about
    assert name == ascii("Qwen \u00e9t\u00e9 \u2014 \u4f60\u597d")


def test_an_integer_weight_is_named(qwen2):
    """A tensor of an integer type (a quantized or damaged checkpoint) failed in np.finfo ("data type
    <class 'numpy.int32'> not inexact"), naming nothing."""
    config, tensors = qwen2
    changed = {**tensors, "model.norm.weight": tensors["model.norm.weight"].astype(np.int32)}
    with pytest.raises(ValueError, match=r"^model\.norm\.weight: stored as int32, not a floating-point type"):
        model_from_hf(config, changed)


def test_a_directory_without_safetensors_weights_says_so_and_what_to_do(tmp_path):
    from nextquill_jax.models.hf import SafetensorsTensors

    with pytest.raises(FileNotFoundError, match=r"has no weights to load\. Fix: put the model's weights"):
        SafetensorsTensors(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"Fix: it holds pytorch_model\.bin, which are not read: save the model as"
    ):
        SafetensorsTensors(tmp_path)


def test_save_pretrained_writes_the_tokenizer_too(qwen2, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nextquill_jax.models import save_pretrained

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    config, tensors = qwen2
    out = save_pretrained(model_from_hf(config, tensors), tmp_path / "out", tokenizer=tokenizer)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    # as readable as the files beside it: safetensors alone made it its owner's only (0600)
    mode = lambda name: (out / name).stat().st_mode & 0o777
    assert mode("model.safetensors") == mode("config.json")
    # AutoTokenizer would pick Qwen2Tokenizer from config.json's model_type, which this toy vocab breaks.
    assert PreTrainedTokenizerFast.from_pretrained(out)("hello world there")["input_ids"] == [1, 2, 0]


def test_save_pretrained_refuses_a_directory_that_holds_weights(qwen2, tmp_path):
    """A single-file save beside an earlier sharded one left both: our loader read the sharded index,
    transformers model.safetensors. The earlier files are named and kept; other files are no obstacle."""
    from nextquill_jax.models import save_pretrained

    config, tensors = qwen2
    model = model_from_hf(config, tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("notes\n")
    save_pretrained(model, out, max_shard_bytes=40_000)  # several shards
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shards = sorted(n for n in before if n.startswith("model-"))
    assert len(shards) > 1 and "model.safetensors.index.json" in before
    with pytest.raises(FileExistsError) as caught:
        save_pretrained(model, out)
    names = ", ".join(sorted([*shards, "model.safetensors.index.json"]))
    assert str(caught.value).startswith(f"{out} already holds weight files: {names}. "), caught.value
    assert str(caught.value).endswith(f"Fix: empty {out} or save to another directory."), caught.value
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for stale in ("model.safetensors", "pytorch_model.bin", "adapter_config.json"):
        other = tmp_path / stale
        other.mkdir()
        (other / stale).write_text("old\n")
        with pytest.raises(FileExistsError, match=f"already holds weight files: {stale}\\. "):
            save_pretrained(model, other)


def test_shards_hold_at_most_the_bound_unless_one_tensor_exceeds_it(qwen2, tmp_path):
    """`max_shard_bytes` bounds each shard's tensors (one larger tensor alone may exceed it), and the index's
    total_size is their sum: both from the tensors read back (numpy's nbytes), not from our own count."""
    import json

    from safetensors.numpy import load_file

    from nextquill_jax.models import save_pretrained

    config, tensors = qwen2
    out = save_pretrained(model_from_hf(config, tensors), tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {name: load_file(out / name) for name in sorted(set(index["weight_map"].values()))}
    assert len(shards) > 2
    for name, held in shards.items():
        sizes = [array.nbytes for array in held.values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1, (name, sizes)
    assert index["metadata"]["total_size"] == sum(a.nbytes for held in shards.values() for a in held.values())
    # A bound below every tensor: one tensor a shard, none empty (the first tensor opens the first shard).
    alone = save_pretrained(model_from_hf(config, tensors), tmp_path / "alone", max_shard_bytes=1)
    index = json.loads((alone / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    held = [load_file(alone / name) for name in files]
    assert [len(shard) for shard in held] == [1] * len(index["weight_map"])
    assert sorted(path.name for path in alone.glob("*.safetensors")) == files
    # A bound the first two tensors fill exactly: they share the first shard ("at most", not "below").
    first, second = (next(iter(shard.values())) for shard in held[:2])
    bound = first.nbytes + second.nbytes
    exact = save_pretrained(model_from_hf(config, tensors), tmp_path / "exact", max_shard_bytes=bound)
    opening = json.loads((exact / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(load_file(exact / min(opening.values()))) == sorted([*held[0], *held[1]])


def test_sharded_index_must_agree_with_its_files(qwen2, tmp_path):
    import json

    from safetensors.numpy import save_file

    from nextquill_jax.models.hf import SafetensorsTensors

    _, tensors = qwen2
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, tmp_path / "a.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, tmp_path / "b.safetensors")
    weight_map = {n: "a.safetensors" if i < half else "b.safetensors" for i, n in enumerate(names)}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    loaded = SafetensorsTensors(tmp_path)
    assert sorted(loaded) == names and np.array_equal(loaded[names[-1]], tensors[names[-1]])
    del weight_map[names[0]]  # still in a.safetensors, no longer listed: would be dropped silently
    index.write_text(json.dumps({"weight_map": weight_map}))
    listed = f"present but not listed \\['{names[0]}'\\]\\. Fix: copy the index and its files again"
    with pytest.raises(KeyError, match=listed):
        SafetensorsTensors(tmp_path)


@pytest.mark.parametrize("stopped_at", [1, 2])
def test_a_save_stopped_part_way_leaves_no_directory_that_loads(qwen2, tmp_path, monkeypatch, stopped_at):
    """The weights were written first and config.json after them: an export killed in between left weights
    and a config that loaded, without the end token export then added. Now the config and tokenizer come
    first, each weight file whole, the shard index last: stopped at any weight file, no loader takes the
    directory for a model, and no part-written file is left."""
    from nextquill_jax.models import hf

    config, tensors = qwen2
    model = model_from_hf(config, tensors)
    written, save_file = [], hf.save_file

    def stopping(tensors, path, **kwargs):
        if len(written) + 1 == stopped_at:
            raise KeyboardInterrupt  # as a kill would stop it, mid-file
        written.append(path)
        save_file(tensors, path, **kwargs)

    monkeypatch.setattr(hf, "save_file", stopping)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(model, out, max_shard_bytes=40_000, eos_token_ids=[5, 7])
    names = sorted(p.name for p in out.iterdir())  # no temporary file left either
    shards_written = [name for name in names if re.fullmatch(r"model-0000\d-of-0000\d\.safetensors", name)]
    assert names == ["config.json", *shards_written] and len(shards_written) == stopped_at - 1, names
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [5, 7]
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        load_pretrained(out)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
