"""The effect report: token roles from character spans, AUROC / precision / recall against hand counts and a
pairwise count, DCE equal to `dce_from_logits` on full logits of an unpacked forward pass, the HTML's
structure (parsed), the PNG, summary.json, and the `effects` command (--model, and --workdir on the session's
trained run)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextquill_jax.cli import main
from nextquill_jax.config import ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.prepare import prepare
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.data.sources.synth import generate_synthetic
from nextquill_jax.eval.effect_html import NONFINITE_COLOR, render_report
from nextquill_jax.eval.effect_report import (
    ExampleEffects,
    build_effect_report,
    compute_example_effects,
    describe,
    summarize,
    write_report,
)
from nextquill_jax.eval.effect_scoring import auroc, score_roles, target_offsets, token_pieces, token_roles
from nextquill_jax.loss import LossConfig
from nextquill_jax.loss.effects import dce_from_logits, token_logprobs
from nextquill_jax.models import CausalLM, load_pretrained, save_pretrained
from tests.reference.quantile import linear_quantile
from tests.shared import TINY_EOS_ID

SPLIT = "val"
THRESHOLD = 0.0  # a random model's effects are small; this flags about half of the tokens
LOSS = LossConfig(threshold=THRESHOLD, high=0.8, low=0.2)
SOFT = "tests.loss.custom_weighting:soft_weights"
# What summary.json records beside SOFT: the digest of its module's file.
SOFT_SHA256 = hashlib.sha256(
    (Path(__file__).parents[1] / "loss" / "custom_weighting.py").read_bytes()
).hexdigest()


# ---------------------------------------------------------------- token roles


def test_token_roles_word_level_hand_example():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = "The Silent River is superb. Cheers, friends."
    words = ["The", "Silent", "River", "is", "superb", ".", "Cheers", ",", "friends", "<eos>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    spans = [[0, 16, "context"], [20, 26, "context"], [28, 44, "preference"]]
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 9]
    offsets = target_offsets(tok, text, ids, eos_id=9)
    assert offsets == [
        (0, 3),
        (4, 10),
        (11, 16),
        (17, 19),
        (20, 26),
        (26, 27),
        (28, 34),
        (34, 35),
        (36, 43),
        (43, 44),
    ]
    roles = token_roles(offsets, spans)
    assert roles == ["context"] * 3 + ["glue", "context", "glue"] + ["preference"] * 4
    # Pieces carry the spaces the offsets skip, so they join to the text.
    assert "".join(token_pieces(text, offsets)) == text
    # A target cut to max_target_tokens: the offsets of the tokens kept, the rest of the text unused.
    assert target_offsets(tok, text, [*ids[:4], 9], eos_id=9) == [(0, 3), (4, 10), (11, 16), (17, 19)]
    with pytest.raises(ValueError, match="encodes the target differently"):
        target_offsets(tok, text, [0, 1, 3, 9], eos_id=9)
    with pytest.raises(ValueError, match="does not end with EOS"):
        target_offsets(tok, text, ids[:-1], eos_id=9)


def test_token_roles_majority_ties_and_bad_spans():
    spans = [[0, 1, "noise"], [1, 3, "preference"], [3, 4, "context"], [4, 5, "noise"]]
    # (0,3): noise 1 char, preference 2 -> preference; (3,5): context 1, noise 1 -> tie -> context;
    # (6,8): no span -> glue.
    assert token_roles([(0, 3), (3, 5), (6, 8)], spans) == ["preference", "context", "glue"]
    for bad in ([[3, 3, "context"]], [[0, 2, "style"]], [[0, 2]], [[-1, 2, "noise"]]):
        with pytest.raises(ValueError, match="target_spans"):
            token_roles([(0, 1)], bad)
    # A character split over two byte-level tokens (both offsets cover it): the second adds no text.
    assert token_pieces("x\U0001f600y", [(0, 1), (1, 2), (1, 2), (2, 3)]) == ["x", "\U0001f600", "", "y"]


# ---------------------------------------------------------------- AUROC, precision, recall


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 40 + 13 * trial
        scores = rng.integers(0, 6, n).astype(np.float64) / 5  # many ties
        positive = rng.random(n) < 0.3
        pos, neg = scores[positive], scores[~positive]
        pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p, q in itertools.product(pos, neg)]
        assert auroc(scores, positive) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert auroc(np.array([0.1, 0.9, 0.5]), np.array([False, True, False])) == 1.0
    assert auroc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0
    assert auroc(np.array([0.2, 0.2]), np.array([True, False])) == 0.5
    assert auroc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_precision_recall_per_role_hand_counts():
    dce = np.array([0.3, 0.01, 0.2, -0.1, 0.07, 0.0, 0.5])
    roles = ["preference", "preference", "context", "noise", "glue", "preference", "eos"]
    s = score_roles(dce, roles, threshold=0.05)
    # Scored tokens 0, 1, 2, 3, 5; flagged among them: 0 (preference) and 2 (context).
    assert (s["tokens_scored"], s["preference_tokens"], s["flagged"], s["true_positives"]) == (5, 3, 2, 1)
    assert s["precision"] == pytest.approx(1 / 2)
    assert s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(0.4)
    # Preference (0.3, 0.01, 0.0) against (0.2, -0.1): 4 of 6 pairs ordered correctly.
    assert s["auroc"] == pytest.approx(4 / 6)
    assert s["per_role"]["preference"] == {
        "tokens": 3,
        "flagged": 1,
        "flagged_fraction": 1 / 3,
        "mean_dce": pytest.approx(0.31 / 3),
    }
    assert s["per_role"]["glue"]["flagged"] == 1 and s["per_role"]["eos"]["flagged"] == 1
    assert s["per_role"]["noise"]["flagged_fraction"] == 0.0
    none_flagged = score_roles(dce, roles, threshold=0.9)
    assert none_flagged["precision"] is None and none_flagged["recall"] == 0.0
    # Flagged means DCE > δ: the context token at exactly δ is not flagged (0.2 > 0.2 is false).
    at_threshold = score_roles(dce, roles, threshold=0.2)
    assert (at_threshold["flagged"], at_threshold["true_positives"]) == (1, 1)  # token 0 (0.3) alone
    # Only a context token flagged: precision 0 of 1, recall 0 of 2, so F1 0 (defined), not None.
    wrong_only = score_roles(np.array([0.0, 0.0, 0.6, 0.0]), roles[:4], threshold=0.5)
    assert (wrong_only["precision"], wrong_only["recall"], wrong_only["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown roles"):
        score_roles(dce[:1], ["style"], threshold=0.0)


def test_a_token_inside_text_already_covered_adds_nothing_and_the_next_starts_where_coverage_ends():
    """`token_pieces` continues from the furthest end covered so far: a token ending before it (its
    characters covered by an earlier, longer token) adds '', and the pieces still join to the text."""
    text, offsets = "abcdef", [(0, 4), (1, 2), (4, 6)]
    covered, want = 0, []
    for _, end in offsets:  # restated: the text between the furthest end so far and this end
        want.append(text[covered:end] if end > covered else "")
        covered = max(covered, end)
    assert token_pieces(text, offsets) == want == ["abcd", "", "ef"]
    assert "".join(token_pieces(text, offsets)) == text


def test_auroc_tells_apart_scores_that_differ_by_less_than_a_thousandth():
    """Only equal scores tie: a positive above a negative by 1e-6 is ranked above it (AUROC 1, not 0.5)."""
    scores = np.array([0.1, 0.1 + 1e-6, 0.3, 0.3 + 1e-9])
    positive = np.array([False, True, False, True])
    pos, neg = scores[positive], scores[~positive]
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p, q in itertools.product(pos, neg)]
    assert auroc(scores, positive) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert auroc(scores[:2], positive[:2]) == 1.0


@pytest.mark.parametrize(("n_scores", "n_labels"), [(3, 2), (2, 3)])
def test_auroc_refuses_scores_and_labels_of_different_lengths(n_scores, n_labels):
    with pytest.raises(ValueError, match="differ in shape"):
        auroc(np.linspace(0.0, 1.0, n_scores), np.arange(n_labels) % 2 == 0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_auroc_refuses_an_infinite_or_nan_score(bad):
    with pytest.raises(ValueError, match="scores must be finite"):
        auroc(np.array([0.1, bad, 0.3]), np.array([True, False, False]))


def test_a_role_with_no_tokens_has_no_flagged_fraction_or_mean_and_lengths_must_agree_both_ways():
    """A role none of the tokens has: 0 tokens, 0 flagged, and a fraction and mean of none (None, not 0)."""
    s = score_roles(np.array([0.3, 0.0]), ["preference", "context"], threshold=0.1)
    for role in ("noise", "glue", "eos"):
        assert s["per_role"][role] == {"tokens": 0, "flagged": 0, "flagged_fraction": None, "mean_dce": None}
    with pytest.raises(ValueError, match="3 DCE values but 2 roles"):
        score_roles(np.zeros(3), ["preference", "context"], threshold=0.0)
    with pytest.raises(ValueError, match="2 DCE values but 3 roles"):
        score_roles(np.zeros(2), ["preference", "context", "noise"], threshold=0.0)


@pytest.mark.parametrize(
    ("span", "said"),
    [([0, 2, "noise", "extra"], "expected \\[start, end, role\\]"), ([0, 2.5, "noise"], "need integers")],
)
def test_a_span_of_four_fields_or_a_fractional_end_is_refused_by_name(span, said):
    with pytest.raises(ValueError, match=rf"target_spans\[0\].*{said}"):
        token_roles([(0, 1)], [span])


@pytest.mark.parametrize("role", ["glue", "eos"])
def test_a_span_may_not_claim_the_glue_or_eos_role(role):
    """Spans give ground-truth roles only (preference, context, noise); glue and EOS are what no span is."""
    with pytest.raises(ValueError, match=r"target_spans\[0\].*role must be one of"):
        token_roles([(0, 1)], [[0, 2, role]])


# ---------------------------------------------------------------- a diverged model's non-finite DCE


def _strict_json(path: Path) -> dict:
    """The file's JSON, refusing NaN / Infinity (which `json.loads` would otherwise accept)."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _pairwise_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive score > a negative one), ties one half, counted over every pair."""
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def _effects(index: int, dce: np.ndarray, roles: list[str] | None) -> ExampleEffects:
    """An example of len(dce) tokens whose probabilities are NaN where its DCE is not finite, as a diverged
    model's would be."""
    n = dce.size
    p_without = np.full(n, 0.3, np.float32)
    p_with = np.where(np.isfinite(dce), p_without + dce, np.nan).astype(np.float32)
    return ExampleEffects(
        index=index,
        row={"user_id": f"u{index}", "prompt_with_history": "h", "prompt_without_history": "", "target": "t"},
        token_ids=np.arange(n, dtype=np.int32),
        pieces=[f"t{k}" for k in range(n)],
        p_with=p_with,
        p_without=p_without,
        logp_with=np.log(p_with),
        logp_without=np.log(p_without),
        dce=dce.astype(np.float32),
        weight=np.full(n, 0.1, np.float32),
        roles=roles,
    )


def test_a_report_leaves_nonfinite_dce_out_of_its_numbers_and_counts_them(tmp_path):
    """One NaN and one inf DCE among finite ones: every file is written (summary.json strict JSON), the DCE
    quantiles, AUROC, precision and recall equal those of the finite tokens alone (counted here pairwise and
    by hand), the two tokens are counted, and the page draws them grey."""
    roles = ["preference", "context", "noise", "preference", "glue", "context", "eos"]
    rng = np.random.default_rng(3)
    dce = [rng.uniform(-0.2, 0.3, len(roles)).astype(np.float32) for _ in range(3)]
    dce[0][0], dce[1][1] = np.nan, np.inf  # a preference token and a context token
    results = [_effects(i, d, roles) for i, d in enumerate(dce)]
    summary = write_report(results, LOSS, tmp_path, split="val")
    for path in summary["files"].values():
        assert Path(path).stat().st_size > 0, path
    written = _strict_json(tmp_path / "summary.json")

    values = np.concatenate(dce).astype(np.float64)
    all_roles = np.array(roles * 3)
    finite = np.isfinite(values)
    kept, kept_roles = values[finite], all_roles[finite]
    assert (written["tokens"], written["nonfinite_tokens"]) == (21, 2)
    assert [e["nonfinite_tokens"] for e in written["per_example"]] == [1, 1, 0]
    assert written["preference_bearing"] == int((kept > THRESHOLD).sum())
    assert written["preference_bearing_fraction"] == pytest.approx((kept > THRESHOLD).mean())
    for q in (10, 50, 90):
        assert written["dce"][f"p{q}"] == pytest.approx(linear_quantile(kept, q / 100), abs=1e-12)
    assert (written["dce"]["min"], written["dce"]["max"]) == pytest.approx((kept.min(), kept.max()))
    assert written["dce"]["mean"] == pytest.approx(kept.mean())

    gt = written["ground_truth"]
    scored = np.isin(kept_roles, ["preference", "context", "noise"])
    pos, flagged = kept_roles == "preference", kept > THRESHOLD
    assert (gt["nonfinite_tokens"], gt["tokens_scored"]) == (2, int(scored.sum()))
    assert gt["auroc"] == pytest.approx(_pairwise_auroc(kept[pos], kept[scored & ~pos]), abs=1e-12)
    assert gt["precision"] == pytest.approx((flagged & pos).sum() / (flagged & scored).sum())
    assert gt["recall"] == pytest.approx((flagged & pos).sum() / pos.sum())
    own = dce[0][1:].astype(np.float64)  # example 0 without its NaN token
    own_roles = np.array(roles[1:])
    own_pos, own_neg = own[own_roles == "preference"], own[np.isin(own_roles, ["context", "noise"])]
    assert written["per_example"][0]["auroc"] == pytest.approx(_pairwise_auroc(own_pos, own_neg), abs=1e-12)
    assert written["per_example"][0]["mean_dce"] == pytest.approx(own.mean())
    assert written["per_example"][0]["nll_with"] is None  # its NaN probability: null, not left out

    raw = (tmp_path / "index.html").read_text(encoding="utf-8")
    spans = re.findall(r'<span class="(tok[^"]*)" style="background:(#[0-9a-f]{6});', raw)
    assert len(spans) == 21
    grey = [k for k, (classes, _) in enumerate(spans) if "nonfinite" in classes.split()]
    assert grey == [0, 7 + 1]
    assert all((color == NONFINITE_COLOR) == (k in grey) for k, (_, color) in enumerate(spans))
    assert all("pref" not in spans[k][0].split() for k in grey)  # an inf is not preference-bearing
    assert "with a non-finite DCE left out" in describe(written)


def test_a_dce_at_the_threshold_is_not_preference_bearing_and_ground_truth_counts_its_own_examples():
    """DCE > δ, strictly, in the totals and per example (δ 0.25, exact in float32, so a DCE of exactly δ
    is the case under test); the ground truth's non-finite count is that of the examples with roles (a NaN
    in an example without roles is counted in the totals only)."""
    cfg = LossConfig(threshold=0.25, high=0.8, low=0.2)
    dce = np.array([0.25, 0.75, -1.0], np.float32)
    with_roles = _effects(0, dce, ["preference", "context", "noise"])
    without_roles = _effects(1, np.array([0.5, np.nan], np.float32), None)
    summary = summarize([with_roles, without_roles], cfg)
    above = [float(d) > 0.25 for d in dce]  # the plain statement: 1 of the 3
    assert summary["per_example"][0]["preference_bearing"] == sum(above) == 1
    assert summary["preference_bearing"] == sum(above) + 1  # example 1's 0.5
    assert (summary["nonfinite_tokens"], summary["ground_truth"]["nonfinite_tokens"]) == (1, 0)
    assert summary["ground_truth"]["examples"] == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_a_report_stopped_part_way_leaves_no_summary_standing_for_it(tmp_path, monkeypatch, processes):
    """The page and the plot were written in place before the new summary.json: a report killed between
    them left the earlier summary beside a new (or torn) page, and `compare` took that summary for the run's
    report. Now summary.json goes first and comes back last, and the earlier page and plot stay whole. In a
    multi-process run, whose processes all write the report, it stays: one would remove what another reads."""
    from nextquill_jax.eval import effect_html, effect_report

    roles = ["preference", "context", "noise"]
    results = [_effects(0, np.array([0.2, -0.1, 0.0], np.float32), roles)]
    write_report(results, LOSS, tmp_path, split="val")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill would stop it, after the plot, before the page

    monkeypatch.setattr(effect_html, "render_report", stopped)
    monkeypatch.setattr(effect_report.jax, "process_count", lambda: processes)
    with pytest.raises(KeyboardInterrupt):
        write_report(results, LOSS, tmp_path, split="test")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    kept = ["summary.json"] if processes > 1 else []
    assert sorted(after) == ["dce_histogram.png", "index.html", *kept]  # no temporary file
    assert after["index.html"] == before["index.html"]


def test_a_report_of_a_model_whose_every_dce_is_nan_is_written_with_null_statistics(tmp_path):
    """Every token NaN (the whole model diverged): the files are still written, each DCE statistic and score
    null, every token counted as non-finite."""
    roles = ["preference", "context", "eos"]
    results = [_effects(i, np.full(3, np.nan), r) for i, r in enumerate((roles, None))]
    summary = write_report(results, LOSS, tmp_path, split="val")
    written = _strict_json(tmp_path / "summary.json")
    assert (written["tokens"], written["nonfinite_tokens"], written["preference_bearing"]) == (6, 6, 0)
    assert set(written["dce"].values()) == {None} and written["preference_bearing_fraction"] is None
    assert written["ground_truth"]["auroc"] is None and written["ground_truth"]["tokens_scored"] == 0
    assert (tmp_path / "dce_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "index.html").read_text(encoding="utf-8").count('class="tok nonfinite') == 6
    assert "median DCE n/a" in describe(summary)


# ---------------------------------------------------------------- the report on a tiny model


@pytest.fixture(scope="module")
def data(tmp_path_factory, save_tiny_tokenizer, tiny_tokenizer):
    root = tmp_path_factory.mktemp("effects")
    generate_synthetic(
        root / "synth", users=3, seed=1, reviews_per_user=5, targets_per_user=3, signature_words=2
    )
    tok_dir = save_tiny_tokenizer(root / "tok")
    cfg = DataConfig(sources=[str(root / "synth" / "synthetic.jsonl")], tokenizer=str(tok_dir), max_history=2)
    prepare(cfg, root / "prep", tokenizer=tiny_tokenizer(), echo=lambda _: None)
    return root


MODEL_SECTION = {
    "preset": "qwen2.5-0.5b",
    "overrides": {
        "vocab_size": 704,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "tie_word_embeddings": False,
        "bos_token_id": TINY_EOS_ID,
        "eos_token_ids": [TINY_EOS_ID],
    },
    "compute_dtype": "float32",
}


@pytest.fixture(scope="module")
def model(data):
    model = CausalLM(ModelRunConfig(**MODEL_SECTION).model_config(), rngs=nnx.Rngs(0))
    # A larger head makes the random model's distributions less flat, so DCE reaches ~1e-3 rather than ~1e-5.
    model.lm_head[...] = model.lm_head[...] * 30
    return model


@pytest.fixture(scope="module")
def report(data, model, tmp_path_factory, tiny_tokenizer):
    indices = [0, 1, 2]
    # 3 examples in rows of 4 per forward pass: one padding row.
    results = compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, indices, LOSS)
    out = tmp_path_factory.mktemp("report")
    summary = write_report(results, LOSS, out, split=SPLIT, source="tiny <model>", max_shown=10)
    return results, summary, out


def test_report_dce_equals_dce_from_full_logits(data, model, report):
    results, _, _ = report
    split = PreparedSplit(data / "prep", SPLIT)
    assert np.abs(np.concatenate([r.dce for r in results])).max() > 5e-4
    # Every stream of every example as its own unpacked sequence (default positions, one segment), padded
    # on the right (causal: padding after a sequence cannot change its logits), in one forward pass.
    examples = [split[r.index] for r in results]
    sequences = [
        np.concatenate([e[f"prompt_{s}"], e["target"]]) for e in examples for s in ("with", "without")
    ]
    ids = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
    for row, seq in zip(ids, sequences, strict=True):
        row[: len(seq)] = seq
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, jnp.asarray(ids))  # [2N, T, V]
    for n, (r, ex) in enumerate(zip(results, examples, strict=True)):
        target = ex["target"]
        np.testing.assert_array_equal(r.token_ids, target)
        logits = {}
        for k, stream in enumerate(("with", "without")):
            start = len(ex[f"prompt_{stream}"]) - 1
            logits[stream] = full[2 * n + k, start : start + len(target)]  # [L, V] predicting target[j]
        labels = jnp.asarray(target)
        want = np.asarray(dce_from_logits(logits["with"], logits["without"], labels))
        np.testing.assert_allclose(r.dce, want, atol=1e-5)
        np.testing.assert_allclose(r.dce, want, rtol=1e-3, atol=1e-8)  # DCE here is ~1e-4: check it closely
        np.testing.assert_allclose(
            np.log(r.p_with), np.asarray(token_logprobs(logits["with"], labels)), atol=1e-4
        )
        for stream in ("with", "without"):
            want_logp = np.asarray(token_logprobs(logits[stream], labels))
            np.testing.assert_allclose(getattr(r, f"logp_{stream}"), want_logp, atol=1e-4)
        np.testing.assert_allclose(r.p_with - r.p_without, r.dce, atol=1e-6)
        np.testing.assert_array_equal(r.weight, np.where(r.dce > THRESHOLD, 0.8, 0.2).astype(np.float32))
        assert len(r.pieces) == len(target) and len(r.roles) == len(target) and r.roles[-1] == "eos"


def test_per_role_nll_is_the_mean_negative_log_probability_of_each_role(report):
    results, summary, _ = report
    roles = np.array([role for r in results for role in r.roles], dtype=object)
    logp = {
        s: np.concatenate([getattr(r, f"logp_{s}") for r in results]).astype(np.float64)
        for s in ("with", "without")
    }
    nll = summary["ground_truth"]["nll"]
    assert set(nll) == set(roles) and sum(v["tokens"] for v in nll.values()) == roles.size
    for role, values in nll.items():
        for stream in ("with", "without"):
            assert values[stream] == pytest.approx(-logp[stream][roles == role].mean(), rel=1e-12)
    for stream in ("with", "without"):
        assert summary["nll"][stream] == pytest.approx(-logp[stream].mean(), rel=1e-12)
    assert len(summary["per_example"]) == len(results)
    for entry, r in zip(summary["per_example"], results, strict=True):  # each example's own, in float64
        for stream in ("with", "without"):
            want = -getattr(r, f"logp_{stream}").astype(np.float64).mean()
            assert entry[f"nll_{stream}"] == pytest.approx(want, rel=1e-12)
        assert entry["preference_bearing"] == (r.dce > THRESHOLD).sum() and entry["tokens"] == r.dce.size
        assert entry["mean_dce"] == pytest.approx(r.dce.astype(np.float64).mean(), rel=1e-6)
        assert entry["max_dce"] == r.dce.max()
        preference = np.asarray(r.roles) == "preference"
        assert ("preference_nll_with" in entry) == bool(preference.any())
        for stream in ("with", "without") if preference.any() else ():
            want = -getattr(r, f"logp_{stream}")[preference].astype(np.float64).mean()
            assert entry[f"preference_nll_{stream}"] == pytest.approx(want, rel=1e-12)
    assert any("preference_nll_with" in entry for entry in summary["per_example"])


def test_token_roles_of_prepared_targets_agree_with_the_spans(report, tiny_tokenizer):
    results, _, _ = report
    for r in results:
        text, spans = r.row["target"], r.row["meta"]["target_spans"]
        char_role = ["glue"] * len(text)
        for start, end, role in spans:
            char_role[start:end] = [role] * (end - start)
        offsets = target_offsets(tiny_tokenizer(), text, r.token_ids, int(r.token_ids[-1]))
        for (start, end), role in zip(offsets, r.roles[:-1], strict=True):
            chars = [c for c in range(start, end) if not text[c].isspace()] or range(start, end)
            assert {char_role[c] for c in chars} == {role}, (text[start:end], role)
        assert {"preference", "context", "noise"} <= set(r.roles)


class _Page(HTMLParser):
    """Collects token spans (class, title, text) and details/pre blocks per example section."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, dict] = {}
        self.current = None
        self.stack: list[str] = []
        self.tags: set[str] = set()
        self.img_src: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.stack.append(tag)
        if tag == "img":
            self.img_src.append(a["src"])
        if tag == "section" and "example" in a.get("class", "").split():
            self.current = self.sections.setdefault(a["id"], {"tokens": [], "details": 0, "pre": []})
        elif self.current is not None and tag == "span" and "tok" in a.get("class", "").split():
            self.current["tokens"].append({"class": a["class"].split(), "title": a["title"], "text": ""})
        elif self.current is not None and tag == "details":
            self.current["details"] += 1
        elif self.current is not None and tag == "pre":
            self.current["pre"].append("")

    def handle_endtag(self, tag):
        self.stack.pop()
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current is None or not self.stack:
            return
        if self.stack[-1] == "span" and self.current["tokens"]:
            self.current["tokens"][-1]["text"] += data
        elif self.stack[-1] == "pre":
            self.current["pre"][-1] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_html_structure(report):
    results, _, out = report
    raw = (out / "index.html").read_text(encoding="utf-8")
    page = _parse(raw)
    assert set(page.sections) == {f"ex-{r.index}" for r in results}
    for r in results:
        section = page.sections[f"ex-{r.index}"]
        tokens = section["tokens"]
        assert len(tokens) == len(r.token_ids)
        assert sum("pref" in t["class"] for t in tokens) == int((r.dce > THRESHOLD).sum())
        assert [("pref" in t["class"]) for t in tokens] == list(r.dce > THRESHOLD)
        assert section["details"] == 2
        assert section["pre"] == [r.row["prompt_with_history"], r.row["prompt_without_history"]]
        # The escaped token texts read back as the target, then the EOS token's own text.
        assert "".join(t["text"] for t in tokens) == r.row["target"] + "<|endoftext|>"
        for t, dce, role in zip(tokens, r.dce, r.roles, strict=True):
            assert float(t["title"].split()[1]) == pytest.approx(float(dce), rel=5e-3, abs=5e-5)
            assert t["title"].endswith(f"role {role}")
            assert f"gt-{role}" in t["class"]
    # Text is escaped: the prompts' special tokens and the model name appear only as entities.
    assert "<|im_start|>" not in raw and "&lt;|im_start|&gt;" in raw
    assert "tiny <model>" not in raw and "tiny &lt;model&gt;" in raw
    assert "http://" not in raw and "https://" not in raw  # nothing external
    assert page.tags <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "div", "span", "table", "tr", "th",
        "td", "img", "a", "section", "details", "summary", "pre", "label", "input", "script",
    }  # fmt: skip


def test_html_escapes_hostile_text():
    n = 3
    row = {
        "user_id": "<u>x</u>",
        "category": "<b>cat</b>",
        "prompt_with_history": "<script>alert(1)</script> & more",
        "prompt_without_history": '"quoted" <i>',
        "target": "ignored",
    }
    r = ExampleEffects(
        index=7,
        row=row,
        token_ids=np.arange(n, dtype=np.int32),
        pieces=["<script>", 'a&b"', "</span>"],
        p_with=np.full(n, 0.5, np.float32),
        p_without=np.full(n, 0.25, np.float32),
        logp_with=np.full(n, np.log(0.5), np.float32),
        logp_without=np.full(n, np.log(0.25), np.float32),
        dce=np.array([0.25, -0.1, 0.0], np.float32),
        weight=np.array([0.9, 0.1, 0.1], np.float32),
        roles=None,
    )
    summary = {"split": "x<y", "model": "<m>", **summarize([r], LossConfig())}
    raw = render_report([r], summary, threshold=0.05, histogram_png_base64=base64.b64encode(b"png"))
    page = _parse(raw)
    assert (
        "script" not in page.tags and "u" not in page.tags and "b" not in page.tags and "i" not in page.tags
    )
    section = page.sections["ex-7"]
    assert [t["text"] for t in section["tokens"]] == r.pieces
    assert section["pre"] == [row["prompt_with_history"], row["prompt_without_history"]]
    assert [("pref" in t["class"]) for t in section["tokens"]] == [True, False, False]
    # DCE > δ, strictly: at δ = 0 the last token's DCE of exactly 0 is not underlined.
    at_zero = _parse(render_report([r], summary, threshold=0.0, histogram_png_base64=b"")).sections["ex-7"]
    assert [("pref" in t["class"]) for t in at_zero["tokens"]] == [True, False, False]
    # The spread is the population standard deviation of the DCEs, as NumPy's default states it.
    assert summary["dce"]["std"] == pytest.approx(np.std(np.float64([0.25, -0.1, 0.0])), rel=1e-6)


def test_the_dce_colours_are_the_diverging_scale_at_its_ends_and_middle():
    """ColorBrewer's 7-class RdBu by hand: DCE -vmax is its blue end, 0 its middle grey, +vmax its red end,
    vmax / 3 the first step above the middle (position (t + 1) / 2 * 6 = 4), and values past ±vmax clip."""
    from nextquill_jax.eval.effect_html import dce_color

    assert [dce_color(v, 0.3) for v in (-0.3, 0.0, 0.3, 0.1, 5.0, -5.0)] == [
        "#2166ac", "#f7f7f7", "#b2182b", "#fddbc7", "#b2182b", "#2166ac",
    ]  # fmt: skip


def test_the_terminal_lines_say_one_example_and_one_token_in_the_singular():
    one = np.ones(1, np.float32)
    r = ExampleEffects(
        index=0,
        row={"user_id": "u"},
        token_ids=np.zeros(1, np.int32),
        pieces=["a"],
        p_with=0.5 * one,
        p_without=0.25 * one,
        logp_with=np.log(0.5) * one,
        logp_without=np.log(0.25) * one,
        dce=0.25 * one,
        weight=one,
        roles=None,
    )
    cfg = LossConfig()
    summary = {"split": "val", "files": {"html": "r.html"}, **summarize([r], cfg)}
    assert describe(summary).splitlines() == [  # it said "1 examples of split val: 1 target tokens"
        f"1 example of split val: 1 target token, 1 preference-bearing (DCE > {cfg.threshold:g}), median DCE "
        "+0.2500",
        "report: r.html",
    ]


def test_the_terminal_lines_give_the_median_and_the_ground_truth_scores_counted_by_hand():
    """DCE 0.3, 0.1, -0.2, 0.05 for preference, context, noise, preference tokens at δ 0: the median is
    0.075 (the mean, 0.0625, is not it); 3 flagged, 2 of them preference: precision 2/3, recall 2/2; AUROC:
    3 of the 4 (preference, other) pairs ordered, 0.75; all 4 tokens have a scored role."""
    roles = ["preference", "context", "noise", "preference"]
    r = _effects(0, np.array([0.3, 0.1, -0.2, 0.05], np.float32), roles)
    summary = {"split": "val", "files": {"html": "r.html"}, **summarize([r], LOSS)}
    assert describe(summary).splitlines() == [
        "1 example of split val: 4 target tokens, 3 preference-bearing (DCE > 0), median DCE +0.0750",
        "against the ground truth (4 role tokens): precision 0.667, recall 1.000, DCE AUROC 0.750",
        "report: r.html",
    ]


def test_histogram_png(report):
    _, summary, out = report
    from PIL import Image

    png = (out / "dce_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "dce_histogram.png") as image:
        image.verify()
    with Image.open(out / "dce_histogram.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 150
    page = _parse((out / "index.html").read_text(encoding="utf-8"))
    assert page.img_src == ["data:image/png;base64," + base64.b64encode(png).decode("ascii")]
    assert summary["files"]["histogram"] == str((out / "dce_histogram.png").absolute())


def test_summary_json(report):
    results, summary, out = report
    written = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(summary))
    dce = np.concatenate([r.dce for r in results]).astype(np.float64)
    roles = np.array([role for r in results for role in r.roles])
    assert written["split"] == SPLIT and written["examples"] == [0, 1, 2] and written["examples_shown"] == 3
    assert written["tokens"] == dce.size == sum(len(r.token_ids) for r in results)
    assert written["preference_bearing"] == int((dce > THRESHOLD).sum())
    want_loss = {"threshold": THRESHOLD, "high": 0.8, "low": 0.2, "weighting": None, "weighting_sha256": None}
    assert written["loss"] == want_loss
    assert written["dce"]["p50"] == pytest.approx(float(np.median(dce)), abs=1e-7)
    gt = written["ground_truth"]
    scored = np.isin(roles, ["preference", "context", "noise"])
    pos = roles == "preference"
    flagged = dce > THRESHOLD
    assert gt["examples"] == 3 and gt["tokens_scored"] == int(scored.sum())
    assert gt["precision"] == pytest.approx((flagged & pos).sum() / (flagged & scored).sum())
    assert gt["recall"] == pytest.approx((flagged & pos).sum() / pos.sum())
    p, q = dce[pos], dce[scored & ~pos]
    pairwise = ((p[:, None] > q[None, :]).sum() + 0.5 * (p[:, None] == q[None, :]).sum()) / (p.size * q.size)
    assert gt["auroc"] == pytest.approx(pairwise, abs=1e-12)
    for role in ("preference", "context", "noise", "glue", "eos"):
        assert gt["per_role"][role]["tokens"] == int((roles == role).sum())
        assert gt["per_role"][role]["flagged"] == int((flagged & (roles == role)).sum())
    assert [e["index"] for e in written["per_example"]] == [0, 1, 2]
    assert [e["tokens"] for e in written["per_example"]] == [len(r.token_ids) for r in results]


def test_the_first_examples_are_at_most_the_split_and_each_entry_names_its_user_and_category(
    data, model, tiny_tokenizer, tmp_path
):
    """`num_examples` past the split's size (the command's default 8 on a smaller split) or None takes every
    example. Each example's entry names the user and category of its row in `<split>.jsonl`."""
    rows = [json.loads(line) for line in (data / "prep" / f"{SPLIT}.jsonl").read_text().splitlines()]
    n = len(rows)
    for num in (n + 5, None):
        summary = build_effect_report(
            model, tiny_tokenizer(), data / "prep", SPLIT, tmp_path / str(num), LOSS, num_examples=num
        )
        assert summary["examples"] == list(range(n)), num
    for entry in summary["per_example"]:
        row = rows[entry["index"]]
        assert (entry["user_id"], entry["category"]) == (row["user_id"], row["category"])
    assert {entry["category"] for entry in summary["per_example"]} != {None}


def test_a_split_of_ids_past_the_models_vocabulary_is_refused_naming_where_its_size_comes_from(
    data, tiny_tokenizer, tmp_path
):
    """The error names `vocab_origin` (where the caller read the vocabulary size), else the model `source`."""
    overrides = {**MODEL_SECTION["overrides"], "vocab_size": 64}
    small = CausalLM(
        ModelRunConfig(**{**MODEL_SECTION, "overrides": overrides}).model_config(), rngs=nnx.Rngs(0)
    )
    for origin, named in (("its config.json", "its config.json"), (None, "the model tiny")):
        with pytest.raises(ConfigError, match=rf"vocab_size is 64 \(from {named}\)"):
            build_effect_report(
                small,
                tiny_tokenizer(),
                data / "prep",
                SPLIT,
                tmp_path,
                LOSS,
                source="tiny",
                vocab_origin=origin,
            )


def test_effects_command_with_model_dir(data, model, report, tmp_path, capsys):
    results, _, _ = report
    model_dir = save_pretrained(model, tmp_path / "model")
    out = tmp_path / "out"
    args = ["effects", "--model", str(model_dir), "--data", str(data / "prep"), "--split", SPLIT]
    # Every example of the split, out of order (several forward passes: the test after this one).
    chosen = [2, 0, 1]
    picked = ["--examples", "2,0,1", "--max-shown", "2", "--threshold", str(THRESHOLD)]
    assert main([*args, *picked, "--out", str(out)]) == 0
    assert "DCE AUROC" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == chosen and summary["loss"]["threshold"] == THRESHOLD
    assert summary["examples_shown"] == 2
    assert set(_parse((out / "index.html").read_text(encoding="utf-8")).sections) == {"ex-2", "ex-0"}
    assert summary["loss"]["high"] == LossConfig().high
    by_index = {r.index: r for r in results}
    assert [e["index"] for e in summary["per_example"]] == chosen
    for entry in summary["per_example"]:
        r = by_index[entry["index"]]
        assert entry["tokens"] == len(r.token_ids)
        assert entry["mean_dce"] == pytest.approx(float(r.dce.mean()), abs=1e-7)
        assert entry["max_dce"] == pytest.approx(float(r.dce.max()), abs=1e-7)
    assert main([*args, "--examples", "0,99", "--out", str(out)]) == 1
    said = capsys.readouterr().err
    assert "outside split 'val'" in said and "Fix: choose examples in 0.." in said and "--examples" in said
    assert main(["effects", "--model", str(model_dir), "--out", str(out)]) == 1
    assert "--model needs --data PREPARED_DIR (the examples to report on). Fix: pass --data" in (
        capsys.readouterr().err
    )


def test_effects_in_several_padded_passes_equal_those_of_one_pass(data, model, report, tiny_tokenizer):
    """Three examples in rows of 2: two forward passes, the second padded, give each example the effects of
    the one pass of `report` (rows of 4); an example named twice would count twice, so it is refused."""
    results, _, _ = report
    by_index = {r.index: r for r in results}
    passes = compute_example_effects(
        model, tiny_tokenizer(), data / "prep", SPLIT, [2, 0, 1], LOSS, batch_rows=2
    )
    assert [r.index for r in passes] == [2, 0, 1]
    # DCE is a difference of two log-probabilities near -log(vocabulary); other padding gives other matmul
    # shapes and so other rounding of each: 4 float32 ulps at that magnitude (one is 4.8e-7 here).
    ulp = float(np.spacing(np.float32(np.log(len(tiny_tokenizer())))))
    for r in passes:
        np.testing.assert_allclose(r.dce, by_index[r.index].dce, rtol=0, atol=4 * ulp)
    with pytest.raises(ValueError, match=r"example indices \[0, 1, 0\] name an example more than once"):
        compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [0, 1, 0], LOSS)


def test_the_chosen_examples_and_rows_are_checked_and_row_lengths_are_multiples_of_64(
    data, model, tiny_tokenizer
):
    """The first index past the split is outside it (it was read as an example), a batch of 0 rows is
    refused by name, and each stream's length, and the response slots, round up to a multiple of 64 (one
    compiled shape for similar examples), from the longest prompt + target of each stream."""
    from nextquill_jax.data.assemble import RowShape
    from nextquill_jax.eval.effect_tokens import one_example_rows

    n = len(PreparedSplit(data / "prep", SPLIT))
    with pytest.raises(
        ValueError, match=rf"^example indices \[{n}\] outside split 'val' of .* \(0\.\.{n - 1}\)"
    ):
        compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [n], LOSS)
    with pytest.raises(ValueError, match=r"^batch_rows must be >= 1, got 0$"):
        compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [0], LOSS, batch_rows=0)
    sizes = [(70, 10, 5), (3, 60, 65)]  # prompt_with, prompt_without, target
    arrays = [
        {"prompt_with": np.zeros(w), "prompt_without": np.zeros(o), "target": np.zeros(t)}
        for w, o, t in sizes
    ]
    # with: max(75, 68) -> 128; without: max(15, 125) -> 128; response slots: max(5, 65) -> 128
    assert one_example_rows(arrays) == RowShape(128, 128, 128)
    assert one_example_rows(arrays[:1]) == RowShape(128, 64, 64)  # 75, 15, 5


def test_a_negative_example_index_and_an_empty_choice_are_refused(data, model, tiny_tokenizer):
    """Indices are positions 0..N-1 in the split: -1 (which Python would read as the last example) is
    outside it, and choosing no example is an error, not an empty report."""
    n = len(PreparedSplit(data / "prep", SPLIT))
    outside = rf"^example indices \[-1\] outside split 'val' of .* \(0\.\.{n - 1}\)"
    with pytest.raises(ValueError, match=outside):
        compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [-1], LOSS)
    with pytest.raises(ValueError, match=r"^no examples chosen$"):
        compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [], LOSS)


def test_row_lengths_already_a_multiple_of_64_are_kept_and_others_rounded_up_to_the_next():
    """`one_example_rows` rounds each stream up to the smallest multiple of 64 at least its longest length: a
    length of exactly 64 or 128 stays, 65 becomes 128."""
    import math

    from nextquill_jax.data.assemble import RowShape
    from nextquill_jax.eval.effect_tokens import one_example_rows

    def up(x):  # the smallest multiple of 64 that is >= x (x >= 1)
        return 64 * math.ceil(x / 64)

    for w, o, t in [(60, 10, 4), (100, 65, 28), (1, 63, 1), (64, 1, 64)]:
        arrays = [{"prompt_with": np.zeros(w), "prompt_without": np.zeros(o), "target": np.zeros(t)}]
        assert one_example_rows(arrays) == RowShape(up(w + t), up(o + t), up(t))
    arrays = [{"prompt_with": np.zeros(60), "prompt_without": np.zeros(10), "target": np.zeros(4)}]
    assert one_example_rows(arrays) == RowShape(64, 64, 64)


def test_the_end_of_sequence_token_is_the_one_the_data_was_prepared_with(data, model, report, tiny_tokenizer):
    """The prepared split records its EOS id; a tokenizer that names another one (a model's config may), by
    id and by text, does not change which token ends each target, nor its piece's text."""
    results, _, _ = report
    tokenizer = tiny_tokenizer()

    class OtherEos:
        eos_token_id = 2  # <|im_end|>, not TINY_EOS_ID
        eos_token = tokenizer.convert_ids_to_tokens(2)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    (got,) = compute_example_effects(model, OtherEos(), data / "prep", SPLIT, [0], LOSS)
    assert got.token_ids[-1] == TINY_EOS_ID
    assert (
        got.pieces[-1] == tokenizer.convert_ids_to_tokens(TINY_EOS_ID) != tokenizer.convert_ids_to_tokens(2)
    )
    np.testing.assert_allclose(got.dce, results[0].dce, rtol=0, atol=1e-6)


def test_a_weighting_of_the_loss_config_gives_the_reported_weights(data, model, report, tiny_tokenizer):
    """The report's ω is the one training uses: with `loss.weighting`, that function's weights of each
    token's DCE (float64 here), not λ/ε."""
    from tests.loss.custom_weighting import TAU

    loss = dataclasses.replace(LOSS, weighting="tests.loss.custom_weighting:soft_weights")
    for r in compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [0, 1], loss):
        dce = r.dce.astype(np.float64)
        want = 0.2 + 0.6 / (1 + np.exp(-(dce - THRESHOLD) / TAU))
        np.testing.assert_allclose(r.weight, want, rtol=1e-6)
        assert not np.isin(r.weight, [0.2, 0.8]).all()  # not the step weights


def test_a_report_of_a_weighting_names_it_instead_of_the_step_weights(data, model, tiny_tokenizer, tmp_path):
    """summary.json and the page's overview say which function gave the tokens' ω: the page's "δ / λ / ε"
    (0 / 0.8 / 0.2) would state step weights that no token has."""
    loss = dataclasses.replace(LOSS, weighting="tests.loss.custom_weighting:soft_weights")
    results = compute_example_effects(model, tiny_tokenizer(), data / "prep", SPLIT, [0], loss)
    summary = write_report(results, loss, tmp_path / "out", split=SPLIT)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())["loss"]
    assert (written["weighting"], written["weighting_sha256"]) == (loss.weighting, SOFT_SHA256)
    raw = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "δ / λ / ε" not in raw
    assert f"<td class=l>δ / ω</td><td>{THRESHOLD:g} / {loss.weighting} (loss.weighting)</td>" in raw, raw
    assert summary["loss"]["weighting"] == loss.weighting


def test_effects_command_takes_a_weighting_for_a_model_path(data, model, tmp_path):
    """--weighting gives a report of --model the function's weights (it had the paper's λ / ε alone)."""
    model_dir = save_pretrained(model, tmp_path / "model")
    out = tmp_path / "out"
    argv = ["effects", "--model", str(model_dir), "--data", str(data / "prep"), "--split", SPLIT]
    assert main([*argv, "--examples", "0", "--weighting", SOFT, "--out", str(out)]) == 0
    loss = LossConfig(weighting=SOFT)
    assert json.loads((out / "summary.json").read_text())["loss"] == {
        "threshold": loss.threshold, "high": loss.high, "low": loss.low, "weighting": SOFT,
        "weighting_sha256": SOFT_SHA256,
    }  # fmt: skip
    assert f"{loss.threshold:g} / {SOFT} (loss.weighting)" in (out / "index.html").read_text(encoding="utf-8")


def test_effects_weighting_replaces_the_runs_as_threshold_replaces_its_threshold(trained_run, tmp_path):
    """With --workdir, --weighting replaces the run's loss.weighting (null) and keeps its δ, λ, ε, as
    --threshold replaces its δ; the run's variant (context_sft, which weights no token by DCE and so may not
    set a weighting) does not refuse it."""
    out = tmp_path / "out"
    argv = ["effects", "--workdir", str(trained_run.workdir), "--split", "test", "--examples", "0"]
    assert main([*argv, "--weighting", SOFT, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == {
        "threshold": 0.0, "high": 0.8, "low": 0.2, "weighting": SOFT, "weighting_sha256": SOFT_SHA256
    }  # fmt: skip


def test_effects_prints_restore_models_weighting_warning_unless_weighting_replaces_it(
    trained_run, tmp_path, capsys, monkeypatch
):
    """The warning `restore_model` gives for a run whose `loss.weighting` module changed since its checkpoint
    (tests/train/test_resume.py builds one) goes to stderr: the report's ω come from that module. With
    --weighting the report does not use the module, and says nothing of it."""
    from nextquill_jax.train import workdir as workdir_module

    note = "warning: loss.weighting m:f: its module /m.py has changed since checkpoint c was saved (...)"
    restore = workdir_module.restore_model
    monkeypatch.setattr(
        workdir_module,
        "restore_model",
        lambda *a, **k: dataclasses.replace(restore(*a, **k), weighting_note=note),
    )
    argv = ["effects", "--workdir", str(trained_run.workdir), "--split", "test", "--examples", "0"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert note in capsys.readouterr().err
    assert main([*argv, "--weighting", "none", "--out", str(tmp_path / "b")]) == 0
    assert note not in capsys.readouterr().err


def test_effects_of_a_fixed_dce_run_notes_whose_effects_the_report_shows(trained_run, tmp_path, capsys):
    """A `dce: fixed` run trained on its reference model's effects; the report gives the reported model's
    own, which an audit found differing on 23 of 414 tokens' flags, and said nothing. It says so now."""
    import shutil

    from tests.conftest import as_saved_with

    workdir = tmp_path / "fixed"
    shutil.copytree(trained_run.workdir, workdir)
    as_saved_with(
        workdir, "loss", variant="nextquill", dce="fixed", reference_model=str(trained_run.exported)
    )
    argv = ["effects", "--workdir", str(workdir), "--split", "test", "--examples", "0"]
    assert main([*argv, "--out", str(tmp_path / "report")]) == 0
    assert (
        "note: this run's loss.dce is fixed: its training weighted tokens by the effects of its reference "
        f"model, not of the model it trains; this report's DCE, flags and ω are the reported model's own "
        f"(report {trained_run.exported} itself on this run's data for those: `--workdir` for a training "
        "workdir, else `--model ... --data`)"
    ) in capsys.readouterr().err


def test_effects_command_with_training_workdir(trained_run, tmp_path, capsys):
    """The session's trained run (tests/conftest.py): the command restores the checkpoint's parameters from
    Orbax and uses the run's loss settings and prepared data; its DCE equals that of the same weights loaded
    from the run's export."""
    from transformers import AutoTokenizer

    workdir, out = trained_run.workdir, tmp_path / "out"
    assert main(["effects", "--workdir", str(workdir), "--split", "test", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == f"{workdir} step 2"
    # the run's, not the defaults
    assert summary["loss"] == {
        "threshold": 0.0, "high": 0.8, "low": 0.2, "weighting": None, "weighting_sha256": None
    }  # fmt: skip
    assert summary["examples"] == [0, 1, 2, 3, 4]  # every example: the split has 5, fewer than --num-examples
    loss_cfg = LossConfig(threshold=0.0, high=0.8, low=0.2)
    tokenizer = AutoTokenizer.from_pretrained(trained_run.exported)
    exported = load_pretrained(trained_run.exported)
    results = compute_example_effects(exported, tokenizer, workdir / "prepared", "test", range(5), loss_cfg)
    # Two steps from random weights leave DCE ~1e-5: compare relative to that, mean and maximum per example.
    got = [(e["mean_dce"], e["max_dce"]) for e in summary["per_example"]]
    want = [(float(r.dce.mean()), float(r.dce.max())) for r in results]
    assert np.abs(want).max() > 1e-6  # the comparison sees effects
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert main(["effects", "--workdir", str(workdir), "--step", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no complete checkpoint for step 3" in err and "[2]. Fix: choose one of those steps" in err, err
    assert main(["effects", "--workdir", str(tmp_path), "--out", str(out)]) == 1
    assert "is not a training workdir" in capsys.readouterr().err
    assert main(["effects", "--workdir", str(workdir), "--out", str(out)]) == 1  # the default split, val
    err = capsys.readouterr().err
    assert f"{workdir}'s data {workdir / 'prepared'} holds no prepared 'val' split" in err, err
    assert "it holds train, test). Fix: pass --split train or test, or add records of the 'val'" in err, err


@pytest.mark.parametrize(
    ("lora", "path", "advice"),
    [
        ({"init_from": None}, "base_dir", "(`--step 0` reports the base's (its adapters off, as "),
        (
            {"init_from": "adapters"},
            "base_dir",
            "(`--model base_dir --data prepared` reports the base's; `--step 0`",
        ),
        (
            {"init_from": "adapters"},
            None,
            "(no flag reports the base alone (a preset initialised from train.seed",
        ),
    ],
)
def test_the_fixed_dce_note_names_a_way_to_report_the_base_alone(lora, path, advice):
    """`reference_model: base` is the frozen base with its adapters off; a run whose adapters start from
    model.lora.init_from has them on at step 0, which the note advised all the same."""
    from types import SimpleNamespace

    from nextquill_jax.eval.command import _fixed_dce_note

    cfg = SimpleNamespace(
        loss=SimpleNamespace(reference_model="base"),
        model=SimpleNamespace(lora=SimpleNamespace(**lora), path=path),
    )
    assert advice in _fixed_dce_note(cfg, Path("prepared"))


def test_the_colour_scale_interpolates_and_rounds_between_its_stops_and_dce_prints_small_values_apart():
    """Between the stops, by hand: DCE 0.05 of vmax 0.3 is position (1/6 + 1) / 2 * 6 = 3.5, halfway from
    (247, 247, 247) to (253, 219, 199): (250, 233, 223); DCE 0.01 is position 3.1: (247.6, 244.2, 242.2),
    rounded to (248, 244, 242), not truncated. DCE text: 4 decimals from 1e-3 up and for 0, 3 significant
    digits below. Mutations that survived before: the interpolation fraction dropped, `round` -> `int` in
    `_hex`, `>= 1e-3` -> `> 1e-3`, the `value == 0` case dropped."""
    from nextquill_jax.eval.effect_html import _dce, dce_color

    assert dce_color(0.05, 0.3) == "#fae9df"
    assert dce_color(0.01, 0.3) == "#f8f4f2"
    assert [_dce(v) for v in (1e-3, -1e-3, 0.0, 5e-4, 0.25)] == [
        "+0.0010",
        "-0.0010",
        "+0.0000",
        "+5.00e-04",
        "+0.2500",
    ]
    assert (_dce(None), _dce(float("nan")), _dce(float("-inf"))) == ("–", "+nan", "-inf")


def test_the_page_scale_tick_text_colours_and_counts_follow_the_drawn_dces():
    """One example of DCEs (0.25, -0.1, 0): the scale's end is the 99th percentile of |DCE| (by hand:
    0.1 + 0.98 * 0.15 = 0.247, NumPy's linear quantile), or |δ| where that is larger (δ = -0.5: 0.5); the
    δ tick sits at (δ / vmax + 1) / 2 of the bar; a token past 0.8 vmax gets white text; only the last
    token (the end token) is `special`; the overview's spread has no sign; no "not finite" row without
    non-finite tokens; the example line counts DCE > δ strictly; the <title> is escaped. Mutations that
    survived before: the text colour always dark, `special` on the first token, the tick at δ / vmax,
    vmax = max |DCE|, `abs(threshold)` -> `threshold`, the not-finite row always shown, the std's sign
    kept, `finite > threshold` -> `>=` in the example line, the <title> unescaped."""
    dce = np.array([0.25, -0.1, 0.0], np.float32)
    r = _effects(7, dce, None)
    summary = {"split": "x<y", "model": "m", **summarize([r], LossConfig())}
    raw = render_report([r], summary, threshold=0.05, histogram_png_base64=b"")
    vmax = float(np.quantile(np.abs(dce.astype(np.float64)), 0.99))
    assert vmax == pytest.approx(0.247, abs=1e-6)
    assert "<span>≤ -0.2470</span><span>0</span><span>≥ +0.2470</span>" in raw
    tick = float(re.search(r'class="thr" style="left:([0-9.]+)%"', raw).group(1))
    assert tick == pytest.approx((0.05 / vmax + 1) / 2 * 100, abs=0.006)  # 60.12
    spans = re.findall(r'<span class="(tok[^"]*)" style="background:#[0-9a-f]{6};color:(#[0-9a-f]{3})"', raw)
    assert spans == [("tok pref", "#fff"), ("tok", "#111"), ("tok special", "#111")]  # 0.25 / 0.247 > 0.8
    std = float(np.std(dce.astype(np.float64)))  # 0.1472
    assert f"<td class=l>DCE mean ± std</td><td>+0.0500 ± {std:.4f}</td>" in raw
    assert "not finite" not in raw and "All 1 scored examples drawn below." in raw
    assert "<title>NextQuill effect report · split x&lt;y</title>" in raw
    at_zero = render_report([r], summary, threshold=0.0, histogram_png_base64=b"")
    assert "3 target tokens · 1 preference-bearing · mean DCE" in at_zero  # 0.0 > 0.0 is false
    below = render_report([r], summary, threshold=-0.5, histogram_png_base64=b"")
    assert "<span>≥ +0.5000</span>" in below


def test_a_page_drawing_some_examples_lists_those_and_offers_the_roles_toggle_if_any_has_roles():
    """Two scored examples, one with roles and one without: drawing both, the roles checkbox and its script
    are there (any example with roles); drawing only the one without roles, neither is, the page says 1 of 2
    are drawn, and the examples table lists only the drawn one. Mutations that survived before: `any` ->
    `all` for the toggle, the table's filter of drawn examples dropped, `<` -> `<=` in the drawn count."""
    with_roles = _effects(0, np.array([0.3, -0.2], np.float32), ["preference", "eos"])
    without_roles = _effects(1, np.array([0.1, 0.0], np.float32), None)
    summary = {"split": "val", "model": "m", **summarize([with_roles, without_roles], LossConfig())}
    both = render_report([with_roles, without_roles], summary, threshold=0.0, histogram_png_base64=b"")
    assert 'id="show-roles"' in both and "<script>" in both
    assert "All 2 scored examples drawn below." in both
    one = render_report([without_roles], summary, threshold=0.0, histogram_png_base64=b"")
    assert 'id="show-roles"' not in one and "<script>" not in one
    assert "1 of 2 scored examples drawn below." in one
    assert re.findall(r'<a href="#ex-(\d+)">', one) == ["1"]
