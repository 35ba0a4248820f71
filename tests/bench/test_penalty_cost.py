"""benchmarks/penalty_cost.py: the penalised teacher-forced log-probabilities against transformers'
RepetitionPenaltyLogitsProcessor applied position by position in float64, and a run's plain log-probabilities
against the effect report's (`compute_example_effects`, the fused head's own path)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench.test_bench import benchmark_script


def test_penalised_log_probabilities_are_transformers_processor_applied_at_each_position():
    """Position k of the reference: the processor over input_ids = prompt + targets[:k] (the row decoding
    would hold), then a float64 log-softmax. Targets repeat each other and the prompt, so every case of the
    seen set occurs: a prompt token, an earlier target token, a token seen nowhere, negative logits."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    cost = benchmark_script("penalty_cost")
    rng = np.random.default_rng(0)
    V, penalty = 50, 1.2
    prompt = [3, 7, 7, 11, 0]
    targets = [7, 20, 20, 3, 41, 20, 49, 0]
    logits = rng.normal(0.0, 3.0, size=(len(targets), V)).astype(np.float32)
    # Make the reference the argmax at two positions, so that both greedy flags are seen true and false.
    logits[1, targets[1]] = logits[1].max() + 0.5  # 20, not in the row: stays the argmax
    logits[4, targets[4]] = logits[4].max() + 0.5  # 41, not in the row
    logits[3, targets[3]] = logits[3].max() + 0.1  # 3, in the prompt: the penalty may unseat it
    seen = cost.seen_in_row(prompt, targets, V)
    stats = {
        k: np.asarray(v) for k, v in cost.token_statistics(logits, seen, np.asarray(targets), penalty).items()
    }
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for k, y in enumerate(targets):
        row = torch.tensor([prompt + targets[:k]])
        assert set(np.flatnonzero(seen[k])) == set(prompt + targets[:k])
        plain = torch.tensor(logits[k : k + 1], dtype=torch.float64)
        scores = processor(row, plain.clone())
        assert stats["penalised"][k] == pytest.approx(torch.log_softmax(scores, -1)[0, y].item(), abs=2e-6)
        assert stats["plain"][k] == pytest.approx(torch.log_softmax(plain, -1)[0, y].item(), abs=2e-6)
        assert stats["logit"][k] == logits[k, y]
        assert stats["top_plain"][k] == (plain.argmax().item() == y)
        assert stats["top_penalised"][k] == (scores.argmax().item() == y)
        unseen = [v for v in range(V) if v not in set(prompt + targets[:k])]
        want_mass = torch.softmax(plain, -1)[0, unseen].sum().item()
        assert stats["unseen_mass"][k] == pytest.approx(want_mass, abs=2e-6)
    assert stats["top_plain"][[1, 3, 4]].all() and not stats["top_plain"].all()
    assert stats["top_penalised"][[1, 4]].all() and not stats["top_penalised"][3]
    # The penalty moved something: a seen target token (7 at k = 0, in the prompt) changed its probability.
    assert abs(stats["penalised"][0] - stats["plain"][0]) > 1e-3
    one = np.asarray(cost.token_statistics(logits, seen, np.asarray(targets), 1.0)["penalised"])
    np.testing.assert_array_equal(one, stats["plain"])  # penalty 1: unchanged, exactly
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        cost.seen_in_row(prompt, [50], V)


def test_a_runs_plain_log_probabilities_are_the_effect_reports_and_its_summary_is_their_mean(trained_run):
    """The tiny trained run on its test split's first 3 examples: `example_costs`' unpenalised log p(y) equals
    the effect report's log p_h(y) (the fused head's label logit minus its logsumexp), the seen flags are
    the row's tokens, and `run_summary` is the float64 token-weighted mean of the per-token costs."""
    from nextquill_jax.data.prepare import load_fast_tokenizer
    from nextquill_jax.data.prepared_split import PreparedSplit
    from nextquill_jax.eval.effect_tokens import compute_example_effects
    from nextquill_jax.train.workdir import restore_model

    cost = benchmark_script("penalty_cost")
    loaded = restore_model(trained_run.workdir)
    tokenizer = load_fast_tokenizer(loaded.config.data.tokenizer)
    prepared = trained_run.workdir / "prepared"
    indices = [0, 1, 2]
    costs = cost.example_costs(loaded.model, tokenizer, prepared, "test", indices, 1.5)
    effects = compute_example_effects(
        loaded.model, tokenizer, prepared, "test", indices, loaded.config.loss.loss_config()
    )
    data = PreparedSplit(prepared, "test")
    for c, e, i in zip(costs, effects, indices, strict=True):
        np.testing.assert_allclose(c["plain"], e.logp_with, atol=1e-4)
        prompt, target = list(data[i]["prompt_with"]), list(data[i]["target"])
        assert c["seen"].tolist() == [y in prompt + target[:k] for k, y in enumerate(target)]
        assert c["roles"] is None  # generic records carry no ground-truth spans
    every = np.concatenate([c["plain"].astype(np.float64) - c["penalised"] for c in costs])
    summary = cost.run_summary(costs)
    assert summary["cost"] == pytest.approx(every.mean(), rel=1e-12)
    seen = np.concatenate([c["seen"] for c in costs])
    assert summary["cost_seen"] == pytest.approx(every[seen].mean(), rel=1e-12)
    assert summary["seen_share"] == pytest.approx(seen.mean(), rel=1e-12)
    assert summary["cost_preference"] is None
    for key in ("top_plain", "top_penalised", "unseen_mass"):
        assert summary[key] == pytest.approx(np.concatenate([c[key] for c in costs]).mean(), rel=1e-6)
    # A token not in the row keeps its logit while the row's only fall: it never loses probability.
    assert (every[~seen] <= 1e-6).all() and (~seen).any()


def test_the_paired_per_example_measures_are_counted_from_the_token_flags():
    """Two hand-made examples: the mean cost over all tokens and over preference tokens (NaN where an example
    has none, which `main` leaves out of the pairing), and the share of tokens greedy picks without the
    penalty and not with it."""
    cost = benchmark_script("penalty_cost")
    examples = [
        {
            "plain": np.array([-1.0, -2.0, -0.5]),
            "penalised": np.array([-1.5, -2.0, -0.25]),
            "top_plain": np.array([True, True, False]),
            "top_penalised": np.array([False, True, True]),
            "roles": ["preference", "glue", "preference"],
        },
        {
            "plain": np.array([-1.0, -3.0]),
            "penalised": np.array([-2.0, -3.0]),
            "top_plain": np.array([True, False]),
            "top_penalised": np.array([True, False]),
            "roles": None,
        },
    ]
    assert cost.per_example(examples, "cost") == pytest.approx([(0.5 + 0.0 - 0.25) / 3, 1.0 / 2])
    preference = cost.per_example(examples, "cost_preference")
    assert preference[0] == pytest.approx((0.5 - 0.25) / 2) and np.isnan(preference[1])
    assert cost.per_example(examples, "greedy_lost") == pytest.approx([1 / 3, 0.0])
    assert set(cost.PAIRED) == {"cost", "cost_preference", "greedy_lost"}
