"""`loss.weighting`: target weights from a function the config names, against a float64 NumPy statement of
the loss with those weights, through the losses, the train step's micro-batch denominators, evaluation's loss
terms and the config loader; and its refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from nextquill_jax.loss import LossConfig, loss_from_hidden, loss_from_logits
from tests.loss.custom_weighting import TAU

SOFT = "tests.loss.custom_weighting:soft_weights"


def _log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def _soft_loss64(z_with, z_without, labels, cfg: LossConfig) -> float:
    """NEXTQUILL.md's L_n + α L_p in float64 with ω = ε + (λ − ε) σ((DCE − δ)/τ), token-normalised."""
    mask = labels != -100
    safe = np.where(mask, labels, 0)[..., None]
    pick = lambda z: np.take_along_axis(_log_softmax64(z), safe, -1)[..., 0]  # [B, R] log p(y)
    logp_with, logp_without, logp_effect = pick(z_with), pick(z_without), pick(z_with - z_without)
    dce = np.exp(logp_with) - np.exp(logp_without)
    weights = cfg.low + (cfg.high - cfg.low) / (1 + np.exp(-(dce - cfg.threshold) / TAU))
    weights = np.where(mask, weights, 0.0)
    alignment = weights if cfg.weight_alignment else mask.astype(np.float64)
    loss_n = (weights * -logp_with).sum() / weights.sum()
    loss_p = (alignment * -np.where(mask, logp_effect, 0.0)).sum() / alignment.sum()
    return loss_n + cfg.alpha * loss_p


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    z_with = rng.normal(size=(3, 7, 13)).astype(np.float32) * 2
    z_without = z_with + rng.normal(size=(3, 7, 13)).astype(np.float32)  # DCE spread around 0
    labels = rng.integers(0, 13, (3, 7))
    labels[1, 4:] = -100
    return z_with, z_without, labels


@pytest.mark.parametrize("weight_alignment", [False, True])
def test_a_named_weighting_gives_the_loss_of_its_weights(logits, weight_alignment):
    z_with, z_without, labels = logits
    cfg = LossConfig(variant="nextquill", weighting=SOFT, weight_alignment=weight_alignment)
    loss, aux = loss_from_logits(z_with, z_without, labels, cfg)
    want = _soft_loss64(z_with, z_without, labels, cfg)
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)
    hard, _ = loss_from_logits(z_with, z_without, labels, LossConfig(weight_alignment=weight_alignment))
    assert abs(float(hard) - want) > 1e-3  # the weighting took effect: the paper's weights give another loss
    # δ still decides what is counted as preference-bearing
    assert float(aux["pref_count"]) == float(((_dce(z_with, z_without, labels)) > cfg.threshold).sum())


def _dce(z_with, z_without, labels) -> np.ndarray:
    mask = labels != -100
    safe = np.where(mask, labels, 0)[..., None]
    p = lambda z: np.exp(np.take_along_axis(_log_softmax64(z), safe, -1)[..., 0])
    return np.where(mask, p(z_with) - p(z_without), 0.0)


def test_a_named_weighting_gives_a_nan_dce_a_nan_weight_even_where_it_maps_nan_to_a_number():
    """The contract (`token_weights`): a NaN DCE (a label outside a stream's vocabulary) weighs NaN, so the
    loss turns NaN instead of weighting that token silently; a hand-written step maps NaN to ε, and only the
    library's own propagation keeps it (the smoothed step's sigmoid of NaN hid its absence)."""
    import jax.numpy as jnp

    from nextquill_jax.loss.weighting import token_weights

    cfg = LossConfig(variant="nextquill", weighting="tests.loss.custom_weighting:hard_step")
    dce = jnp.asarray([[np.nan, 0.5, 0.01, np.nan]], jnp.float32)
    mask = jnp.asarray([[True, True, True, False]])
    got = np.asarray(token_weights(dce, mask, cfg))
    np.testing.assert_array_equal(got, np.asarray([[np.nan, cfg.high, cfg.low, 0.0]], np.float32))


def test_the_fused_head_path_uses_the_weighting_too(logits):
    """`loss_from_hidden` (the train step's path) equals `loss_from_logits` with the same weighting, value
    and gradient, where the logits are hidden states times the head."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    _, _, labels = logits
    h_with, h_without = (jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32) for _ in range(2))
    head = jnp.asarray(rng.normal(size=(5, 13)), jnp.float32)
    cfg = LossConfig(variant="dce", weighting=SOFT)
    chunks = {"head_layout": "dv", "token_chunk": 8, "vocab_chunk": 8}  # several tiles of each
    fused = lambda w: loss_from_hidden(h_with, h_without, w, labels, cfg, **chunks)[0]
    plain = lambda w: loss_from_logits(h_with @ w, h_without @ w, labels, cfg)[0]
    np.testing.assert_allclose(float(fused(head)), float(plain(head)), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(fused)(head), jax.grad(plain)(head), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, said",
    [
        ("soft_weights", "is not of the form 'module:function'"),
        (":soft_weights", "is not of the form 'module:function'"),  # no module before the colon
        ("tests.loss.custom_weighting:", "is not of the form 'module:function'"),  # nothing after it
        ("tests.loss.no_such_module:soft", "module 'tests.loss.no_such_module' of "),
        ("tests.loss.custom_weighting:soft", "has no attribute 'soft'"),
        ("tests.loss.custom_weighting:NOT_A_FUNCTION", "is a int, not a function"),
    ],
)
def test_a_weighting_that_names_no_function_is_refused_with_the_fix(name, said):
    with pytest.raises(ValueError, match=r"^LossConfig\.weighting: ") as e:
        LossConfig(weighting=name)
    assert said in str(e.value) and "Fix: " in str(e.value), e.value


def test_a_weighting_is_refused_for_a_variant_without_dce_weights_and_a_wrong_shape_is_named(logits):
    with pytest.raises(ValueError, match=r"variant 'context_sft' does not weight tokens by DCE"):
        LossConfig(variant="context_sft", weighting=SOFT)
    from nextquill_jax.config_schema import ConfigError

    # A ConfigError, which the command line prints as its one line with the fix (a ValueError: a traceback)
    cfg = LossConfig(weighting="tests.loss.custom_weighting:one_per_row")
    with pytest.raises(ConfigError, match=r"returned weights of shape \(3,\) for DCE of shape \(3, 7\)"):
        loss_from_logits(*logits, cfg)


def test_a_weighting_that_gives_negative_weights_is_refused_before_training(
    tmp_path, write_random_data, write_config, tiny_config
):
    """A negative ω makes the loss reward what it should penalise: a run with ω = -1 everywhere trained to a
    loss of -4,000 and evaluated at -21,530 without a word. Set-up probes DCE over its range, -1 to 1, first
    (it probed -100 to 100 "nats" and refused (1 + DCE) / 2, which is >= 0 wherever a DCE can be)."""
    from nextquill_jax.config import load_config
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.loss.weighting import check_weighting_values
    from nextquill_jax.train.loop import train

    check_weighting_values(LossConfig(weighting=SOFT))  # finite and >= 0: passes
    check_weighting_values(LossConfig())  # the paper's weights: nothing to probe
    check_weighting_values(LossConfig(weighting="tests.loss.custom_weighting:linear_in_dce"))
    negative = "tests.loss.custom_weighting:negative_below_zero"
    said = (
        rf"^loss\.weighting '{re.escape(negative)}' gives the weight -1 to a target token of DCE -1 "
        r"\(9 of 19 probed DCE values from -1 to 1 get a negative or non-finite weight\)\. Fix: return "
        r"weights that are finite and >= 0 at target slots$"
    )
    with pytest.raises(ConfigError, match=said):
        check_weighting_values(LossConfig(weighting=negative))
    workdir = tmp_path / "work"
    path = write_config(tiny_config(write_random_data(tmp_path / "data"), workdir), tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=said):
        train(load_config(path, [f"loss.weighting={negative}"]), workdir, echo=lambda _: None)
    assert not (workdir / "checkpoints").exists()


def test_the_config_loader_takes_a_weighting_and_names_a_bad_one(tmp_path, tiny_config, write_config):
    from nextquill_jax.config import load_config
    from nextquill_jax.config_schema import ConfigError

    path = write_config(tiny_config(tmp_path / "data", tmp_path / "run"), tmp_path / "run.yaml")
    assert load_config(path, [f"loss.weighting={SOFT}"]).loss.weighting == SOFT
    with pytest.raises(ConfigError, match=r"^command line: .*LossConfig\.weighting: module 'nope' of "):
        load_config(path, ["loss.weighting=nope:f"])


def test_a_run_records_its_weighting_and_a_resume_may_not_change_it(
    tmp_path, write_random_data, write_config, tiny_config, monkeypatch
):
    """config.yaml records the weighting and a resume may not change it; a checkpoint read where the module
    does not import (evaluate, effects, export) is refused naming the checkpoint and how to make the module
    importable (it named "<config>", and as the fix another name, which a saved run may not take)."""
    import sys

    from nextquill_jax.config import load_config
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.loss.config import weighting_function
    from nextquill_jax.train.loop import train
    from nextquill_jax.train.workdir import restore_params

    data = write_random_data(tmp_path / "data", train=16, val=8)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    overrides = [f"loss.weighting={SOFT}", "train.max_steps=1", "checkpoint.every_steps=1"]
    assert train(load_config(path, overrides), tmp_path / "work", echo=lambda _: None).status == "finished"
    assert load_config(tmp_path / "work" / "config.yaml").loss.weighting == SOFT
    changed = overrides[1:]  # the paper's weights instead
    with pytest.raises(ConfigError, match=rf'loss\.weighting: "{re.escape(SOFT)}" -> null'):
        train(load_config(path, changed), tmp_path / "work", echo=lambda _: None)
    monkeypatch.setitem(sys.modules, "tests.loss.custom_weighting", None)  # an import of it fails
    weighting_function.cache_clear()
    saved = re.escape(f"the config saved with checkpoint {tmp_path / 'work' / 'checkpoints' / '1'}: ")
    with pytest.raises(ConfigError, match=rf"^{saved}.*does not import .*Fix: make it importable where"):
        restore_params(tmp_path / "work")


def test_a_weightings_fingerprint_is_the_sha256_of_its_whole_module_file():
    import hashlib
    from pathlib import Path

    from nextquill_jax.loss.weighting_record import weighting_fingerprint

    file = Path(__file__).with_name("custom_weighting.py")
    found = weighting_fingerprint(SOFT)
    assert found == {
        "name": SOFT,
        "module": "tests.loss.custom_weighting",
        "file": found["file"],
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
    }
    assert Path(found["file"]).resolve() == file.resolve()
    assert weighting_fingerprint(None) is None  # the paper's weights
    with pytest.raises(ValueError, match="has no attribute 'soft'"):  # `weighting_function`'s refusals
        weighting_fingerprint("tests.loss.custom_weighting:soft")


def _fresh_module(tmp_path, monkeypatch, source: bytes) -> Path:
    """`source` saved byte for byte as a module of a new name in `tmp_path`, put on the path; its file (the
    module's name is the file's stem)."""
    import uuid

    module = tmp_path / f"weights_{uuid.uuid4().hex}.py"  # imported fresh: no other test has this module
    module.write_bytes(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


def test_a_weightings_fingerprint_changes_with_its_modules_text(tmp_path, monkeypatch):
    """A module on the path whose text changes (a τ in it, the README's way to set a parameter) under the
    same name gets another digest, each that of the file's bytes at the time."""
    import hashlib

    from nextquill_jax.loss.weighting_record import weighting_fingerprint

    module = _fresh_module(
        tmp_path, monkeypatch, b"TAU = 0.02\n\n\ndef weights(dce, mask, cfg):\n    return dce / TAU\n"
    )
    before = weighting_fingerprint(f"{module.stem}:weights")
    assert (
        before["file"] == str(module) and before["sha256"] == hashlib.sha256(module.read_bytes()).hexdigest()
    )
    module.write_text(module.read_text().replace("0.02", "0.05"))
    after = weighting_fingerprint(f"{module.stem}:weights")
    assert after["sha256"] == hashlib.sha256(module.read_bytes()).hexdigest() != before["sha256"]


def test_the_readme_weighting_module_runs_as_named_and_gives_the_smoothed_step(tmp_path, monkeypatch, logits):
    """README's "Your own token weights" module, saved as my_weights.py on the path and named as the
    README names it: the loss of its weights (the float64 statement above, whose τ is the README's 0.02)."""
    from tests.conftest import readme_python_block

    code = readme_python_block("### Your own token weights")
    assert "0.02" in code and TAU == 0.02
    (tmp_path / "my_weights.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = LossConfig(weighting="my_weights:soft_weights")
    loss, _ = loss_from_logits(*logits, cfg)
    np.testing.assert_allclose(float(loss), _soft_loss64(*logits, cfg), rtol=2e-6)


def test_evaluations_loss_terms_and_variants_table_use_the_weighting(
    tmp_path, write_random_data, write_config, tiny_config
):
    """`evaluate`'s loss pass: the run's own loss (its config) equals the `nextquill` row of the variants
    table, which comes from the terms' pass; both take the run's weighting, whose L_n differs from the
    paper's weights' on these tokens (δ 0: soft weights near 0.5 where the step gives 0.8 / 0.2)."""
    import jax
    from flax import nnx

    from nextquill_jax.config import load_config
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.eval.evaluate import split_losses
    from nextquill_jax.train import model_setup
    from nextquill_jax.train.workdir import LoadedModel, build_mesh

    data = write_random_data(tmp_path / "data", train=8, val=8)
    path = write_config(tiny_config(data, tmp_path / "work"), tmp_path / "cfg.yaml")
    split = PreparedSplit(data, "val")

    def losses(*overrides: str) -> dict:
        cfg = load_config(path, ["loss.variant=nextquill", "loss.threshold=0", *overrides])
        mesh = build_mesh(cfg)
        graphdef, params = model_setup.load_params(cfg.model, mesh, seed=0)
        loaded = LoadedModel(nnx.merge(graphdef, params), cfg, mesh, None, "tiny")
        with jax.set_mesh(mesh):
            return split_losses(loaded, split, len(split))

    soft, paper = losses(f"loss.weighting={SOFT}"), losses()
    assert soft["loss"] == pytest.approx(soft["variants"]["nextquill"], rel=1e-6)
    assert soft["variants"]["dce"] == soft["terms"]["loss_n"]
    assert abs(soft["terms"]["loss_n"] - paper["terms"]["loss_n"]) > 1e-4 * paper["terms"]["loss_n"], (
        soft,
        paper,
    )


def _weighting_module(tmp_path, monkeypatch, body: str) -> str:
    """A fresh module on the path defining `weights(dce, mask, cfg)` as `return <body>`; its
    `loss.weighting` name."""
    code = f"import jax.numpy as jnp\n\n\ndef weights(dce, mask, cfg):\n    return {body}\n"
    return f"{_fresh_module(tmp_path, monkeypatch, code.encode()).stem}:weights"


def test_weights_of_the_dces_rank_but_another_shape_are_refused(tmp_path, monkeypatch):
    """One weight per row kept as a trailing axis of 1 ([B, 1] for DCE [B, R]) broadcasts over the row, but
    is not one weight per token: refused by shape, not only by rank."""
    import jax.numpy as jnp

    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.loss.weighting import token_weights

    cfg = LossConfig(weighting=_weighting_module(tmp_path, monkeypatch, "jnp.ones(dce.shape[:-1] + (1,))"))
    dce = jnp.zeros((2, 5), jnp.float32)
    with pytest.raises(ConfigError, match=r"returned weights of shape \(2, 1\) for DCE of shape \(2, 5\)"):
        token_weights(dce, jnp.ones((2, 5), bool), cfg)


def test_named_weights_carry_no_gradient_and_are_float32(tmp_path, monkeypatch):
    """The contract (`token_weights`): no gradient flows through ω to the DCE, although the smoothed step's
    derivative is far from 0 near δ ((λ − ε) σ'(0) / τ = 7.5 at DCE = δ); and ω is float32 even where the
    function returns bfloat16."""
    import jax
    import jax.numpy as jnp

    from nextquill_jax.loss.weighting import token_weights

    dce = jnp.asarray([[0.0, 0.01, -0.02, 0.3]], jnp.float32)
    mask = jnp.ones(dce.shape, bool)
    cfg = LossConfig(variant="nextquill", weighting=SOFT)
    grad = jax.grad(lambda d: token_weights(d, mask, cfg).sum())(dce)
    np.testing.assert_array_equal(np.asarray(grad), np.zeros(dce.shape, np.float32))
    bf16 = LossConfig(weighting=_weighting_module(tmp_path, monkeypatch, "jnp.ones(dce.shape, jnp.bfloat16)"))
    assert token_weights(dce, mask, bf16).dtype == jnp.float32


@pytest.mark.parametrize(
    ("body", "weight", "at"),
    [
        ("1.0 / jnp.abs(dce)", "inf", "0"),  # infinite at DCE 0
        ("jnp.log(dce + 1.0)", "-inf", "-1"),  # log 0 at DCE -1: negative and infinite
        ("jnp.sqrt(dce)", "nan", "-1"),  # NaN below 0
        ("jnp.where((dce > 0) & (dce < 2e-4), -1.0, 1.0)", "-1", "0.0001"),  # negative only near 0
    ],
)
def test_a_weighting_that_gives_non_finite_weights_is_refused_before_training(
    tmp_path, monkeypatch, body, weight, at
):
    """Non-finite weights are refused like negative ones, at the first probed DCE that gives one (the probes:
    -1 .. -1e-4, 0, 1e-4 .. 1 by half decades); a weight negative only for DCE in (0, 2e-4) is found at
    1e-4."""
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.loss.weighting import check_weighting_values

    cfg = LossConfig(weighting=_weighting_module(tmp_path, monkeypatch, body))
    with pytest.raises(ConfigError, match=rf" gives the weight {weight} to a target token of DCE {at} \("):
        check_weighting_values(cfg)


def test_the_recorded_digest_is_the_module_files_sha256():
    """`weighting_sha256`, what evaluation and the effect report record: the module file's SHA-256 (hashlib
    over the file's bytes), None for the paper's weights."""
    import hashlib
    from pathlib import Path

    from nextquill_jax.loss.weighting_record import weighting_sha256

    file = Path(__file__).with_name("custom_weighting.py")
    assert weighting_sha256(SOFT) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert weighting_sha256(None) is None


def test_a_module_imported_from_a_zip_has_no_file_to_fingerprint(tmp_path, monkeypatch):
    """A module whose source is no file on disk (imported from a zip archive): "file" and "sha256" None,
    where reading the path inside the archive would fail."""
    import uuid
    import zipfile

    from nextquill_jax.loss.weighting_record import weighting_fingerprint

    name = f"zipped_{uuid.uuid4().hex}"
    archive = tmp_path / "weights.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{name}.py", "def weights(dce, mask, cfg):\n    return dce * 0 + 1\n")
    monkeypatch.syspath_prepend(str(archive))
    assert weighting_fingerprint(f"{name}:weights") == {
        "name": f"{name}:weights",
        "module": name,
        "file": None,
        "sha256": None,
    }


def test_weighting_note_is_none_where_the_current_run_has_no_digest():
    """No note where the run now has no digest to compare: the paper's weights (`current` None) or a module
    without a source file (its "sha256" None); only two digests that differ give one."""
    from nextquill_jax.loss.weighting_record import weighting_note

    fingerprint = lambda sha: {"name": "w:f", "module": "w", "file": "/src/w.py", "sha256": sha}
    saved = fingerprint("a" * 64)
    assert weighting_note(saved, None, "ckpt/2") is None
    assert weighting_note(saved, fingerprint(None), "ckpt/2") is None
    assert weighting_note(saved, fingerprint("b" * 64), "ckpt/2") is not None


def test_a_named_weighting_is_given_a_fixed_dce_of_0_at_ignored_slots(tmp_path, monkeypatch, logits):
    """The contract hands the function DCE "0 where `mask` is False": a stored reference_dce holds values at
    padding slots too (here 0.7 everywhere), which the function must not see. Recorded by a module that keeps
    what it is given (the loss runs eagerly here, so the arrays are concrete)."""
    import importlib

    code = (
        b"import jax.numpy as jnp\nimport numpy as np\n\nSEEN = []\n\n\ndef weights(dce, mask, cfg):\n"
        b"    SEEN.append((np.asarray(dce), np.asarray(mask)))\n    return jnp.ones_like(dce)\n"
    )
    name = _fresh_module(tmp_path, monkeypatch, code).stem
    z_with, _, labels = logits
    cfg = LossConfig(variant="dce", dce="fixed", weighting=f"{name}:weights")
    reference = np.full(labels.shape, 0.7, np.float32)
    loss_from_logits(z_with, None, labels, cfg, reference_dce=reference)
    ((dce, mask),) = importlib.import_module(name).SEEN
    np.testing.assert_array_equal(mask, labels != -100)
    np.testing.assert_array_equal(dce, np.where(labels != -100, np.float32(0.7), np.float32(0.0)))


def test_weighting_note_compares_whole_digests_not_the_shown_prefix():
    """Two digests that share their first 12 hex digits (the part the note shows) but differ later are two
    module texts: a note, whose shown prefixes are then equal."""
    from nextquill_jax.loss.weighting_record import weighting_note

    fingerprint = lambda sha: {"name": "w:f", "module": "w", "file": "/src/w.py", "sha256": sha}
    saved, current = fingerprint("c" * 12 + "1" * 52), fingerprint("c" * 12 + "2" * 52)
    note = weighting_note(saved, current, "ckpt/3")
    assert note is not None and "(sha256 cccccccccccc -> cccccccccccc)" in note


def test_a_weightings_digest_is_of_the_files_bytes_with_crlf_line_ends(tmp_path, monkeypatch):
    """The digest is hashlib's SHA-256 of the file's bytes as stored: a module saved with CRLF line ends
    (a Windows editor) hashes its CR bytes too, which text-mode reading would drop."""
    import hashlib

    from nextquill_jax.loss.weighting_record import weighting_fingerprint

    raw = b"def weights(dce, mask, cfg):\r\n    return dce * 0 + 1\r\n"
    found = weighting_fingerprint(f"{_fresh_module(tmp_path, monkeypatch, raw).stem}:weights")
    assert found["sha256"] == hashlib.sha256(raw).hexdigest()
    assert found["sha256"] != hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def test_weighting_note_names_the_module_file_the_run_imports_now():
    """Where the checkpoint's module file is not the one imported now (the package reinstalled elsewhere),
    the note names the current file: the code that now weights tokens."""
    from nextquill_jax.loss.weighting_record import weighting_note

    saved = {"name": "w:f", "module": "w", "file": "/old/site/w.py", "sha256": "a" * 64}
    current = {"name": "w:f", "module": "w", "file": "/new/site/w.py", "sha256": "b" * 64}
    note = weighting_note(saved, current, "ckpt/4")
    assert note.startswith(
        "warning: loss.weighting w:f: its module /new/site/w.py has changed since checkpoint "
    )
    assert "/old/site/w.py" not in note


def test_a_weighting_may_name_an_attribute_path_in_its_module():
    """`module:Class.attr` form: the dotted part is followed attribute by attribute (here the module's own
    `jax` import down to `jax.nn.sigmoid`)."""
    import jax

    from nextquill_jax.loss.config import weighting_function

    assert weighting_function("tests.loss.custom_weighting:jax.nn.sigmoid") is jax.nn.sigmoid


def test_a_weighting_that_is_no_string_and_a_switch_that_is_no_bool_are_refused():
    with pytest.raises(ValueError, match=r"LossConfig\.weighting must be a string or None, got 3"):
        LossConfig(weighting=3)
    with pytest.raises(ValueError, match=r"LossConfig\.counterfactual_grad must be a bool, got 1"):
        LossConfig(counterfactual_grad=1)
