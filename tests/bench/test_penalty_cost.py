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


def test_across_seeds_gives_each_seeds_paired_mean_their_t_interval_and_the_seed_averaged_bootstrap():
    """Two seeds of a baseline and a variant `v` (and `w`, at seed 0 only): each seed's row value is the
    float64 mean of the per-example differences over the examples finite in both runs, the t interval is
    scipy's over the two seed means, and the interval over the examples is `paired_bootstrap` of each
    example's values averaged over the seeds, leaving out an example NaN at any seed; `w` is left out with a
    note naming its seed."""
    import scipy.stats

    from nextquill_jax.bench.command import benchmarks_dir
    from nextquill_jax.eval.bootstrap import paired_bootstrap

    cost = benchmark_script("penalty_cost")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(benchmarks_dir()))  # penalty_cost.py imports study_report beside it
        report = benchmark_script("study_report")
        base = {
            "cost": np.array([0.8, 0.9, 0.7, 1.0]),
            "cost_preference": np.array([1.2, np.nan, 1.1, 1.3]),
            "greedy_lost": np.array([0.2, 0.1, 0.15, 0.3]),
        }
        shift = {0: np.array([-0.4, -0.35, -0.5, -0.3]), 1: np.array([-0.42, -0.3, -0.45, -0.38])}
        v = {s: {m: base[m] + shift[s] * (0.5 if m == "greedy_lost" else 1.0) for m in base} for s in (0, 1)}
        v[1]["cost_preference"][0] = np.nan  # example 0 has no preference value at seed 1 only
        per_seed = [(0, {"base": base, "v": v[0], "w": v[0]}), (1, {"base": base, "v": v[1]})]
        rows, results = cost.across_rows(per_seed, "base", 1000)
        assert {row["variant"] for row in rows} == {"v"}
        finished = {seed: list(values) for seed, values in per_seed}
        assert report.left_out(results, rows, finished, "base") == ["w: left out, finished in seed 0 only"]
    by_metric = {row["metric"]: row for row in rows}
    assert list(by_metric) == list(cost.PAIRED)
    for measure, row in by_metric.items():
        assert not row["higher_is_better"]
        seed_means = []
        for s in (0, 1):
            keep = np.isfinite(v[s][measure]) & np.isfinite(base[measure])
            seed_means.append(np.mean(v[s][measure][keep] - base[measure][keep]))
        assert row["per_seed"] == pytest.approx(seed_means, abs=1e-12)
        half = scipy.stats.t.ppf(0.975, 1) * np.std(seed_means, ddof=1) / np.sqrt(2)
        assert (row["low"], row["high"]) == pytest.approx(
            (np.mean(seed_means) - half, np.mean(seed_means) + half)
        )
        averaged = (v[0][measure] + v[1][measure]) / 2
        keep = np.isfinite(averaged) & np.isfinite(base[measure])
        expected = paired_bootstrap(averaged[keep], base[measure][keep], resamples=1000)
        assert (row["examples_low"], row["examples_high"]) == pytest.approx((expected.low, expected.high))
        assert row["examples"] == (2 if measure == "cost_preference" else 4)
    # Both seeds' mean differences are equal up to float rounding here: a t interval of no width, no verdict
    # (study_report.no_width; exact equality once let a few ulps of width read as "better").
    assert report.row_verdict(by_metric["cost"]) == "no verdict: the seeds agree exactly"


def write_finished_runs(out, seed: int, names: list[str]) -> None:
    """compare_done.json of each named run with `seed`, as compare leaves it (the settings --across compares
    between seeds)."""
    from nextquill_jax.eval.compare_record import write_done

    for name in names:
        settings = {"train": True, "config": {"clip_norm": 1.0}, "evaluation": {"split": "test"}}
        (out / f"seed{seed}" / name).mkdir(parents=True)
        write_done(
            out / f"seed{seed}" / name / "compare_done.json",
            {"variant": name, "seed": seed, "settings": settings},
        )


def test_across_reads_every_finished_seed_of_the_files_and_refuses_runs_on_other_examples(
    tmp_path, tiny_config, write_config, monkeypatch, capsys
):
    """Two compare files (seed 0 with an untrained variant, seed 1 without it) whose runs' costs are made by
    hand: `--across` prints one table with each seed's mean difference, leaves the untrained variant out with
    a note, and refuses runs whose examples differ (naming them) and `--seed`."""
    from nextquill_jax.bench.command import benchmarks_dir
    from nextquill_jax.eval.compare_table import ExampleKey

    monkeypatch.syspath_prepend(str(benchmarks_dir()))
    cost = benchmark_script("penalty_cost")
    files = []
    for seed, variants in ((0, ["base", "v", "untrained"]), (1, ["base", "v"])):
        out = tmp_path / f"out{seed}"
        spec = {name: {"train": False} if name == "untrained" else {} for name in variants}
        files.append(
            write_config(
                {
                    "compare": {"out": str(out), "baseline": "base", "seeds": [seed], "resamples": 1000},
                    "variants": spec,
                    "base": tiny_config(tmp_path / "data", tmp_path / "unused"),
                },
                tmp_path / f"c{seed}.yaml",
            )
        )
        write_finished_runs(out, seed, variants)
    plain = {"base": [-1.0, -2.0, -1.5], "v": [-1.0, -2.0, -1.5], "untrained": [-3.0, -3.0, -3.0]}
    drop = {"base": [0.5, 0.4, 0.3], "v": [0.25, 0.2, 0.2], "untrained": [1.0, 1.0, 1.0]}

    def example(name: str, i: int, seed: int, key: str) -> dict:
        lost = seed * 0.1 if name == "v" else 0.0
        return {
            "plain": np.array([plain[name][i]]),
            "penalised": np.array([plain[name][i] - drop[name][i] - lost]),
            "top_plain": np.array([True]),
            "top_penalised": np.array([name == "v"]),
            "roles": ["preference"],
            "key": ExampleKey(key, "c"),
            "seen": np.array([True]),
            "logit": np.array([20.0]),
            "unseen_mass": np.array([0.1]),
        }

    keys = {0: ["a", "b", "c"], 1: ["a", "b", "c"]}

    def seed_costs(comparison, seed, names, count, penalty):
        assert penalty == 1.2 and count is None
        return {name: [example(name, i, seed, keys[seed][i]) for i in range(3)] for name in names}

    monkeypatch.setattr(cost, "seed_costs", seed_costs)
    assert cost.main(["--across", *map(str, files)]) == 0
    printed = capsys.readouterr().out
    # v's cost differences: seed 0 -0.25, -0.2, -0.1 (mean -0.1833); seed 1 each 0.1 more (mean -0.0833).
    row = next(line for line in printed.splitlines() if line.startswith("| v, the cost, all target tokens |"))
    assert row.startswith("| v, the cost, all target tokens | -0.1833 | -0.0833 | -0.1333 [")
    greedy = next(line for line in printed.splitlines() if line.startswith("| v, the share of reference"))
    assert "| -1.0000 | -1.0000 | -1.0000 [-1.0000, -1.0000] |" in greedy
    assert greedy.endswith("| no verdict: the seeds agree exactly |")
    assert "- untrained: left out, finished in seed 0 only" in printed
    # One seed, one file: the same pairing as that seed's column, each variant against the baseline.
    assert cost.main([str(files[0])]) == 0
    printed = capsys.readouterr().out
    assert "- v vs base, the cost, all target tokens: less (-0.1833 [" in printed
    assert "- untrained vs base, the cost, all target tokens: more (+0.6000 [" in printed
    assert (
        "- untrained vs base, the share of reference tokens greedy decoding picks without the penalty and "
        "not with it: no significant difference (+0.0000 [+0.0000, +0.0000], 3 examples)"
    ) in printed

    keys[1] = ["a", "x", "c"]
    with pytest.raises(SystemExit) as refused:
        cost.main(["--across", *map(str, files)])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "base (seed 1) does not hold the examples of base (seed 0)" in message
    assert "the first difference at example 1" in message
    with pytest.raises(SystemExit):
        cost.main(["--across", "--seed", "0", *map(str, files)])
    assert "--across reports every seed, as one table: leave out --seed" in capsys.readouterr().err
