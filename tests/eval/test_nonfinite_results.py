"""A diverged run's NaN in the files a comparison writes and reads: the effect report's summary.json,
compare_done.json and results.json are strict JSON (null, no bare NaN), and the comparison reads the nulls
back as NaN: the table shows n/a, and a difference leaves out, and counts, the pairs that are not finite."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from nextquill_jax.data.checksums import file_digest
from nextquill_jax.eval.bootstrap import paired_bootstrap
from nextquill_jax.eval.compare_record import write_done
from nextquill_jax.eval.compare_table import write_results
from nextquill_jax.eval.effect_report import ExampleEffects, write_report
from nextquill_jax.loss import LossConfig

N = 5  # examples per run


def strict_json(path):
    """The file's JSON, refusing NaN / Infinity (which `json.loads` would otherwise accept)."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def effects(index: int, nll_with: float) -> ExampleEffects:
    """One example of 2 tokens whose with-history log-probabilities average to -nll_with."""
    n = 2
    return ExampleEffects(
        index=index,
        row={"user_id": "u", "prompt_with_history": "h", "prompt_without_history": "", "target": "t"},
        token_ids=np.arange(n, dtype=np.int32),
        pieces=["a", "b"],
        p_with=np.full(n, 0.5, np.float32),
        p_without=np.full(n, 0.25, np.float32),
        logp_with=np.full(n, -nll_with, np.float32),
        logp_without=np.full(n, np.log(0.25), np.float32),
        dce=np.array([0.25, -0.1], np.float32),
        weight=np.array([0.9, 0.1], np.float32),
        roles=None,
    )


def run_files(
    root,
    name: str,
    rouge: list[float],
    nll: list[float],
    bleu: float,
    ids: list[str] | None = None,
    targets: list[str] | None = None,
) -> dict:
    """A finished run's files (predictions, the metrics.json beside them, rendered split, effect report,
    compare_done.json) as a comparison leaves them, example i of its split with id `ids[i]` (default `e<i>`)
    and, where given, target text `targets[i]` (default: rows without one); returns its record as read back
    from compare_done.json."""
    ids = ids or [f"e{i}" for i in range(len(rouge))]
    run = root / name
    eval_dir = run / "eval" / "test"  # as `compare.run_variant` lays it out
    eval_dir.mkdir(parents=True)
    written_bleu = None if math.isnan(bleu) else bleu  # as strict_json writes a diverged run's NaN
    (eval_dir / "metrics.json").write_text(json.dumps({"overall": {"bleu": written_bleu}}))
    with open(eval_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, value in enumerate(rouge):
            row = {"index": i, "prediction": "", "reference": "", "stopped_by": "eos"}  # evaluate's fields
            f.write(json.dumps({**row, "rouge1": value, "rougeL": value, "meteor": value}) + "\n")
    rows = [{"index": i, "id": example_id, "source": "s"} for i, example_id in enumerate(ids)]
    for row, target in zip(rows, targets or [], strict=False):
        row.update(user_id="u", target=target)
    (run / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = write_report(
        [effects(i, v) for i, v in enumerate(nll)], LossConfig(), run / "effects", split="test"
    )
    record = {
        "variant": name,
        "seed": 0,
        "eval_dir": str(eval_dir),
        "effects_summary": summary["files"]["summary"],
        "effects_blake2b": file_digest(summary["files"]["summary"]),  # as `compare.run_variant` records it
        "rendered_split": str(run / "test.jsonl"),
        "bleu": bleu,
        "settings": {"train": True, "config": {"clip_norm": 1.0}},
    }
    returned = write_done(run / "compare_done.json", record)
    assert json.loads((run / "compare_done.json").read_text()) == returned
    return returned


def test_nonfinite_numbers_are_written_null_and_read_back_as_nan(tmp_path):
    base_nll = [1.0, 2.0, 3.0, 4.0, 5.0]
    diverged_nll = [1.5, math.nan, 2.5, 3.5, 4.0]
    rouge_a, rouge_b = [0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.2, 0.1, 0.6, 0.5]
    records = [
        run_files(tmp_path, "base", rouge_a, base_nll, bleu=12.5),
        run_files(tmp_path, "diverged", rouge_b, diverged_nll, bleu=math.nan),
    ]
    summary = strict_json(tmp_path / "diverged" / "effects" / "summary.json")
    assert [e["nll_with"] for e in summary["per_example"]] == [1.5, None, 2.5, 3.5, 4.0]
    done = strict_json(tmp_path / "diverged" / "compare_done.json")
    assert done["bleu"] is None and records[1]["bleu"] is None and records[0]["bleu"] == 12.5

    out = tmp_path / "out"
    out.mkdir()
    compare = SimpleNamespace(out=str(out), split="test", baseline="base", resamples=1000)
    result = write_results(SimpleNamespace(source="compare.yaml", compare=compare), records)

    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["base"]["bleu"] == 12.5 and math.isnan(rows["diverged"]["bleu"])
    assert rows["base"]["nll_with"] == pytest.approx(np.mean(base_nll), rel=1e-6)
    assert math.isnan(rows["diverged"]["nll_with"])
    written = strict_json(out / "results.json")
    assert written["rows"][1]["bleu"] is None and written["rows"][1]["nll_with"] is None
    assert written["rows"][0]["bleu"] == 12.5

    # The NLL difference: over the 4 pairs that are finite, the fifth left out and counted.
    finite = [i for i in range(N) if not math.isnan(diverged_nll[i])]
    want = paired_bootstrap([diverged_nll[i] for i in finite], [base_nll[i] for i in finite], resamples=1000)
    got = result["differences"]["diverged"]["nll_with"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((want.mean, want.low, want.high), abs=1e-6)
    assert got["examples"] == 4 and got["nonfinite"] == 1
    assert result["differences"]["diverged"]["rouge1"]["nonfinite"] == 0
    assert result["differences"]["diverged"]["rouge1"]["examples"] == N

    table = (out / "results.md").read_text()
    diverged_row = next(line for line in table.splitlines() if line.startswith("| diverged |"))
    assert diverged_row.count("n/a") == 2  # NLL (with history) and BLEU
    assert "| 12.50 |" in next(line for line in table.splitlines() if line.startswith("| base |"))
    assert "diverged vs base on NLL (with hist.): " in table and "4 examples, 1 left out: not finite" in table


def test_a_baseline_null_value_leaves_its_pair_out_as_the_variant_s_does(tmp_path):
    """A NaN in the baseline's run, at another example than the variant's: both pairs are left out of the
    interval and counted, rather than the bootstrap refusing the non-finite values."""
    base_nll = [1.0, 2.0, 3.0, math.nan, 5.0]
    variant_nll = [1.5, math.nan, 2.5, 3.5, 4.0]
    records = [
        run_files(tmp_path, "base", [0.1] * N, base_nll, bleu=1.0),
        run_files(tmp_path, "variant", [0.1] * N, variant_nll, bleu=1.0),
    ]
    out = tmp_path / "out"
    out.mkdir()
    compare = SimpleNamespace(out=str(out), split="test", baseline="base", resamples=1000)
    result = write_results(SimpleNamespace(source="compare.yaml", compare=compare), records)

    got = result["differences"]["variant"]["nll_with"]
    finite = [0, 2, 4]
    want = paired_bootstrap([variant_nll[i] for i in finite], [base_nll[i] for i in finite], resamples=1000)
    assert got["mean"] == pytest.approx((0.5 - 0.5 - 1.0) / 3, abs=1e-6)
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((want.mean, want.low, want.high), abs=1e-6)
    assert (got["examples"], got["nonfinite"], got["unpaired"]) == (3, 2, 0)
    assert "3 examples, 2 left out: not finite" in (out / "results.md").read_text()


def test_compare_done_keeps_the_settings_as_the_config_gives_them(tmp_path):
    """Only measured numbers become null: a config's `.inf` must read back as inf, or `finished_changes`
    would see a changed setting where there is none."""
    record = {"variant": "v", "bleu": math.inf, "settings": {"config": {"clip_norm": math.inf}}}
    returned = write_done(tmp_path / "done.json", record)
    read = json.loads((tmp_path / "done.json").read_text())
    assert read == returned and read["bleu"] is None
    assert read["settings"]["config"]["clip_norm"] == math.inf


def _table_of_rewritten_reports(tmp_path, records) -> tuple[dict[str, dict], str]:
    """(rows by variant, results.md) of the comparison of `records` (`run_files`' runs, baseline "base")
    whose effect reports a test wrote anew: recorded with their new digests, as `compare.run_variant`
    would have recorded them."""
    records = [{**r, "effects_blake2b": file_digest(r["effects_summary"])} for r in records]
    out = tmp_path / "out"
    out.mkdir()
    compare = SimpleNamespace(out=str(out), split="test", baseline="base", resamples=1000)
    result = write_results(SimpleNamespace(source="compare.yaml", compare=compare), records)
    return {r["variant"]: r for r in result["rows"]}, (out / "results.md").read_text()


def test_the_table_says_how_many_tokens_the_dce_auroc_leaves_out(tmp_path):
    """A partly diverged model's NaN DCE tokens are left out of its effect report's AUROC (and counted
    there): the table's DCE AUROC column says so, naming the variant and the count."""
    records = [run_files(tmp_path, name, [0.1] * N, [1.0] * N, bleu=1.0) for name in ("base", "diverged")]
    for name, nan_tokens in (("base", 0), ("diverged", 3)):
        results = []
        for i in range(N):
            example = dataclasses.replace(effects(i, 1.0), roles=["preference", "noise"])
            if i < nan_tokens:
                example = dataclasses.replace(example, dce=np.array([np.nan, -0.1], np.float32))
            results.append(example)
        write_report(results, LossConfig(), tmp_path / name / "effects", split="test")
    rows, table = _table_of_rewritten_reports(tmp_path, records)
    assert rows["base"]["dce_auroc"] == 1.0 and rows["base"]["dce_auroc_nonfinite"] == 0
    # The diverged run's two finite preference tokens and five noise tokens still rank perfectly.
    assert rows["diverged"]["dce_auroc"] == 1.0 and rows["diverged"]["dce_auroc_nonfinite"] == 3
    assert (
        "DCE AUROC leaves out the target tokens whose DCE is not finite (a diverged model): diverged 3 "
        "(over its seeds' effect reports)."
    ) in table, table


def test_an_undefined_dce_auroc_is_named_as_such_not_left_to_read_as_a_diverged_run(tmp_path):
    """Effect reports whose scored tokens are all preference tokens have a null AUROC (no other token to rank
    them against): the table's "n/a" there said nothing, and "n/a" otherwise means a diverged run."""
    records = [run_files(tmp_path, name, [0.1] * N, [1.0] * N, bleu=1.0) for name in ("base", "all_pref")]
    for name, roles in (("base", ["preference", "noise"]), ("all_pref", ["preference", "preference"])):
        results = [dataclasses.replace(effects(i, 1.0), roles=roles) for i in range(N)]
        summary = write_report(results, LossConfig(), tmp_path / name / "effects", split="test")
        assert (summary["ground_truth"]["auroc"] is None) == (name == "all_pref")
    rows, table = _table_of_rewritten_reports(tmp_path, records)
    assert rows["base"]["dce_auroc"] == 1.0 and rows["base"]["dce_auroc_undefined"] == 0
    assert math.isnan(rows["all_pref"]["dce_auroc"]) and rows["all_pref"]["dce_auroc_undefined"] == 1
    assert "| all_pref |" in table and table.split("| all_pref |")[1].splitlines()[0].endswith("| n/a |")
    assert (
        "DCE AUROC is n/a where an effect report's scored tokens hold no preference token or only preference "
        "tokens, for which no AUROC is defined: all_pref (1 seed of 1)."
    ) in table, table


def test_two_seeds_with_one_null_value_give_an_n_a_mean_and_std_not_a_crash(tmp_path):
    """Two seeds, the variant's seed-1 run with a null NLL (its example 1): that seed's NLL mean is NaN, so
    the row's mean and its std across seeds are NaN (results.json null, the cell "n/a"), while the
    difference pairs the four examples finite at both seeds, each averaged over the seeds, the fifth counted.
    `statistics.stdev` of a NaN mean raised instead, after all the training."""
    base_nll = [1.0, 2.0, 3.0, 4.0, 5.0]
    variant_nll = {0: [1.5, 2.5, 3.0, 4.5, 5.5], 1: [1.7, math.nan, 3.4, 4.1, 5.9]}
    records = []
    for seed in (0, 1):
        root = tmp_path / f"seed{seed}"
        for name, nll in (("base", base_nll), ("diverged", variant_nll[seed])):
            records.append({**run_files(root, name, [0.1] * N, nll, bleu=1.0), "seed": seed})
    out = tmp_path / "out"
    out.mkdir()
    compare = SimpleNamespace(out=str(out), split="test", baseline="base", resamples=1000)
    result = write_results(SimpleNamespace(source="compare.yaml", compare=compare), records)

    rows = {r["variant"]: r for r in result["rows"]}
    assert math.isnan(rows["diverged"]["nll_with"]) and math.isnan(rows["diverged"]["nll_with_std"])
    assert rows["diverged"]["nll_without_std"] == 0.0  # the finite columns keep theirs
    written = strict_json(out / "results.json")["rows"][1]
    assert written["nll_with"] is None and written["nll_with_std"] is None

    got = result["differences"]["diverged"]["nll_with"]
    finite = [0, 2, 3, 4]
    averaged = [(variant_nll[0][i] + variant_nll[1][i]) / 2 for i in finite]  # 1.6, 3.2, 4.3, 5.7
    want = paired_bootstrap(averaged, [base_nll[i] for i in finite], resamples=1000)
    assert got["mean"] == pytest.approx(0.45, abs=1e-6)
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((want.mean, want.low, want.high), abs=1e-6)
    assert (got["examples"], got["nonfinite"]) == (4, 1)

    table = (out / "results.md").read_text()
    diverged_row = next(line for line in table.splitlines() if line.startswith("| diverged |"))
    assert "| n/a | 1.3863 ± 0.0000 |" in diverged_row, diverged_row  # NLL (with hist.), NLL (without)
    assert "diverged vs base on NLL (with hist.): worse (+0.4500 [" in table
    assert "4 examples, 1 left out: not finite" in table
