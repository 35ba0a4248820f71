"""The scaling harness's CSV (format, values, resume) and the `bench` command's listing.

The sweep's timing is replaced by a fixed fake (compiling the real step three times would take most of a
minute on CI's two cores; `benchmarks/RESULTS.md` records real sweeps), so these tests check what the harness
derives from a timing: token counts, the FLOP formula, throughput, resumption and the plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import jax
import numpy as np
import pytest

from nextquill_jax import cli
from nextquill_jax.bench import flops, harness, record, sweep
from nextquill_jax.bench.command import BENCHMARKS, benchmarks_dir
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.models import model_preset
from tests.conftest import REPO
from tests.shared import TINY_EOS_ID

STEP_S = 0.25
TINY = {"vocab_size": 300, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "num_layers": 2,
        "bos_token_id": TINY_EOS_ID, "eos_token_ids": [TINY_EOS_ID]}  # fmt: skip
SIZES = {"a": (32, 48), "b": (64, 96), "c": (96, 160)}  # name -> (hidden, mlp)
PLOT_ROWS = sweep.plot_rows


class FakeHarness:
    """Stands in for TrainingHarness: records the models it is built for (hidden size, cuDNN's packed bound,
    scan unroll) and the most examples a row of each timed batch holds, returns a fixed timing."""

    built: ClassVar[list[int]] = []
    unrolls: ClassVar[list[int]] = []
    plots: ClassVar[list[Path]] = []
    bounds: ClassVar[list[int | None]] = []
    examples_per_row: ClassVar[list[int]] = []

    def __init__(self, model_cfg, mesh, **kwargs):
        FakeHarness.built.append(model_cfg.hidden_size)
        FakeHarness.bounds.append(model_cfg.cudnn_max_segments)
        FakeHarness.unrolls.append(model_cfg.scan_unroll)

    def time(self, batch, *, warmup, steps):
        FakeHarness.examples_per_row.append(
            int(batch["with_segment_ids"].max())
        )  # rows number them 1, 2, ...
        return harness.StepTiming(
            compile_s=1.5,
            step_s=[STEP_S + 0.1, STEP_S],
            first_loss=5.5,
            compiled_temp_mib=3.0,
            compiled_total_mib=4.0,
            device_peak_mib=None,
        )


class MfuFakeHarness(FakeHarness):
    """FakeHarness as benchmarks/mfu.py calls it: its `time` takes mfu's `profile_dir` too."""

    def time(self, batch, *, warmup, steps, profile_dir=None):
        return super().time(batch, warmup=warmup, steps=steps)


def sweep_yaml(path, out, names, extra: str = "") -> str:
    models = "\n".join(
        f"  - {{name: {n}, preset: qwen2.5-0.5b, overrides: {{hidden_size: {SIZES[n][0]}, "
        f"intermediate_size: {SIZES[n][1]}, " + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}}"
        for n in names
    )
    path.write_text(
        f"output_dir: {out}\nmodels:\n{models}\nseq_len: [128]\nhistory: [2]\nrows: 2\ncontext_tokens: 16\n"
        "entry_tokens: 20\ntarget_tokens: 8\nlength_multiple: 16\ntimed_steps: 2\n" + extra
    )
    return str(path)


def qwen2_params(d: int, f: int, v: int, layers: int, h: int, k: int, hd: int) -> tuple[int, int]:
    """(total, non-embedding) parameters of a tied-embedding Qwen2, by the architecture's formula."""
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + (h + 2 * k) * hd + 3 * d * f + 2 * d
    nonembed = layers * per_layer + d
    return nonembed + v * d, nonembed


@pytest.fixture
def fake(monkeypatch):
    """The fake timing, and `plot_rows` recording the plots asked for instead of drawing them: a plot costs
    ~0.6 CPU-s and these tests run the sweep ~30 times; test_sweep_csv_values_and_plot draws the real one
    (`FakeHarness.plots` is then empty)."""
    FakeHarness.built, FakeHarness.bounds, FakeHarness.examples_per_row = [], [], []
    FakeHarness.unrolls = []
    FakeHarness.plots = []
    monkeypatch.setattr(sweep, "TrainingHarness", FakeHarness)
    monkeypatch.setattr(sweep, "plot_rows", lambda rows, path, title: FakeHarness.plots.append(path))
    return FakeHarness


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_csv_values_and_plot(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(sweep, "plot_rows", PLOT_ROWS)  # the real plot, which `fake` replaces
    out = tmp_path / "sweep"
    assert sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b", "c"])]) == 0
    with open(out / "scaling.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == sweep.CSV_COLUMNS
    rows = read(out / "scaling.csv")
    assert [r["model"] for r in rows] == ["a", "b", "c"]
    # One example: with stream 16 + 2 * 20 + 8 = 64 tokens, without 16 + 8 = 24, target 8; two per row of 128.
    per_row, n_w, n_o, n_y = 2, 64, 24, 8
    for r in rows:
        d, f = SIZES[r["model"]]
        total, nonembed = qwen2_params(d, f, 300, 2, 4, 2, 8)
        assert (int(r["params"]), int(r["params_nonembed"])) == (total, nonembed)
        assert int(r["input_tokens"]) == 2 * per_row * (n_w + n_o)
        assert int(r["target_tokens"]) == 2 * per_row * n_y
        assert (int(r["seq_len_without"]), int(r["response_slots"])) == (48, 16)
        assert float(r["padding_efficiency"]) == pytest.approx(
            2 * per_row * (n_w + n_o) / (2 * (128 + 48)), abs=1e-4
        )
        assert float(r["step_s"]) == pytest.approx(STEP_S)  # the best timed step
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["input_tokens"]) / STEP_S, abs=0.1)
        pairs = 2 * per_row * (n_w * (n_w + 1) // 2 + n_o * (n_o + 1) // 2)
        flops = (
            6 * nonembed * 2 * per_row * (n_w + n_o)
            + 12 * 2 * 4 * 8 * pairs
            + 6 * d * 300 * 2 * 2 * per_row * n_y
        )
        assert float(r["flops_per_step"]) == pytest.approx(flops, rel=1e-4)
        assert float(r["tflops_per_s"]) == pytest.approx(flops / STEP_S / 1e12, rel=1e-3, abs=1e-4)
        assert r["mfu"] == "" and r["device_peak_mib"] == ""  # CPU: no known peak, no allocator statistics
        assert (r["mesh"], r["devices"], r["backend"]) == ("data=1,fsdp=1,tensor=1", "1", "cpu")
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sweep_mfu_is_over_the_files_peak_times_the_devices(tmp_path, fake):
    """`peak_tflops` from the file replaces the device kind's (none on CPU); the MFU of a point is its
    achieved TFLOP/s over the peak of every device of its mesh."""
    out = tmp_path / "sweep"
    config = sweep_yaml(tmp_path / "s.yaml", out, ["a"], extra="peak_tflops: 2.0e-5\n")
    assert sweep.main(["--config", config]) == 0
    [row] = read(out / "scaling.csv")
    assert float(row["mfu"]) == pytest.approx(float(row["flops_per_step"]) / STEP_S / 1e12 / 2.0e-5, rel=1e-3)
    cfg = sweep.load_scaling_config(config)
    model = cfg.models[0]
    model_cfg = cfg.model_config(model)
    batch, row_shape = harness.synthetic_batch(
        2, 128, 2, context_tokens=16, entry_tokens=20, target_tokens=8, vocab=300, length_multiple=16
    )
    batch["labels"][batch["labels"] >= 0] = 0  # token id 0 is a target like any other
    timing = FakeHarness(model_cfg, None).time(batch, warmup=1, steps=2)
    key = ("a", "128", "2", "data=1,fsdp=4,tensor=1")
    row = sweep.point_row(cfg, model, model_cfg, key, (1, 4, 1), batch, row_shape, timing, 3e-6, "cpu")
    # flops_per_step is the FLOP model's (checked against the hand count above)
    achieved = float(row["flops_per_step"]) / STEP_S / 1e12
    assert float(row["mfu"]) == pytest.approx(achieved / (3e-6 * 4), rel=1e-3)
    assert int(row["devices"]) == 4 and int(row["target_tokens"]) == 2 * 2 * 8
    # Rows of 100 with-stream slots hold two examples of 16 + 20 + 8 = 44 tokens each; the without stream
    # holds their 2 x (16 + 8) = 48 tokens in 48 slots: 2 x (88 + 48) real tokens in 2 x (100 + 48) slots.
    odd, odd_shape = harness.synthetic_batch(
        2, 100, 1, context_tokens=16, entry_tokens=20, target_tokens=8, vocab=300, length_multiple=16
    )
    odd_row = sweep.point_row(cfg, model, model_cfg, key, (1, 4, 1), odd, odd_shape, timing, 3e-6, "cpu")
    assert odd_row["padding_efficiency"] == f"{(88 + 48) / (100 + 48):.4f}" == "0.9189"


def test_sweep_resumes_without_repeating_points(tmp_path, fake):
    out = tmp_path / "sweep"
    sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b"])])
    first = read(out / "scaling.csv")
    sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b", "c"])])
    rows = read(out / "scaling.csv")
    assert fake.built == [32, 64, 96]  # a and b were not run again
    assert rows[:2] == first and [r["model"] for r in rows] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("before", "after", "listed"),
    [
        ("rows: 2", "rows: 4", "sweep.rows: 2 -> 4"),
        ("timed_steps: 2", "timed_steps: 3", "sweep.timed_steps: 2 -> 3"),
        ("timed_steps: 2", "timed_steps: 2\nloss_variant: sft", 'sweep.loss_variant: "nextquill" -> "sft"'),
        ("timed_steps: 2", "timed_steps: 2\ncompute_dtype: bfloat16",
         'sweep.compute_dtype: "float32" -> "bfloat16"'),
        ("hidden_size: 32", "hidden_size: 40", "models.a.overrides.hidden_size: 32 -> 40"),
        ("timed_steps: 2", "timed_steps: 2\nscan_unroll: 2", "sweep.scan_unroll: 1 -> 2"),
        ("timed_steps: 2", "timed_steps: 2\nseed: 1", "sweep.seed: 0 -> 1"),
    ],
)  # fmt: skip
def test_sweep_refuses_a_csv_measured_with_other_settings(tmp_path, fake, capsys, before, after, listed):
    """A point's key (model name, seq_len, history, mesh) is not all its numbers depend on: a CSV whose rows
    were measured with other settings is refused, on the command line as one error line, and left as is."""
    out = tmp_path / "sweep"
    config = sweep_yaml(tmp_path / "s.yaml", out, ["a"])
    assert sweep.main(["--config", config]) == 0
    measured = (out / "scaling.csv").read_text()
    (tmp_path / "s.yaml").write_text((tmp_path / "s.yaml").read_text().replace(before, after))
    capsys.readouterr()
    assert cli.main(["bench", "scale", "--config", config]) == 1
    captured = capsys.readouterr()
    csv_path = out / "scaling.csv"
    assert captured.err == (
        f"error: {csv_path} holds points measured with other settings than the sweep's, so its rows would "
        f"stand for numbers they are not; differing, the CSV's value first: {listed}. Fix: set a new "
        f"output_dir (or --output-dir) for the changed sweep, or delete {csv_path} to measure every point "
        "again.\n"
    )
    assert "done already" not in captured.out
    assert fake.built == [32] and (out / "scaling.csv").read_text() == measured
    # The fix: a new output directory measures the changed sweep.
    assert sweep.main(["--config", config, "--output-dir", str(tmp_path / "new")]) == 0
    assert len(fake.built) == 2 and len(read(tmp_path / "new" / "scaling.csv")) == 1


def test_sweep_checks_the_models_its_csv_measured_even_when_a_sweep_left_them_out(tmp_path, fake):
    """A model the CSV has rows of keeps its recorded settings while a sweep without it adds rows; one not yet
    measured may change."""
    out = tmp_path / "sweep"
    assert sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"])]) == 0
    assert sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["b"])]) == 0
    assert fake.built == [32, 64]
    changed = tmp_path / "s.yaml"
    sweep_yaml(changed, out, ["a", "c"])
    changed.write_text(changed.read_text().replace("hidden_size: 32", "hidden_size: 40"))
    with pytest.raises(ConfigError, match=r"models\.a\.overrides\.hidden_size: 32 -> 40\. Fix"):
        sweep.main(["--config", str(changed)])
    sweep_yaml(changed, out, ["c"])
    changed.write_text(changed.read_text().replace("hidden_size: 96", "hidden_size: 128"))
    assert sweep.main(["--config", str(changed)]) == 0
    assert fake.built == [32, 64, 128] and [r["model"] for r in read(out / "scaling.csv")] == ["a", "b", "c"]


def test_sweep_refuses_a_csv_without_the_settings_it_was_measured_with(tmp_path, fake):
    out = tmp_path / "sweep"
    config = sweep_yaml(tmp_path / "s.yaml", out, ["a"])
    sweep.main(["--config", config])
    (out / sweep.SETTINGS_FILE).unlink()
    with pytest.raises(
        ConfigError, match=r"holds measured points but no scaling_settings\.json .* Fix: set a new"
    ):
        sweep.main(["--config", config])
    assert fake.built == [32]


@pytest.mark.parametrize(
    "damaged, said",
    [
        ('{"sweep": {', "it is not JSON (Expecting property name enclosed in double quotes: line 1"),
        ("[1, 2]", "no `sweep`, `models`, `device`, which scaling_settings.json always records"),
        ('{"sweep": {}, "device": {}}', "no `models`, which"),
        ('{"sweep": {}, "models": [], "device": {}}', "`models` is not an object"),
    ],
)
def test_sweep_names_a_damaged_settings_file_and_measures_nothing(tmp_path, fake, damaged, said):
    out = tmp_path / "sweep"
    config = sweep_yaml(tmp_path / "s.yaml", out, ["a"])
    sweep.main(["--config", config])
    (out / sweep.SETTINGS_FILE).write_text(damaged)
    rows = (out / "scaling.csv").read_text()
    with pytest.raises(ConfigError) as e:
        sweep.main(["--config", config])
    assert str(e.value).startswith(f"{out / sweep.SETTINGS_FILE} is damaged: {said}"), str(e.value)
    assert f"or delete {out / 'scaling.csv'} and {out / sweep.SETTINGS_FILE} to measure" in str(e.value)
    assert fake.built == [32] and (out / "scaling.csv").read_text() == rows


def test_sweep_settings_differ_on_another_device():
    cfg = sweep.load_scaling_config("configs/scaling/tiny_cpu.yaml")
    recorded = json.loads(json.dumps(sweep.sweep_settings(cfg, "cpu", "cpu")))
    rows, same = [{"model": "tiny-32"}], sweep.sweep_settings(cfg, "cpu", "cpu")
    assert sweep.settings_to_record(recorded, same, rows, Path("x.csv")) == same
    with pytest.raises(
        ConfigError, match=r'device\.backend: "cpu" -> "gpu"; device\.device_kind: "cpu" -> "H100"'
    ):
        sweep.settings_to_record(recorded, sweep.sweep_settings(cfg, "gpu", "H100"), rows, Path("x.csv"))


def test_sweep_scan_unroll_reaches_every_point_and_older_settings_files_measured_the_rolled_scan(
    tmp_path, fake
):
    """`scan_unroll` builds each point's model with it; a scaling_settings.json written before sweeps had the
    setting measured the rolled scan (1): its CSV is extended at 1 and refused at 2."""
    out = tmp_path / "sweep"
    config = sweep_yaml(tmp_path / "s.yaml", out, ["a"], extra="scan_unroll: 2\n")
    assert sweep.main(["--config", config, "--output-dir", str(tmp_path / "unrolled")]) == 0
    assert fake.unrolls == [2]
    older = sweep_yaml(tmp_path / "old.yaml", out, ["a"])
    assert sweep.main(["--config", older]) == 0
    recorded = json.loads((out / sweep.SETTINGS_FILE).read_text())
    assert recorded["sweep"].pop("scan_unroll") == 1
    (out / sweep.SETTINGS_FILE).write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"sweep\.scan_unroll: 1 -> 2\. Fix"):
        sweep.main(["--config", sweep_yaml(tmp_path / "new.yaml", out, ["a", "c"], extra="scan_unroll: 2\n")])
    assert fake.unrolls == [2, 1]
    assert sweep.main(["--config", sweep_yaml(tmp_path / "old.yaml", out, ["a", "b"])]) == 0
    assert fake.unrolls == [2, 1, 1] and [r["model"] for r in read(out / "scaling.csv")] == ["a", "b"]


def test_sweep_results_list_only_the_rows_measured_by_that_command(tmp_path, fake, capsys):
    """A resumed sweep appended the whole CSV under today's date, command and machine, rows measured by an
    earlier run (another day, another jax) included; one that measured nothing appended them all again."""
    out, results = tmp_path / "sweep", tmp_path / "RESULTS.md"
    sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"])])
    capsys.readouterr()
    assert (
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"]), "--results", str(results)]) == 0
    )
    assert not results.exists()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"nothing measured (each point was in {out / 'scaling.csv'} already or skipped): {results} is "
        "unchanged"
    )
    assert (
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b"]), "--results", str(results)])
        == 0
    )
    section = results.read_text()
    table = [
        line for line in section.splitlines() if line.startswith("| ") and line[2:5] not in ("mod", "---")
    ]
    assert [row.split(" | ")[0] for row in table] == ["| b"]
    assert "- 1 earlier row(s) of the CSV, measured by an earlier run, are not listed\n" in section


def test_a_results_file_that_cannot_be_written_is_refused_before_measuring(tmp_path, fake, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(
            [
                "--config",
                sweep_yaml(tmp_path / "s.yaml", tmp_path / "o", ["a"]),
                "--results",
                str(tmp_path / "no" / "r.md"),
            ]
        )
    assert e.value.code == 2 and fake.built == []
    assert (
        f"argument --results: {tmp_path / 'no'} is not an existing directory (make it first)"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:
        benchmark_script("attention").main(["--append-results", str(tmp_path)])
    assert e.value.code == 2 and f"{tmp_path} is a directory, not a Markdown file" in capsys.readouterr().err


def test_sweep_point_runs_one_point_only(tmp_path, fake):
    out = tmp_path / "sweep"
    assert (
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b", "c"]), "--point", "1"]) == 0
    )
    assert fake.built == [64] and [r["model"] for r in read(out / "scaling.csv")] == ["b"]
    assert fake.plots == []  # the parent of a point's process draws the plot


def test_sweep_names_points_alike_and_skips_meshes_in_the_files_terms(tmp_path, fake, capsys):
    """Progress, resume and skip lines name a point as "MODEL seq_len N history H mesh SHAPE"; a mesh entry
    that does not fit the devices is said, with its fix, as a `mesh:` entry (the file takes no overrides); a
    batch that does not split into micro_batches is skipped, not a reshape error inside the step."""
    out = tmp_path / "out"
    mesh = "mesh:\n  - {data: 1, fsdp: -1, tensor: 1}\n  - {data: 2, fsdp: 2}\n"
    assert sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"], extra=mesh)]) == 0
    lines = capsys.readouterr().out.splitlines()
    measured = "a seq_len 128 history 2 mesh data=1,fsdp=1,tensor=1"
    assert lines[0].startswith(f"{measured}: 1408.0 tokens/s, step 0.25000 s"), lines
    assert lines[1] == (
        "skip a seq_len 128 history 2 mesh {data: 2, fsdp: 2}: mesh entry {data: 2, fsdp: 2} has 4 devices "
        "but 1 is available. Fix: an entry whose sizes multiply to 1, or with one axis -1 to take the "
        "devices left over, e.g. {data: 1, fsdp: -1, tensor: 1}."
    )
    assert sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"], extra=mesh)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"done already: {measured}"
    micro = sweep_yaml(tmp_path / "m.yaml", tmp_path / "micro", ["a"], extra="micro_batches: 4\n")
    assert sweep.main(["--config", micro]) == 1 and fake.built == [32]
    assert capsys.readouterr().out.splitlines() == [
        f"skip {measured}: rows 2 do not split over the mesh's 1 batch shards (data x fsdp) of "
        "micro_batches=4 equal micro-batches each. Fix: set rows to a multiple of 4, or use another mesh "
        "entry than {data: 1, fsdp: -1, tensor: 1} (one whose data x fsdp x micro_batches divides 2)."
    ]


def test_sweep_skips_a_mesh_whose_batch_shards_do_not_split_rows(tmp_path):
    """On 8 (simulated) devices a mesh that splits the batch 8 ways cannot hold rows: 2; the point is skipped
    with its fix instead of JAX's IndivisibleError when the batch is placed (a fresh Python: the device count
    is fixed when JAX starts). So is one whose tensor axis (4) does not divide the model's 2 kv heads, instead
    of the parameter sharding's ValueError, with a fix in the sweep file's terms."""
    import os
    import subprocess
    import sys

    entries = ["{data: 1, fsdp: -1, tensor: 1}", "{data: 2, fsdp: 4}", "{data: 1, fsdp: 2, tensor: 4}"]
    mesh = "mesh:\n" + "".join(f"  - {entry}\n" for entry in entries)
    config = sweep_yaml(tmp_path / "s.yaml", tmp_path / "out", ["a"], extra=mesh)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "nextquill_jax.bench.sweep", "--config", config],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    why = "rows 2 do not split over the mesh's 8 batch shards (data x fsdp). Fix: set rows to a multiple of 8"
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        f"skip a seq_len 128 history 2 mesh data=1,fsdp=8,tensor=1: {why}, or use another mesh entry than "
        "{data: 1, fsdp: -1, tensor: 1} (one whose data x fsdp divides 2).",
        f"skip a seq_len 128 history 2 mesh data=2,fsdp=4,tensor=1: {why}, or use another mesh entry than "
        "{data: 2, fsdp: 4} (one whose data x fsdp divides 2).",
    ]
    assert len(lines) == 3, lines
    assert lines[2].startswith(
        "skip a seq_len 128 history 2 mesh data=1,fsdp=2,tensor=4: the model does not split over this mesh: "
    ), lines[2]
    assert lines[2].endswith(
        "cannot be split 4 ways over mesh axes ('tensor',). Fix: use another mesh entry than "
        "{data: 1, fsdp: 2, tensor: 4} (one whose axis sizes divide the model's dimensions)."
    ), lines[2]
    assert "mesh.tensor" not in lines[2]
    assert "no point of" in done.stderr and not (tmp_path / "out" / "scaling.csv").exists()


def test_sweep_refuses_a_foreign_csv(tmp_path, fake):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "scaling.csv").write_text("model,tokens_per_s\nx,1\n")
    with pytest.raises(ConfigError, match="move the file away or set a new output_dir"):
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"])])


@pytest.mark.parametrize(
    ("axes", "said"),
    [
        ("seq_len: [8, 0]\nhistory: [1]", "line 2: `seq_len` values must be >= 1, got [8, 0]"),
        ("seq_len: [8]\nhistory: [1, -1]", "line 3: `history` values must be >= 0, got [1, -1]"),
    ],
)
def test_sweep_refuses_an_axis_value_below_its_least_naming_its_line(tmp_path, axes, said):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: x\n{axes}\nmodels: [{{name: a, preset: qwen2.5-0.5b}}]\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_scaling_config(bad)
    assert str(e.value).startswith(f"{bad}, {said}")


def test_sweep_refuses_a_csv_with_its_columns_in_another_order(tmp_path, fake):
    """Rows are appended in the harness's column order: under a header of the same names in another order,
    each value would stand in another column."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "scaling.csv").write_text(",".join(reversed(sweep.CSV_COLUMNS)) + "\n")
    with pytest.raises(ConfigError, match="are not the scaling harness's"):
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"])])
    assert fake.built == []


def test_a_training_config_given_as_a_sweep_file_is_named_with_the_fix(tmp_path):
    training = tmp_path / "train.yaml"
    training.write_text("model: {preset: qwen2.5-0.5b}\ntrain: {steps: 2}\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_scaling_config(training)
    assert str(e.value) == (
        f"{training} is a training config (sections model, train), not a sweep file. Fix: run "
        f"`nextquill-jax train --config {training}`, or pass a sweep file (configs/scaling/)."
    )


def test_sweep_cudnn_max_segments_reaches_every_point_and_auto_is_what_its_rows_hold(tmp_path, fake, capsys):
    cudnn = "attention_impl: cudnn\ncompute_dtype: bfloat16\n"
    config = sweep_yaml(tmp_path / "s.yaml", tmp_path / "unused", ["a", "b"], extra=cudnn)
    run = lambda out, *flags: sweep.main(["--config", config, "--output-dir", str(tmp_path / out), *flags])
    # Rows of 128 with-stream tokens hold two examples of 16 + 2 * 20 + 8 = 64 tokens.
    assert run("auto", "--cudnn-max-segments", "auto") == 0
    assert fake.examples_per_row == [2, 2] and fake.bounds == fake.examples_per_row
    assert "cudnn_max_segments 2 (auto: the most examples a row holds)" in capsys.readouterr().out
    assert run("three", "--cudnn-max-segments", "3") == 0 and run("unset") == 0
    assert fake.bounds == [2, 2, 3, 3, 2, 2]  # unset: auto, the default
    null = cudnn + "cudnn_max_segments: null\n"
    dense = sweep_yaml(tmp_path / "d.yaml", tmp_path / "unused", ["a"], extra=null)
    assert sweep.main(["--config", dense, "--output-dir", str(tmp_path / "dense")]) == 0
    assert fake.bounds == [2, 2, 3, 3, 2, 2, None]  # null: cuDNN's dense segment mask
    assert run("one", "--cudnn-max-segments", "1") == 1  # nothing measured
    assert fake.bounds == [2, 2, 3, 3, 2, 2, None]  # both points skipped, neither built nor written
    captured = capsys.readouterr()
    assert "rows hold up to 2 examples (one segment each), more than cudnn_max_segments=1" in captured.out
    assert f"error: no point of {config} was measured: each was skipped" in captured.err
    assert not (tmp_path / "one" / "scaling.csv").exists()
    assert not any(png.parent.name == "one" for png in fake.plots)  # no plot of no rows


@pytest.mark.parametrize("value", [0, -2])
def test_sweep_refuses_fewer_than_one_warmup_step(tmp_path, value):
    """`warmup_steps: 0` or below was taken, and one warm-up step ran anyway (it compiles the step, and its
    loss is the row's first_loss): the file said one thing and the sweep did another."""
    config = sweep_yaml(tmp_path / "s.yaml", tmp_path / "out", ["a"], extra=f"warmup_steps: {value}\n")
    with pytest.raises(ConfigError, match=rf"`warmup_steps` must be >= 1, got {value}"):
        sweep.load_scaling_config(config)
    one = sweep_yaml(tmp_path / "one.yaml", tmp_path / "out", ["a"], extra="warmup_steps: 1\n")
    assert sweep.load_scaling_config(one).warmup_steps == 1


@pytest.mark.parametrize("value", ["0", "-1", "foo", "2.5"])
def test_sweep_refuses_a_bad_cudnn_max_segments(tmp_path, fake, capsys, value):
    config = sweep_yaml(tmp_path / "s.yaml", tmp_path / "out", ["a"], extra="attention_impl: cudnn\n")
    with pytest.raises(SystemExit):
        sweep.main(["--config", config, "--cudnn-max-segments", value])
    assert "--cudnn-max-segments: expected an int >= 1 or auto" in capsys.readouterr().err
    xla = sweep_yaml(tmp_path / "x.yaml", tmp_path / "out", ["a"], extra="cudnn_max_segments: 2\n")
    with pytest.raises(ConfigError, match=r"but attention_impl is 'xla'\. Fix: set attention_impl: cudnn"):
        sweep.load_scaling_config(xla)
    assert fake.built == []
    auto = sweep_yaml(tmp_path / "a.yaml", tmp_path / "out", ["a"], extra="cudnn_max_segments: auto\n")
    assert sweep.load_scaling_config(auto).cudnn_max_segments is None  # only cuDNN has the packed mode


@pytest.mark.parametrize(("value", "impl"), [("0", "cudnn"), ("-3", "cudnn"), ("2", "xla"), ("4", "splash")])
def test_sweep_and_training_config_refuse_cudnn_max_segments_alike(tmp_path, value, impl):
    """A sweep file's `cudnn_max_segments` is refused with the training config's message (one check), its key
    spelt without the training config's `model.` section."""
    from nextquill_jax.config import load_config

    file = sweep_yaml(
        tmp_path / "s.yaml",
        tmp_path / "out",
        ["a"],
        extra=f"attention_impl: {impl}\ncudnn_max_segments: {value}\n",
    )
    with pytest.raises(ConfigError) as in_sweep:
        sweep.load_scaling_config(file)
    training = tmp_path / "train.yaml"
    training.write_text(
        f"model: {{preset: qwen2.5-0.5b, attention_impl: {impl}, cudnn_max_segments: {value}}}\n"
    )
    with pytest.raises(ConfigError) as in_training:
        load_config(training)
    # The check's own message: from the key on, before the schema's note on where the key sits.
    said = lambda e: str(e.value)[str(e.value).index("cudnn_max_segments") :].split(". Fix the value under")[
        0
    ]
    assert said(in_sweep) == said(in_training).replace("model.", "")
    assert "Fix: set" in said(in_sweep) and value in said(in_sweep)


def test_sweep_passes_cudnn_max_segments_to_each_point_process(tmp_path, fake, monkeypatch):
    """On an accelerator every point runs in a child process; the option, given on the command line, reaches
    each."""
    import jax

    children = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(sweep.subprocess, "call", lambda command: children.append(command) or 0)
    config = sweep_yaml(tmp_path / "s.yaml", tmp_path / "out", ["a", "b"], extra="attention_impl: cudnn\n")
    sweep.run_sweep(sweep.load_scaling_config(config, cudnn_max_segments="auto"), config_path=config)
    assert [c[c.index("--point") + 1] for c in children] == ["0", "1"]
    assert all(c[c.index("--cudnn-max-segments") + 1] == "auto" for c in children)
    assert fake.built == []


def test_a_point_process_that_fails_is_named_and_the_sweep_goes_on(tmp_path, fake, monkeypatch):
    """A point that runs out of device memory ends its own process only: the sweep says which point failed,
    with the exit status, and runs the next."""
    import jax

    children = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        sweep.subprocess, "call", lambda command: children.append(command) or 3 - len(children)
    )
    config = sweep_yaml(tmp_path / "s.yaml", tmp_path / "out", ["a", "b", "c"])
    said = []
    sweep.run_sweep(sweep.load_scaling_config(config), said.append, config_path=config)
    assert len(children) == 3  # statuses 2, 1, 0
    failed = [line for line in said if "failed" in line]
    where = "seq_len 128 history 2 mesh data=1,fsdp=1,tensor=1"
    assert failed == [
        f"point a {where} failed (exit status 2); continuing with the next",
        f"point b {where} failed (exit status 1); continuing with the next",
    ]


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "output_dir: x\nmodels: [{name: a, preset: qwen2.5-0.5b}]\nseq_len: [8]\nhistory: [1]\nrowz: 2\n"
    )
    with pytest.raises(ConfigError, match=r"rowz.*Did you mean `rows`"):
        sweep.load_scaling_config(bad)
    bad.write_text("output_dir: x\nmodels: [{name: a, preset: qwen9}]\nseq_len: [8]\nhistory: [1]\n")
    with pytest.raises(ConfigError, match="qwen9"):
        sweep.load_scaling_config(bad)


@pytest.mark.parametrize(
    "line, expected",
    [
        # Refused when the file is loaded, naming the sweep file's own key (no training-config key, no
        # command line, which `bench scale` does not take).
        ("loss_variant: nextquil", "`loss_variant` is 'nextquil', not one of ["),
        ("compute_dtype: flaot32", "`compute_dtype` is 'flaot32', not one of ['float32', 'bfloat16']"),
        ("attention_impl: cuda", "`attention_impl` is 'cuda', not one of ['xla', 'xla_dense', 'cudnn',"),
        ("scan_unroll: 0", "`scan_unroll` must be an int >= 1, got 0. Fix: 1 runs one decoder layer per"),
        ("models: [{name: a, preset: qwen2.5-0.5b, overrides: {hidden_size: big}}]",
         "`models[0].overrides.hidden_size` expects an int, got 'big' (str). Fix: write an int value for "
         "`models[0].overrides.hidden_size`."),
        ("models: [{name: a, preset: qwen2.5-0.5b, overrides: {num_layer: 2}}]",
         "`models[0].overrides.num_layer` is not a ModelConfig architecture field; did you mean "
         "`models[0].overrides.num_layers`? Fix the value."),
        ("models: [{name: a, preset: qwen2.5-0.5b, overrides: {compute_dtype: float32}}]",
         "`models[0].overrides.compute_dtype` is not a ModelConfig architecture field (`compute_dtype` is a "
         "key of its own)"),
        # A preset's special ids past a shrunk vocabulary: ModelConfig's fix, in this file's keys.
        ("models: [{name: a, preset: qwen2.5-0.5b}, "
         "{name: b, preset: qwen2.5-0.5b, overrides: {vocab_size: 704}}]",
         "`models[1]` ('b'): ModelConfig special token ids outside the vocabulary (vocab_size 704): "
         "bos_token_id [151643], eos_token_ids [151643]. Fix: set them to the tokenizer's ids (in a config: "
         "models[1].overrides.bos_token_id, models[1].overrides.eos_token_ids; e.g. eos_token_ids: ["),
        # A peak of 0 or NaN would give an infinite or NaN MFU in every row.
        ("peak_tflops: 0", "`peak_tflops` must be > 0 or null, got 0"),
        # Two models of one name would share the rows of one key: the second would never be measured.
        ("models: [{name: a, preset: qwen2.5-0.5b}, {name: a, preset: qwen2.5-1.5b}]",
         "`models` names must be unique, got ['a', 'a']"),
        # A misspelt axis would skip every point of the entry at run time, after hours of others.
        ("mesh: [{data: 1, fsdp: -1, tensr: 1}]",
         "`mesh[0]`: mesh axes ['tensr'] are unknown; the mesh axes are ['data', 'fsdp', 'tensor']"),
    ],
)  # fmt: skip
def test_sweep_file_errors_name_the_sweep_files_keys(tmp_path, line, expected):
    bad = tmp_path / "bad.yaml"
    models = "" if line.startswith("models:") else "models: [{name: a, preset: qwen2.5-0.5b}]\n"
    bad.write_text(f"output_dir: x\n{models}seq_len: [8]\nhistory: [1]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_scaling_config(bad)
    message = str(e.value)
    at = 4 if line.startswith("models:") else 5  # the line the test writes, counted in the text above
    assert message.startswith(f"{bad}, line {at}: {expected}"), message
    assert "model.overrides" not in message and "command line" not in message, message


def test_shipped_cpu_sweep_has_three_model_sizes():
    cfg = sweep.load_scaling_config("configs/scaling/tiny_cpu.yaml")
    sizes = {flops.param_counts(cfg.model_config(m))[0] for m in cfg.models}
    assert len(sizes) == 3
    gpu = sweep.load_scaling_config("configs/scaling/gpu_qwen.yaml")
    assert [m.preset for m in gpu.models] == ["qwen2.5-0.5b", "qwen2.5-1.5b"]


def test_causal_pairs_counts_each_segment():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert flops.causal_pairs(seg) == (6 + 3) + 21


def test_step_flops_is_the_documented_formula_counted_by_hand():
    """P counted from the architecture (Qwen2: q/k/v biases, GQA, untied head, RMS norms), then the module
    docstring's three terms over a packed batch: 6·P per real token of both streams, 12·L·H·Hd per causal
    pair inside an example, 6·D·V·2 per target token."""
    D, H, KV, Hd, F, L, V = 32, 4, 2, 8, 64, 2, 128  # F: the MLP's intermediate size
    cfg = model_preset("qwen2.5-0.5b", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L,
                       num_heads=H, num_kv_heads=KV, head_dim=Hd, tie_word_embeddings=False,
                       bos_token_id=TINY_EOS_ID, eos_token_ids=(TINY_EOS_ID,))  # fmt: skip
    attention = D * H * Hd + H * Hd + 2 * (D * KV * Hd + KV * Hd) + H * Hd * D
    per_layer = attention + 3 * D * F + 2 * D  # the MLP's gate, up and down; two RMS norms
    P = L * per_layer + D  # and the final norm
    total, nonembed = flops.param_counts(cfg)
    assert (total, nonembed) == (P + 2 * V * D, P)
    batch = {
        "with_segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]),  # 9 tokens; 6 + 3 + 10 pairs
        "without_segment_ids": np.array([[1, 2, 2, 0], [1, 1, 0, 0]]),  # 5 tokens; 1 + 3 + 3 pairs
        "labels": np.array([[5, -100, 0], [-100, -100, 9]]),  # 3 targets (token id 0 is one)
    }
    count = flops.step_flops(cfg, batch)
    assert (count.layers, count.attention, count.head) == (
        6 * P * 14,
        12 * L * H * Hd * 26,
        6 * D * V * 2 * 3,
    )


@pytest.mark.parametrize(
    "loss, passes",
    [
        ({}, (3, 3)),  # nextquill: L_n on the with stream, L_p backpropagated through both
        ({"variant": "sft"}, (0, 3)),
        ({"variant": "context_sft"}, (3, 0)),
        ({"variant": "dce"}, (3, 1)),  # the dynamic DCE's stream under a stop-gradient
        ({"variant": "dce", "dce": "fixed"}, (3, 0)),  # the reference's DCE: the model's other stream unused
        ({"variant": "js"}, (3, 1)),
        ({"variant": "js", "js_detach": False}, (3, 3)),
        ({"variant": "mce", "counterfactual_grad": False}, (3, 1)),
        ({"variant": "dce", "anchor": 0.5}, (3, 3)),
    ],
)
def test_step_flops_counts_each_stream_as_the_variant_computes_it(loss, passes):
    """`bench scale` times any variant: it counted both streams forward and backward for each, so sft's MFU
    was 5.7x and dce's 1.13x the true one at the Qwen2.5-1.5B shape. A stream the loss backpropagates costs
    3 passes, one under a stop-gradient 1, one it does not compute 0."""
    from nextquill_jax.loss import LossConfig

    cfg = model_preset("qwen2.5-0.5b", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, bos_token_id=TINY_EOS_ID,
                       eos_token_ids=(TINY_EOS_ID,))  # fmt: skip
    loss_cfg = LossConfig(**loss)
    assert flops.stream_passes(loss_cfg) == passes
    batch = {
        "with_segment_ids": np.array([[1, 1, 1, 0]]),  # 3 tokens, 6 pairs
        "without_segment_ids": np.array([[1, 1, 0, 0]]),  # 2 tokens, 3 pairs
        "labels": np.array([[4, 5]]),
    }
    P = flops.param_counts(cfg)[1]
    count = flops.step_flops(cfg, batch, loss=loss_cfg)
    w, o = passes
    assert (count.layers, count.attention, count.head) == (
        2 * P * (3 * w + 2 * o),
        4 * 1 * 2 * 8 * (6 * w + 3 * o),
        2 * 16 * 64 * (w + o) * 2,
    )


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),  # SXM: 1,979 TFLOP/s with sparsity, halved
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 PCIe", 756.5),  # were given the SXM figure: MFU 1.31x too low
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200 NVL", 835.5),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),  # v5p's device_kind on a TPU VM (it got no MFU)
        ("cpu", None),
    ],
)
def test_peak_tflops_is_each_cards_dense_bf16_figure(kind, peak):
    assert flops.peak_tflops(kind) == peak


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("loss", "step", "attention", "padding", "compile", "mfu", "prefill", "scale"):
        assert name in BENCHMARKS
        assert f"\n  {name} " in text


def test_the_readme_names_the_script_of_each_bench_name_that_is_not_name_py():
    """README, "Benchmarks": `python benchmarks/NAME.py` runs `bench NAME`, except for the names it lists with
    their script (`loss`: loss_memory.py; `scale`: in the package). Every listed script exists."""
    readme = (REPO / "README.md").read_text()
    section = " ".join(readme[readme.index("## Benchmarks") :].split())
    assert "`python benchmarks/NAME.py` for every NAME but" in section
    for name, (script, _) in BENCHMARKS.items():
        if script is None:
            assert f"`{name}`, the harness in the package, `nextquill_jax/bench/sweep.py`" in section
        else:
            assert (benchmarks_dir() / script).is_file(), script
            if script != f"{name}.py":
                assert f"`{name}`, whose script is `benchmarks/{script}`" in section


# The tiny model at a small packed shape, two rows (compile only: a few seconds a program).
TINY_COST_SHAPE = [
    *("--models", "tiny", "--rows", "2", "--seq-len", "512", "--history", "2", "--context-tokens", "64"),
    *("--entry-tokens", "64", "--target-tokens", "48", "--compute-dtype", "float32"),
]


def tiny_cost_shape(**values: str) -> list[str]:
    """TINY_COST_SHAPE with the values of some of its flags replaced (`seq_len="64"`: --seq-len 64); mfu.py
    takes each flag once."""
    argv = list(TINY_COST_SHAPE)
    for name, value in values.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = value
    return argv


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PreparedLengths:
    """Stands in for a PreparedSplit of two examples with these token counts (what benchmarks/padding.py
    checks before it plans batches)."""

    def __len__(self):
        return 2

    def lengths(self, field):
        return {"prompt_with": np.array([100, 1121]), "prompt_without": np.array([40, 111]),
                "target": np.array([30, 68])}[field]  # fmt: skip


def test_padding_below_its_minimum_efficiency_says_so_on_stderr_and_fails(monkeypatch, capsys):
    """The failed check went to stdout, inside the table a caller redirects to a file."""
    padding = benchmark_script("padding")
    shares = dict.fromkeys(("efficiency", "efficiency_with", "efficiency_without", "response_slot_use"), 0.5)
    stats = SimpleNamespace(**shares, batches=1, shapes=1)
    monkeypatch.setattr(padding, "synthetic_train_split", lambda *a, **k: PreparedLengths())
    row = {"stats": stats, "shape": "-", "plan_s": 0, "epoch_s": 0}
    monkeypatch.setattr(padding, "pipeline_row", lambda *a: row)
    monkeypatch.setattr(padding, "public_efficiency", lambda split: 0.1)
    assert padding.main(["--seq-len", "2048", "--min-efficiency", "0.9"]) == 1
    out, err = capsys.readouterr()
    assert err == "error: packing efficiency 50.0% < 90% (--min-efficiency) at seq_len 2048\n"
    assert "efficiency 50.0%" not in out and "| pack 2048 |" in out


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--seq-len", "1024", "2048"],
         "error: --seq-len 1024 is below the longest example of this data (1189 with-stream tokens: "
         "prompt_with + target), which would fit no row. Fix: pass --seq-len values of at least 1189, e.g. "
         "--seq-len 1280, or lower --max-history.\n"),
        (["--seq-len", "2048", "--check-seq-len", "1024"],
         "error: --check-seq-len 1024 is not one of --seq-len [2048], so nothing would be checked. Fix: add "
         "1024 to --seq-len, or pass one of them as --check-seq-len.\n"),
        (["--rows-per-batch", "0"], "error: argument --rows-per-batch: expected an integer >= 1, got '0'\n"),
    ],
)  # fmt: skip
def test_padding_refuses_flags_that_fit_no_row_or_check_nothing(monkeypatch, capsys, flags, said):
    """A --seq-len below the longest example is an argument error naming a length that fits (it was the
    pipeline's traceback), before any batch is planned."""
    padding = benchmark_script("padding")
    monkeypatch.setattr(padding, "synthetic_train_split", lambda *a, **k: PreparedLengths())
    monkeypatch.setattr(padding, "pipeline_row", lambda *a: pytest.fail("planned batches"))
    with pytest.raises(SystemExit) as exit_info:
        padding.main(flags)
    assert exit_info.value.code == 2 and capsys.readouterr().err.endswith(f": {said}")
    assert padding.too_short(PreparedLengths(), [1189, 2048], 128) is None  # the longest example fits whole


@pytest.mark.parametrize(
    ("script", "flag"),
    [("loss_memory", "--tokens"), ("step", "--examples"), ("attention", "--seq-len"), ("compile", "--rows"),
     ("mfu", "--rows"), ("mfu", "--scan-unroll"), ("prefill", "--lengths"), ("lora", "--rank"),
     ("padding", "--users"), ("cudnn_mask", "--max-segments"), ("checksums", "--rounds"),
     ("gguf_read", "--rounds"), ("compile_scan", "--repeats"), ("compile_scan", "--layers"),
     ("mfu", "--warmup")],
)  # fmt: skip
def test_benchmarks_refuse_a_count_below_one_as_an_argument_error(monkeypatch, capsys, script, flag):
    """A count of 0 is refused while the command line is parsed, naming the flag (it was a traceback from
    deep inside the benchmark, or in mfu.py an error naming --cudnn-max-segments)."""
    monkeypatch.syspath_prepend(str(benchmarks_dir()))  # compile.py imports compile_scan beside it
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script(script).main([flag, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument {flag}: expected an integer >= 1, got '0'\n")


# One single-valued option of each script in benchmarks/, given twice: (script, flag, first value, second).
_REPEATED_OPTION_CASES = [
    ("attention", "--seq-len", "64", "128"), ("checksums", "--rounds", "1", "2"),
    ("compile", "--rows", "1", "2"), ("compile_scan", "--repeats", "1", "2"),
    ("cudnn_mask", "--rows", "1", "2"), ("gguf_read", "--rounds", "1", "2"),
    ("gpu_attention_check", "--tolerance", "0.1", "0.2"), ("lora", "--rank", "4", "8"),
    ("loss_memory", "--vocab", "64", "128"), ("mfu", "--rows", "1", "2"),
    ("padding", "--users", "1", "2"), ("penalty_cost", "--seed", "0", "1"),
    ("prefill", "--batch", "1", "2"), ("readme_demo", "--out", "a", "b"),
    ("step", "--users", "1", "2"), ("study_report", "--seed", "0", "1"),
]  # fmt: skip


@pytest.mark.parametrize(("script", "flag", "first", "second"), _REPEATED_OPTION_CASES)
def test_benchmarks_refuse_an_option_given_twice(monkeypatch, capsys, script, flag, first, second):
    """argparse alone kept the last value silently (`--append-results a.md --append-results b.md` wrote b.md
    alone); every benchmark script parses with the CLI's parser, which refuses the second before measuring."""
    monkeypatch.syspath_prepend(str(benchmarks_dir()))  # compile.py imports compile_scan beside it
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script(script).main([flag, first, flag, second])
    assert exit_info.value.code == 2
    said = f"error: {flag} is given twice ({flag} {first}, then {flag} {second}); it takes one value."
    assert said in capsys.readouterr().err


def test_every_benchmark_script_is_checked_for_a_repeated_option():
    checked = {name for name, *_ in _REPEATED_OPTION_CASES}
    scripts = {p.stem for p in benchmarks_dir().glob("*.py")}
    assert scripts == checked, f"scripts without a repeated-option case: {sorted(scripts - checked)}"


@pytest.mark.parametrize("script", ["mfu", "prefill"])
def test_an_unknown_model_preset_is_an_argument_error_naming_the_known_ones(capsys, script):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script(script).main(["--models", "qwen2.5-0.5b", "nosuch"])
    assert exit_info.value.code == 2
    assert "error: --models: no preset nosuch; known: " in capsys.readouterr().err


@pytest.mark.parametrize("grouped_right", [True, False])
def test_cudnn_mask_checks_grouped_kv_where_jax_offsets_allow_it(
    monkeypatch, capsys, tmp_path, grouped_right
):
    """benchmarks/cudnn_mask.py against the CPU emulation of a jax whose kv offsets count the key's heads:
    the packed mode given grouped k / v as they are is checked and timed beside the repeated form. Where the
    API still reads keys at the query's stride (the probe misled), the grouped check fails and the script
    exits 1, the repeated form still passing."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models.cudnn_packed import kv_offsets_follow_key_heads
    from tests.models import cudnn_emulation

    cudnn_emulation.install(True, patch=monkeypatch.setattr)
    if not grouped_right:
        monkeypatch.setattr(fused, "dot_product_attention", cudnn_emulation.emulated_packed_attention(False))
    flags = ["--rows", "4", "--seq-len", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8"]
    code = benchmark_script("cudnn_mask").main(
        [*flags, "--repeats", "1", "--append-results", str(tmp_path / "r.md")]
    )
    kv_offsets_follow_key_heads.cache_clear()
    said = capsys.readouterr().out
    assert "Packed offsets: PASS" in said and "| packed: segment offsets (M = 4), grouped k/v |" in said
    assert f"Packed offsets with grouped k/v: {'PASS' if grouped_right else 'FAIL'}" in said
    assert code == (0 if grouped_right else 1)
    assert (
        "count the key's heads (grouped k/v checked and timed too): True" in (tmp_path / "r.md").read_text()
    )


def test_mfu_takes_cudnn_max_segments_auto_as_what_its_rows_hold(monkeypatch, capsys):
    """benchmarks/mfu.py --cudnn-max-segments N|auto (its step timed by the fake): `auto` builds the model for
    the most examples a row of its batch holds, as `bench scale` does, twice that with --joint-forward; a
    number below that is refused."""
    mfu = benchmark_script("mfu")

    FakeHarness.built, FakeHarness.bounds, FakeHarness.examples_per_row = [], [], []
    FakeHarness.unrolls = []
    monkeypatch.setattr(harness, "TrainingHarness", MfuFakeHarness)
    run = lambda *flags: mfu.main(
        ["--attention", "cudnn", "--compute-dtype", "bfloat16", "--steps", "1", *flags]
    )
    assert run("--cudnn-max-segments", "auto") == 0
    most = FakeHarness.examples_per_row[-1]
    assert most > 1 and FakeHarness.bounds == [most]  # the CPU shape packs several examples into a row
    assert f"| cudnn, segment offsets (M = {most}, auto) |" in capsys.readouterr().out
    assert run("--cudnn-max-segments", str(most + 1)) == 0 and FakeHarness.bounds[-1] == most + 1
    with pytest.raises(SystemExit):
        run("--cudnn-max-segments", str(most - 1))
    said = capsys.readouterr().err
    assert f"up to {most} examples (one segment each), more than cudnn_max_segments={most - 1}" in said
    # --joint-forward joins both streams of a row into one attention row: twice the segments.
    assert run("--cudnn-max-segments", "auto", "--joint-forward") == 0 and FakeHarness.bounds[-1] == 2 * most
    with pytest.raises(SystemExit):
        run("--cudnn-max-segments", str(most), "--joint-forward")
    said = capsys.readouterr().err
    assert f"up to {most} examples ({2 * most} segments: both streams of a row joined), more than " in said
    with pytest.raises(SystemExit):
        mfu.main(["--cudnn-max-segments", "auto"])  # CPU: the xla attention
    assert (
        "--cudnn-max-segments chooses cuDNN's packed attention: add --attention cudnn"
        in capsys.readouterr().err
    )
    assert len(FakeHarness.bounds) == 3  # no refused run built a model


def test_mfu_grouped_kv_patches_the_packed_mode_only_where_jax_allows_it(monkeypatch, capsys):
    """benchmarks/mfu.py --grouped-kv (its step timed by the fake): a usage error on a jax whose kv offsets
    count the query's heads (the installed one here, emulated) or without the packed mode; with the fix
    (emulated), the packed mode is called with repeat_kv=False and the attention column says so."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models import attention, cudnn_packed
    from tests.models.cudnn_emulation import emulated_fix_seqlen_offsets

    mfu = benchmark_script("mfu")
    FakeHarness.built, FakeHarness.bounds, FakeHarness.examples_per_row = [], [], []
    FakeHarness.unrolls = []
    monkeypatch.setattr(harness, "TrainingHarness", MfuFakeHarness)
    monkeypatch.setattr(attention, "cudnn_packed_attention", attention.cudnn_packed_attention)  # undone after
    flags = ["--attention", "cudnn", "--compute-dtype", "bfloat16", "--steps", "1", "--grouped-kv"]
    for fixed, extra, said in (
        (False, ["--cudnn-max-segments", "auto"], "kv offsets by the query's heads (jax PR #39521 fixes it)"),
        (True, [], "--grouped-kv is an option of cuDNN's packed mode: add --attention cudnn"),
    ):
        monkeypatch.setattr(fused, "_fix_seqlen_offsets", emulated_fix_seqlen_offsets(fixed))
        cudnn_packed.kv_offsets_follow_key_heads.cache_clear()
        with pytest.raises(SystemExit):
            mfu.main([*flags, *extra])
        assert said in capsys.readouterr().err
    assert FakeHarness.bounds == []  # no refused run built a model
    assert mfu.main([*flags, "--cudnn-max-segments", "auto"]) == 0
    cudnn_packed.kv_offsets_follow_key_heads.cache_clear()
    assert ", auto), grouped k/v |" in capsys.readouterr().out
    assert attention.cudnn_packed_attention.keywords == {"repeat_kv": False}


GPU_CHECKS = REPO / "benchmarks" / "gpu_checks.sh"


def run_gpu_checks(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run benchmarks/gpu_checks.sh OUT_DIR ARGS with `PYTHON` a recorder: each Python call only appends
    {"argv": its arguments, "path": its PYTHONPATH} to a log. Returns the script's result and the calls."""
    log = tmp_path / "calls.jsonl"
    recorder = tmp_path / "python"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'path': os.environ.get('PYTHONPATH')}) + '\\n')\n"
    )
    recorder.chmod(0o755)
    done = subprocess.run(
        ["bash", str(GPU_CHECKS), str(tmp_path / "out"), *args],
        cwd=REPO, env={**os.environ, "PYTHON": str(recorder), **env}, capture_output=True, text=True,
    )  # fmt: skip
    return done, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def gpu_checks_commands(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """(check name, benchmark argv) for each check of benchmarks/gpu_checks.sh, in order (its `python -c`
    version probe left out)."""
    done, calls = run_gpu_checks(tmp_path)
    assert done.returncode == 0, done.stderr
    names = re.findall(r"^check (\S+) ", GPU_CHECKS.read_text(), re.MULTILINE)
    commands = [call["argv"] for call in calls if call["argv"][0] != "-c"]
    assert len(commands) == len(names) and len(names) >= 15, (names, commands)
    return list(zip(names, commands, strict=True))


def test_gpu_checks_installs_the_carried_wheels_first_and_puts_them_on_every_path(tmp_path):
    """With WHEELS set, the first Python call installs its wheels offline into a folder that every later call
    has on PYTHONPATH after the repository (the GPU image lacks grain); with no wheel there, nothing runs and
    the error names the folder."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    done, calls = run_gpu_checks(tmp_path, "mfu_breakdown", WHEELS=str(wheels), TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    install, *rest = calls
    site = str(tmp_path / "gpu_checks_site")
    assert install["argv"][:5] == ["-m", "pip", "install", "-q", "--no-index"]
    assert install["argv"][-3:] == [
        "--target",
        site,
        str(wheels / "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl"),
    ]
    assert len(rest) == 2 and rest[1]["argv"][0] == "benchmarks/mfu.py"  # the version probe, then the check
    assert all(call["path"].split(":")[:2] == [".", site] for call in rest)

    empty = tmp_path / "none"
    empty.mkdir()
    (tmp_path / "calls.jsonl").unlink()
    done, calls = run_gpu_checks(tmp_path, "mfu_breakdown", WHEELS=str(empty))
    assert (done.returncode, calls) == (1, [])
    assert f"no *.whl in WHEELS={empty}" in done.stderr


class StopAfterParsingError(Exception):
    """Raised in place of running a benchmark once its command line has parsed."""


def test_every_gpu_check_is_a_command_line_the_benchmarks_accept(tmp_path, monkeypatch, capsys):
    """The GPU lease is minutes long and the script never runs on CI: each of its checks must be a command
    the current benchmarks take. mfu.py's checks run through `main` as on a GPU backend (its shape,
    model and remat policy checked, each model config built) with the step timed by the fake; the others'
    command lines are parsed only (they compute on whatever device there is). The jax is one with PR #39521
    (emulated), as on the lent machines (0.11.2), so that mfu_best_grouped's --grouped-kv is taken."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from nextquill_jax.models import attention
    from nextquill_jax.models.cudnn_packed import kv_offsets_follow_key_heads
    from tests.models.cudnn_emulation import emulated_fix_seqlen_offsets

    mfu = benchmark_script("mfu")
    monkeypatch.setattr(harness, "TrainingHarness", MfuFakeHarness)
    monkeypatch.setattr(harness, "step_breakdown", lambda h, batch, steps: {"step": 0.004})
    monkeypatch.setattr(fused, "_fix_seqlen_offsets", emulated_fix_seqlen_offsets(True))
    monkeypatch.setattr(attention, "cudnn_packed_attention", attention.cudnn_packed_attention)  # undone after
    kv_offsets_follow_key_heads.cache_clear()
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(parser, args=None, namespace=None):
        parse_args(parser, args, namespace)
        raise StopAfterParsingError

    width = model_preset("qwen2.5-1.5b").hidden_size  # the shape every mfu check names
    checked = []
    for name, (path, *args) in gpu_checks_commands(tmp_path):
        script = Path(path).stem
        if script == "mfu":
            FakeHarness.built, FakeHarness.bounds, FakeHarness.unrolls = [], [], []
            with monkeypatch.context() as on_gpu:
                on_gpu.setattr(jax, "default_backend", lambda: "gpu")
                assert mfu.main(args) == 0, name
            assert FakeHarness.built and set(FakeHarness.built) == {width}, (name, FakeHarness.built)
        else:
            with monkeypatch.context() as parsing, pytest.raises(StopAfterParsingError):
                parsing.setattr(argparse.ArgumentParser, "parse_args", parse_only)
                benchmark_script(script).main(args)
        checked.append(name)
    kv_offsets_follow_key_heads.cache_clear()
    assert {"mfu_breakdown", "cudnn_mask", "prefill", "mfu_xla_flags", "mfu_best_grouped"} <= set(checked)


def test_a_results_section_records_the_xla_flags_it_was_measured_under(monkeypatch):
    # gpu_checks.sh's mfu_xla_flags check differs from mfu_breakdown by its XLA_FLAGS alone.
    flags = "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
    monkeypatch.setenv("XLA_FLAGS", flags)
    command = ["python", "benchmarks/mfu.py", "--breakdown"]
    assert f"- command: `XLA_FLAGS='{flags}' python benchmarks/mfu.py --breakdown`" in record.results_header(
        "Training-step throughput and MFU", command
    )
    monkeypatch.delenv("XLA_FLAGS")
    assert "- command: `python benchmarks/mfu.py --breakdown`" in record.results_header("T", command)


def test_mfu_scan_unroll_builds_a_model_per_value_and_says_so_in_the_remat_column(monkeypatch, capsys):
    """benchmarks/mfu.py --scan-unroll 1 2 (its step timed by the fake): a row per value, each timing a
    model with that `scan_unroll`; the remat column names an unroll other than 1."""
    mfu = benchmark_script("mfu")

    FakeHarness.built, FakeHarness.bounds, FakeHarness.unrolls = [], [], []
    monkeypatch.setattr(harness, "TrainingHarness", MfuFakeHarness)
    assert mfu.main(["--steps", "1", "--remat", "full", "--scan-unroll", "1", "2"]) == 0
    assert FakeHarness.unrolls == [1, 2]
    rows = [line for line in capsys.readouterr().out.splitlines() if "| tiny |" in line]
    assert [row.split(" | ")[3] for row in rows] == ["full", "full, unroll 2"]


def test_mfu_breakdown_follows_the_table_on_the_console_as_in_the_results_file(monkeypatch, capsys, tmp_path):
    """The parts of each row's step are listed after the whole table (they used to be printed between its
    header and its rows, which broke the console's Markdown), in the same lines the results file gets."""
    mfu = benchmark_script("mfu")
    monkeypatch.setattr(harness, "TrainingHarness", MfuFakeHarness)
    monkeypatch.setattr(harness, "step_breakdown", lambda h, batch, steps: {"forward": 0.001, "step": 0.004})
    results = tmp_path / "RESULTS.md"
    args = ["--steps", "1", "--remat", "none", "full", "--breakdown", "--append-results", str(results)]
    assert mfu.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    table_start = printed.index(mfu.COLUMNS)
    table = printed[table_start : table_start + 4]
    assert [line.startswith("|") for line in table] == [True] * 4, printed
    after = printed[table_start + 4 :]
    parts = [
        "- tiny, remat none: forward 1.0 ms, step 4.0 ms",
        "- tiny, remat full: forward 1.0 ms, step 4.0 ms",
    ]
    assert after == ["", mfu.BREAKDOWN_TITLE, "", *parts], printed
    assert results.read_text().endswith("\n".join([*table, "", mfu.BREAKDOWN_TITLE, "", *parts]) + "\n")


def test_mfu_cost_analysis_command_counts_the_recomputed_forward_and_appends_its_section(tmp_path, capsys):
    """`benchmarks/mfu.py --cost-analysis` end to end on the tiny shape (compile only): a row for remat none,
    the fused loss alone and remat full, in the appended section too. The executed matmul FLOPs are at least
    the useful count in every part, dense attention executes the masked pairs too (ratio > 1), full remat
    executes the layers' forward again (more FLOPs, less temporary memory), and the fused loss alone is the
    step's LM-head work. Every dot has a source, so no note is printed."""
    mfu = benchmark_script("mfu")
    results = tmp_path / "RESULTS.md"
    assert mfu.main(["--cost-analysis", *TINY_COST_SHAPE, "--append-results", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "note:" not in printed
    rows = [line for line in printed.splitlines() if line.startswith("| tiny")]
    cells = {}
    for line in rows:
        c = [x.strip() for x in line.strip("|").split("|")]
        cells[(c[0], c[2])] = dict(
            useful=float(c[5]), executed=float(c[6]), ratio=float(c[7]), layers=c[8], attention=c[9],
            head=float(c[10]), temp=float(c[12]),
        )  # fmt: skip
    assert list(cells) == [("tiny", "none"), ("tiny: fused loss alone", "-"), ("tiny", "full")]
    none, full, loss = (
        cells[("tiny", "none")],
        cells[("tiny", "full")],
        cells[("tiny: fused loss alone", "-")],
    )
    for row in (none, full, loss):
        assert row["executed"] >= row["useful"] > 0 and row["ratio"] >= 1.0 and row["head"] >= 1.0
        assert row["ratio"] == pytest.approx(row["executed"] / row["useful"], rel=2e-3)
    for row in (none, full):
        assert float(row["layers"]) >= 1.0 and float(row["attention"]) > 1.0
    assert none["useful"] == full["useful"] and full["executed"] > none["executed"]
    assert float(full["layers"]) > float(none["layers"]) and full["temp"] < none["temp"]
    assert loss["head"] == none["head"] == full["head"]
    section = results.read_text()
    assert "Executed vs useful FLOPs of the training step (XLA cost analysis)" in section
    assert all(line in section for line in rows) and "note:" not in section


def test_mfu_cost_analysis_notes_dots_without_a_source(tmp_path, capsys):
    """With one row per step XLA's batch-dot simplification drops the attention products' source location,
    so `executed_flops` can only count them in `layers`: the command says so, with their share, in its output
    and in the appended section, so that the row's attention ratio of 0 is not read as measured."""
    results = tmp_path / "RESULTS.md"
    argv = ["--cost-analysis", *tiny_cost_shape(rows="1"), "--remat", "none"]
    assert benchmark_script("mfu").main([*argv, "--append-results", str(results)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: tiny, remat none: ")
    share = float(notes[0].split(": ")[2].split("%")[0])
    assert 0 < share < 100
    assert f"\n\n- {notes[0]}\n" in results.read_text()


def test_mfu_names_seq_len_when_an_example_does_not_fit_it(capsys):
    """An example longer than --seq-len was reported as a --cudnn-max-segments error."""
    with pytest.raises(SystemExit) as e:
        benchmark_script("mfu").main(["--cost-analysis", *tiny_cost_shape(seq_len="64")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --seq-len: an example of " in err and "does not fit seq_len 64. Fix: a larger" in err, err


def test_mfu_cost_analysis_refuses_a_packed_bound_below_the_rows_before_compiling(capsys):
    """As the timed path: `--cudnn-max-segments` below the examples a row holds is a usage error (exit 2),
    not a traceback."""
    argv = [*tiny_cost_shape(compute_dtype="bfloat16"), "--attention", "cudnn", "--cudnn-max-segments", "1"]
    with pytest.raises(SystemExit) as e:
        benchmark_script("mfu").main(["--cost-analysis", *argv])
    assert e.value.code == 2
    assert "error: --cudnn-max-segments: the batch's rows hold up to " in capsys.readouterr().err
