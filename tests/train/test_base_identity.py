"""The identity of a LoRA run's frozen base (train/adapters.py): its content fingerprint tells a base whose
tensors were changed in place (q/v LoRA-merged into the same shapes) from the original, whole-hashed below the
size limit and sampled above it; a copy elsewhere matches; checkpoints that recorded the fingerprint of
earlier versions (no "scheme") are still checked against it, with a note."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from nextquill_jax.config import ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.train import adapters

# Sizes chosen so that the 16 blocks of 64 KiB of the earlier fingerprint (at multiples of size // 16 =
# 202,905 bytes of the 3,246,488) all fall outside the v projection (bytes 2,097,560 to 2,228,632).
LAYER = {
    "model.layers.0.mlp.down_proj.weight": (512, 1024),  # 2 MiB of float32, first in the file
    "model.layers.0.self_attn.v_proj.weight": (128, 256),  # 128 KiB
    "model.layers.0.self_attn.z_rest.weight": (496, 512),
    "model.norm.weight": (512,),
}


def _write_base(directory, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text('{"model_type": "qwen2"}\n')
    return directory


def _tensors():
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in LAYER.items()}


def _merged(tensors, name, scale=1e-2):
    """`tensors` with a rank-4 update added to `name`, as a LoRA merge writes it."""
    rng = np.random.default_rng(1)
    out_features, in_features = tensors[name].shape
    delta = rng.standard_normal((out_features, 4)) @ rng.standard_normal((4, in_features))
    return {**tensors, name: (tensors[name] + scale * delta).astype(np.float32)}


def test_a_base_overwritten_with_a_same_shape_lora_merged_export_is_another_base(tmp_path):
    tensors = _tensors()
    base = _write_base(tmp_path / "base", tensors)
    model = ModelRunConfig(path=str(base))
    before = adapters.base_identity(model, seed=0)
    copy = adapters.base_identity(ModelRunConfig(path=str(shutil.copytree(base, tmp_path / "copy"))), seed=0)
    legacy_before = adapters.legacy_fingerprint(model, seed=0)
    _write_base(base, _merged(tensors, "model.layers.0.self_attn.v_proj.weight"))
    after = adapters.base_identity(model, seed=0)
    # The reported miss: the fingerprint of earlier versions samples none of the changed bytes.
    assert adapters.legacy_fingerprint(model, seed=0) == legacy_before
    assert after["fingerprint"] != before["fingerprint"]
    assert copy["fingerprint"] == before["fingerprint"] and copy["source"] != before["source"]
    with pytest.raises(ConfigError, match="adapters only fit their own base"):
        adapters.check_same_base(before, after, "w/checkpoints/3", lambda: pytest.fail("legacy read"))
    # The architecture is part of the base: the same tensors under another config.json are another base.
    (base / "config.json").write_text('{"model_type": "llama"}\n')
    assert adapters.base_identity(model, seed=0)["fingerprint"] != after["fingerprint"]


def test_above_the_whole_file_limit_a_changed_tensor_of_a_stride_or_more_is_caught(tmp_path):
    small = dict(whole_bytes=1 << 20, stride=1 << 14, block=1 << 10)  # the 3.1 MiB base is sampled
    tensors = _tensors()
    base = _write_base(tmp_path / "base", tensors)
    copy = _write_base(tmp_path / "elsewhere" / "copy", tensors)

    def fingerprint(directory, **params):
        return adapters.content_fingerprint(
            [directory / "model.safetensors"], [directory / "config.json"], **{**small, **params}
        )

    scheme, before = fingerprint(base)
    assert fingerprint(copy) == (scheme, before)
    assert scheme == "blake2b-128 whole to 1048576 bytes, else 1024 every 16384"
    _write_base(copy, _merged(tensors, "model.layers.0.self_attn.v_proj.weight"))
    assert fingerprint(copy)[1] != before  # 128 KiB changed throughout: 8 samples in it
    # What sampling gives up: one value between samples passes, though hashing whole catches it.
    one_value = dict(tensors)
    v = one_value["model.layers.0.self_attn.v_proj.weight"] = tensors[
        "model.layers.0.self_attn.v_proj.weight"
    ].copy()
    v[5, 0] += 1.0  # byte 2,102,680: 5,528 past a multiple of 16 KiB, outside its 1 KiB sample
    _write_base(copy, one_value)
    assert fingerprint(copy)[1] == before
    assert fingerprint(copy, whole_bytes=4 << 20)[1] != fingerprint(base, whole_bytes=4 << 20)[1]
    size = (
        (base / "model.safetensors").stat().st_size
    )  # "at most whole_bytes": a total of exactly it is whole
    assert fingerprint(copy, whole_bytes=size)[1] != fingerprint(base, whole_bytes=size)[1]
    # The config is hashed whole either way: one byte changed between where samples of its size would be.
    text = '{"model_type": "qwen2", "note": "' + "x" * 20_000 + '"}\n'
    (base / "config.json").write_text(text)
    (copy / "config.json").write_text(text[:5_000] + "y" + text[5_001:])
    assert fingerprint(copy)[1] != fingerprint(base)[1]


def test_sampled_reads_cover_every_stride_and_the_tail(tmp_path):
    file = tmp_path / "weights.gguf"
    data = bytearray(np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    file.write_bytes(data)
    digest = adapters._sampled_digest(file, len(data), 4096, 16)
    cases = (
        (0, True),
        (15, True),
        (4096 + 15, True),
        (4096 + 16, False),
        (len(data) - 1, True),
        (9000, False),
    )
    for offset, caught in cases:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        file.write_bytes(changed)
        assert (adapters._sampled_digest(file, len(data), 4096, 16) != digest) is caught, offset


def test_a_files_size_is_part_of_its_sampled_description(tmp_path):
    """Zero-filled weight files one byte apart: their samples (at 0, 4096, 8192 and the last 16 bytes) read
    the same zeros, so only the size recorded beside them tells the two apart."""
    files = []
    for size in (10_000, 10_001):
        (tmp_path / str(size)).mkdir()
        files.append(tmp_path / str(size) / "model.safetensors")
        files[-1].write_bytes(bytes(size))
    small = dict(whole_bytes=1_000, stride=4096, block=16)
    assert adapters.content_fingerprint([files[0]], **small) != adapters.content_fingerprint(
        [files[1]], **small
    )


def test_the_earlier_fingerprint_is_the_one_earlier_versions_saved(tmp_path):
    """A file under 64 KiB read as versions before the content fingerprint read it: each of the 16 block reads
    starts at min(k * size // 16, max(size - 64 KiB, 0)) = 0, so each is the whole file; the digest is SHA-256
    over each file's "name:size" and its 16 blocks. Reading the blocks otherwise refuses every checkpoint
    those versions saved (config.json is always this small)."""
    base = _write_base(tmp_path / "base", {"model.norm.weight": np.arange(512, dtype=np.float32)})
    want = hashlib.sha256()
    for file in (base / "model.safetensors", base / "config.json"):
        data = file.read_bytes()
        assert len(data) < 1 << 16
        want.update(f"{file.name}:{len(data)}".encode() + data * 16)
    assert adapters.legacy_fingerprint(ModelRunConfig(path=str(base)), seed=0) == want.hexdigest()


def test_a_checkpoint_with_the_earlier_fingerprint_is_checked_against_it_with_a_note(tmp_path):
    base = _write_base(tmp_path / "base", _tensors())
    model = ModelRunConfig(path=str(base))
    current = adapters.base_identity(model, seed=0)
    legacy = lambda: adapters.legacy_fingerprint(model, seed=0)
    old = {"source": str(base), "fingerprint": legacy()}  # what earlier versions saved: no "scheme"
    note = adapters.check_same_base(old, current, "w/checkpoints/3", legacy)
    assert "w/checkpoints/3 recorded its base with the fingerprint of earlier versions" in note
    assert "can miss a changed tensor" in note
    other = {"source": "models/B", "fingerprint": "b" * 64}
    with pytest.raises(ConfigError, match=r"trained on the base models/B .* only fit their own base"):
        adapters.check_same_base(other, current, "w/checkpoints/3", legacy)
    assert adapters.check_same_base(current, dict(current), "w/checkpoints/3", legacy) is None
    newer = {**current, "scheme": "sha3 of everything"}
    with pytest.raises(ConfigError, match="scheme 'sha3 of everything', which this version does not know"):
        adapters.check_same_base(newer, current, "w/checkpoints/3", legacy)


def test_a_preset_base_keeps_its_exact_fingerprint_across_the_upgrade():
    model = ModelRunConfig(path=None, preset="qwen2.5-0.5b", overrides={"hidden_size": 32})
    current = adapters.base_identity(model, seed=7)
    assert current["scheme"] == adapters.PRESET_SCHEME
    old = {"source": current["source"], "fingerprint": current["fingerprint"]}
    legacy = lambda: adapters.legacy_fingerprint(model, seed=7)
    assert adapters.check_same_base(old, current, "w/checkpoints/3", legacy) is None  # exact: no note
    other_seed = adapters.base_identity(model, seed=8)
    with pytest.raises(ConfigError, match="only fit their own base"):
        adapters.check_same_base(other_seed, current, "w/checkpoints/3", legacy)


def test_a_preset_base_in_place_of_a_directory_is_another_base_not_an_unknown_scheme(tmp_path):
    directory = adapters.base_identity(
        ModelRunConfig(path=str(_write_base(tmp_path / "base", _tensors()))), 0
    )
    preset = adapters.base_identity(ModelRunConfig(path=None, preset="qwen2.5-0.5b"), seed=0)
    assert directory["scheme"] == adapters.CONTENT_SCHEME
    for saved, current in ((directory, preset), (preset, directory)):
        with pytest.raises(ConfigError, match="only fit their own base"):
            adapters.check_same_base(saved, current, "w/checkpoints/3", lambda: pytest.fail("legacy read"))


def test_a_base_that_is_not_there_is_named_with_the_directory_a_relative_path_is_read_from(
    tmp_path, monkeypatch
):
    """As `export` / `evaluate` of a LoRA run meet it: the base moved, or the run's relative model.path read
    from another directory (it used to be an AttributeError on None)."""
    _write_base(tmp_path / "run" / "base", _tensors())
    relative = ModelRunConfig(path="base")
    monkeypatch.chdir(tmp_path / "run")
    assert adapters.base_identity(relative, 0)["source"] == "base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for identity in (adapters.base_identity, adapters.legacy_fingerprint):
        with pytest.raises(ConfigError) as e:
            identity(relative, 0)
        assert str(e.value) == (
            f"the LoRA base model.path 'base' does not exist (relative to the current directory, "
            f"{elsewhere}) and is not a packaged model name, and the adapters only fit the base they were "
            f"trained on. Fix: run this command from the directory `train` ran in, or put the base at "
            f"{elsewhere / 'base'}"
        )
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match=rf"'{gone}' does not exist and .* Fix: put the base at {gone}$"):
        adapters.base_identity(ModelRunConfig(path=str(gone)), 0)
