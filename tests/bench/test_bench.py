"""The scaling harness's CSV (format, values, resume) and the `bench` command's listing.

The sweep's timing is replaced by a fixed fake (compiling the real step three times would take most of a
minute on CI's two cores; `benchmarks/RESULTS.md` records real sweeps), so these tests check what the harness
derives from a timing: token counts, the FLOP formula, throughput, resumption and the plot.
"""

from __future__ import annotations

import csv
from typing import ClassVar

import numpy as np
import pytest

from nextquill_jax import cli
from nextquill_jax.bench import flops, harness, sweep
from nextquill_jax.bench.command import BENCHMARKS
from nextquill_jax.config_schema import ConfigError

STEP_S = 0.25
TINY = {"vocab_size": 300, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "num_layers": 2}
SIZES = {"a": (32, 48), "b": (64, 96), "c": (96, 160)}  # name -> (hidden, mlp)


class FakeHarness:
    """Stands in for TrainingHarness: records the models it is built for, returns a fixed timing."""

    built: ClassVar[list[int]] = []

    def __init__(self, model_cfg, mesh, **kwargs):
        FakeHarness.built.append(model_cfg.hidden_size)

    def time(self, batch, *, warmup, steps):
        return harness.StepTiming(
            compile_s=1.5,
            step_s=[STEP_S + 0.1, STEP_S],
            first_loss=5.5,
            compiled_temp_mib=3.0,
            compiled_total_mib=4.0,
            device_peak_mib=None,
        )


def sweep_yaml(path, out, names) -> str:
    models = "\n".join(
        f"  - {{name: {n}, preset: qwen2.5-0.5b, overrides: {{hidden_size: {SIZES[n][0]}, "
        f"intermediate_size: {SIZES[n][1]}, " + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}}"
        for n in names
    )
    path.write_text(
        f"output_dir: {out}\nmodels:\n{models}\nseq_len: [128]\nhistory: [2]\nrows: 2\ncontext_tokens: 16\n"
        "entry_tokens: 20\ntarget_tokens: 8\nlength_multiple: 16\ntimed_steps: 2\n"
    )
    return str(path)


def qwen2_params(d: int, f: int, v: int, layers: int, h: int, k: int, hd: int) -> tuple[int, int]:
    """(total, non-embedding) parameters of a tied-embedding Qwen2, by the architecture's formula."""
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + (h + 2 * k) * hd + 3 * d * f + 2 * d
    nonembed = layers * per_layer + d
    return nonembed + v * d, nonembed


@pytest.fixture
def fake(monkeypatch):
    FakeHarness.built = []
    monkeypatch.setattr(sweep, "TrainingHarness", FakeHarness)
    return FakeHarness


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_csv_values_and_plot(tmp_path, fake):
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


def test_sweep_resumes_without_repeating_points(tmp_path, fake):
    out = tmp_path / "sweep"
    sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b"])])
    first = read(out / "scaling.csv")
    sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b", "c"])])
    rows = read(out / "scaling.csv")
    assert fake.built == [32, 64, 96]  # a and b were not run again
    assert rows[:2] == first and [r["model"] for r in rows] == ["a", "b", "c"]


def test_sweep_point_runs_one_point_only(tmp_path, fake):
    out = tmp_path / "sweep"
    assert (
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a", "b", "c"]), "--point", "1"]) == 0
    )
    assert fake.built == [64] and [r["model"] for r in read(out / "scaling.csv")] == ["b"]
    assert not (out / "scaling.png").exists()  # the parent of a point's process draws the plot


def test_sweep_refuses_a_foreign_csv(tmp_path, fake):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "scaling.csv").write_text("model,tokens_per_s\nx,1\n")
    with pytest.raises(ValueError, match="move the file away or set a new output_dir"):
        sweep.main(["--config", sweep_yaml(tmp_path / "s.yaml", out, ["a"])])


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


def test_shipped_cpu_sweep_has_three_model_sizes():
    cfg = sweep.load_scaling_config("configs/scaling/tiny_cpu.yaml")
    sizes = {flops.param_counts(cfg.model_config(m))[0] for m in cfg.models}
    assert len(sizes) == 3
    gpu = sweep.load_scaling_config("configs/scaling/gpu_qwen.yaml")
    assert [m.preset for m in gpu.models] == ["qwen2.5-0.5b", "qwen2.5-1.5b"]


def test_causal_pairs_counts_each_segment():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert flops.causal_pairs(seg) == (6 + 3) + 21


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("loss", "step", "attention", "padding", "compile", "mfu", "prefill", "scale"):
        assert name in BENCHMARKS
        assert f"\n  {name} " in text
