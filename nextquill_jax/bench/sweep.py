"""The scaling-study sweep (`nextquill-jax bench scale`).

The sweep (a YAML file, e.g. `configs/scaling/tiny_cpu.yaml`) crosses model sizes, with-stream sequence
lengths, history lengths and mesh shapes. For every point it builds a batch of synthetic examples (random
token ids with fixed prompt / history / target lengths, packed into rows by the pipeline's first-fit packer),
compiles the real train step (`train.step.make_train_step`: two forward passes, fused NextQuill loss,
backward, clipped AdamW), runs `warmup_steps` untimed and `timed_steps` timed steps, and appends one row to
`<output_dir>/scaling.csv`. A PNG plot (`scaling.png`: tokens/s, memory and MFU against each swept variable)
is redrawn from the whole CSV at the end.

A CSV row is keyed by its point (model name, seq_len, history, mesh); everything else its numbers depend on
(the other fields of the file, each measured model's preset and overrides, the backend and device kind) is
recorded next to it in `scaling_settings.json` (`sweep_settings`). Points already in the CSV are skipped, so
an interrupted sweep resumes where it stopped, and a sweep may add points (a model, a seq_len, ...) to an
existing CSV. A sweep whose settings differ from those the CSV's rows were measured with is refused before
any point runs, listing `key: old -> new`: re-measuring would discard rows that may have cost hours of
accelerator time, and keeping them would put numbers of two settings in one table and plot.

The FLOP model is `bench.flops`; the step is timed by `bench.harness`; the plot is `bench.plot`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nextquill_jax.argument_parser import ArgumentParser
from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.bench.flops import param_counts, peak_tflops, step_flops
from nextquill_jax.bench.harness import StepTiming, TrainingHarness, synthetic_batch
from nextquill_jax.bench.plot import plot_rows
from nextquill_jax.bench.record import append_results, invoked_command, results_file, results_header
from nextquill_jax.config import (
    AttentionImpl,
    ModelRunConfig,
    RunDtype,
    checked_cudnn_max_segments,
    typed_architecture_overrides,
)
from nextquill_jax.config_schema import ConfigError, build, check_choices, read_yaml, with_line
from nextquill_jax.data.assemble import RowShape
from nextquill_jax.loss import LossConfig, Variant
from nextquill_jax.mesh_sizes import MESH_AXES, checked_shape, mesh_entry
from nextquill_jax.models.config import ModelConfig, SpecialIdsOutsideVocabError, check_scan_unroll
from nextquill_jax.subcommand import error_line
from nextquill_jax.train.resume import config_changes, listed_changes


@dataclass(frozen=True)
class SweepModel:
    """One model size of a sweep: a preset with architecture overrides, named for the CSV and the plot.

    Fields:
        `name`: the model's name in the CSV and the plot; unique within the sweep.
        `preset`: a `model_preset` name (`nextquill_jax/models/presets.py`), randomly initialised.
        `overrides`: architecture fields that replace the preset's, as `model.overrides` of a training
            config (the same keys and checks), e.g. `{hidden_size: 64, num_layers: 2}`.
    """

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScalingConfig:
    """A scaling sweep (YAML). Every combination of `models` × `seq_len` × `history` × `mesh` is one point.

    Fields:
        `output_dir`: where `scaling.csv` (one row per point), `scaling_settings.json` (the settings its rows
            were measured with) and `scaling.png` go; `--output-dir` replaces it. A CSV measured with other
            settings is refused, naming them.
        `models`: the model sizes, at least one.
        `seq_len`: with-stream tokens per row, at least one value; each >= 1.
        `history`: history entries per example, at least one value; each >= 0.
        `mesh`: mesh sizes as in the train config's `mesh` section (`{data: 1, fsdp: -1, tensor: 1}`); an
            unknown axis, a size of 0 or below -1, or two -1s is refused when the file is read; a
            shape that does not fit the devices present, whose batch shards (data × fsdp) do not split
            `rows` into `micro_batches` equal micro-batches each, or whose axes do not divide a model's
            dimensions (tensor 4 over 2 kv heads, say), is skipped with a line saying why (and not written).
        `rows`: rows of the global batch; a multiple of data × fsdp × `micro_batches` of each mesh shape
            measured (8 devices under `{data: 1, fsdp: -1, tensor: 1}`: a multiple of 8).
        `context_tokens`: tokens of an example's without-history prompt.
        `entry_tokens`: tokens per history entry (the with-history prompt: `context_tokens` + `history` ×
            this).
        `target_tokens`: tokens of an example's target.
        `length_multiple`: the without stream and the response slots are rounded up to a multiple of this
            (as the pipeline's `data.batching.length_multiple`).
        `loss_variant`: the loss variant timed (`loss.variant`).
        `micro_batches`: micro-batches per step (`train.micro_batches`).
        `param_dtype`: as `model.param_dtype`.
        `compute_dtype`: as `model.compute_dtype`.
        `remat_policy`: as `model.remat_policy`.
        `scan_unroll`: as `model.scan_unroll` (decoder layers per iteration of the layer scan).
        `attention_impl`: as `model.attention_impl`.
        `cudnn_max_segments`: with `attention_impl: cudnn`: cuDNN's packed mode with at most this many
            examples per row (`model.cudnn_max_segments`); `auto` (the default; null with another
            `attention_impl`): the most examples a row of the point's batch holds; a point whose rows hold
            more than a number set here is skipped. null: the dense mask. `--cudnn-max-segments` replaces
            it.
        `warmup_steps`: untimed steps after compilation, at least 1 (the first one's loss is the row's
            `first_loss`).
        `timed_steps`: timed steps; the fastest gives the point's step time.
        `peak_tflops`: per-chip peak TFLOP/s for MFU (> 0); null: from the device kind where known.
        `seed`: seed of the synthetic examples and the random weights.
    """

    output_dir: str
    models: list[SweepModel]
    seq_len: list[int]
    history: list[int]
    mesh: list[dict[str, int]] = field(default_factory=lambda: [{"data": 1, "fsdp": -1, "tensor": 1}])
    rows: int = 2
    context_tokens: int = 64
    entry_tokens: int = 64
    target_tokens: int = 32
    length_multiple: int = 128
    loss_variant: Variant = "nextquill"
    micro_batches: int = 1
    param_dtype: RunDtype = "float32"
    compute_dtype: RunDtype = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1
    attention_impl: AttentionImpl = "xla"
    cudnn_max_segments: int | Literal["auto"] | None = "auto"
    warmup_steps: int = 1
    timed_steps: int = 3
    peak_tflops: float | None = None
    seed: int = 0

    def __post_init__(self):
        check_choices(self)
        for name in ("models", "seq_len", "history", "mesh"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` needs at least one value")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"`models` names must be unique, got {names}")
        for name in (
            "rows",
            "context_tokens",
            "entry_tokens",
            "target_tokens",
            "length_multiple",
            "warmup_steps",
            "timed_steps",
            "micro_batches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:  # `not >`: NaN fails it too
            raise ValueError(f"`peak_tflops` must be > 0 or null, got {self.peak_tflops}")
        if any(s < 1 for s in self.seq_len):
            raise ValueError(f"`seq_len` values must be >= 1, got {self.seq_len}")
        if any(h < 0 for h in self.history):
            raise ValueError(f"`history` values must be >= 0, got {self.history}")
        segments = checked_cudnn_max_segments(self.cudnn_max_segments, self.attention_impl, "")
        object.__setattr__(self, "cudnn_max_segments", segments)
        check_scan_unroll(self.scan_unroll, "`scan_unroll`")
        for i, entry in enumerate(self.mesh):  # a misspelt entry would skip every point of it, at run time
            try:
                checked_shape(entry, entry=True)
            except ValueError as e:
                raise ValueError(f"`mesh[{i}]`: {e}") from None
        for i, model in enumerate(self.models):
            typed_architecture_overrides(model.overrides, f"models[{i}].overrides.", "")
            try:
                self.model_config(model)
            except ValueError as e:
                # ModelConfig names the fix of its special ids in a training config's keys: here, this file's.
                prefix = f"models[{i}].overrides."
                said = e.message(prefix) if isinstance(e, SpecialIdsOutsideVocabError) else e
                raise ValueError(f"`models[{i}]` ({model.name!r}): {said}") from None

    def model_config(self, model: SweepModel) -> ModelConfig:
        """The ModelConfig of one sweep model with this sweep's runtime settings but `cudnn_max_segments`,
        which each point sets (`packed_bound`: `auto` depends on the point's rows)."""
        section = ModelRunConfig(
            preset=model.preset,
            overrides=model.overrides,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
            remat_policy=self.remat_policy,
            scan_unroll=self.scan_unroll,
            attention_impl=self.attention_impl,
            cudnn_max_segments=None,
        )
        return section.model_config()


CSV_COLUMNS: tuple[str, ...] = (
    "model", "params", "params_nonembed", "seq_len", "history", "mesh", "devices", "rows",
    "seq_len_without", "response_slots", "input_tokens", "target_tokens", "padding_efficiency",
    "compile_s", "step_s", "tokens_per_s", "target_tokens_per_s", "flops_per_step", "tflops_per_s", "mfu",
    "compiled_temp_mib", "compiled_total_mib", "device_peak_mib", "first_loss", "backend", "device_kind",
)  # fmt: skip
KEY_COLUMNS: tuple[str, ...] = ("model", "seq_len", "history", "mesh")
SETTINGS_FILE = "scaling_settings.json"
# Fields of a sweep that are no setting of a point: where it is written, and the axes, whose values are in
# each row's key (KEY_COLUMNS) and which a sweep may extend. A model's preset and overrides are recorded by
# its name.
_NOT_SETTINGS = ("output_dir", "models", "seq_len", "history", "mesh")


def load_scaling_config(
    path: str | Path, output_dir: str | None = None, cudnn_max_segments: int | str | None = None
) -> ScalingConfig:
    """Read a sweep YAML file (unknown keys and wrong types are errors naming the key); `output_dir` and
    `cudnn_max_segments`, when given, replace the file's.

    Raises:
        ConfigError: as `config.load_config` (a missing file included).
    """
    raw = read_yaml(path)
    if isinstance(raw, dict) and "models" not in raw and {"model", "train"} & set(raw):
        raise ConfigError(
            f"{path} is a training config (sections {', '.join(map(str, raw))}), not a sweep file. Fix: run "
            f"`nextquill-jax train --config {path}`, or pass a sweep file (configs/scaling/)."
        )
    if output_dir is not None:
        raw["output_dir"] = output_dir
    if cudnn_max_segments is not None:
        raw["cudnn_max_segments"] = cudnn_max_segments
    try:
        return build(ScalingConfig, raw, "", str(path))
    except ConfigError as e:
        raise with_line(e, path) from None


def packed_bound(setting: int | str | None, batch: dict[str, np.ndarray], joined: bool = False) -> int | None:
    """The `ModelConfig.cudnn_max_segments` for `batch` of a `cudnn_max_segments` setting (a sweep's or
    `benchmarks/mfu.py --cudnn-max-segments`): None stays None, `auto` becomes the most segments an
    attention row holds, a number is itself. A row of `batch` numbers its examples 1, 2, ..., so its largest
    segment id is its example count; `joined` (the step joins both streams of a row into one attention row,
    `train.step.joins_streams`) doubles it.

    Raises:
        ValueError: an attention row holds more segments than the number set (cuDNN's packed attention would
            make its step non-finite).
    """
    if setting is None:
        return None
    examples = int(batch["with_segment_ids"].max())
    most = 2 * examples if joined else examples
    if setting == "auto":
        return most
    if most > setting:
        held = f"{most} segments: both streams of a row joined" if joined else "one segment each"
        raise ValueError(
            f"the batch's rows hold up to {examples} examples ({held}), more than "
            f"cudnn_max_segments={setting} (cuDNN's packed attention would make them non-finite); set it to "
            f"{most} or more, or auto"
        )
    return setting


def mesh_label(shape: Sequence[int]) -> str:
    """ "data=1,fsdp=2,tensor=1" for a resolved mesh shape."""
    return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True))


def point_label(model: str, seq_len: int | str, history: int | str, mesh: str) -> str:
    """How progress and skip lines name a point: "tiny-32 seq_len 128 history 1 mesh data=1,fsdp=2,tensor=1"
    (`mesh`: the resolved shape as the CSV's `mesh` column writes it, or the file's entry where it resolves to
    no shape)."""
    return f"{model} seq_len {seq_len} history {history} mesh {mesh}"


def batch_misfit(rows: int, shards: int, micro_batches: int, entry: Mapping[str, int]) -> str | None:
    """Why a global batch of `rows` rows cannot be split over the `shards` batch shards (mesh data x fsdp) of
    the sweep's mesh `entry`, each into `micro_batches` equal micro-batches (naming the fix); None when it
    can. Placing such a batch would fail inside JAX (an IndivisibleError), so the sweep skips the point."""
    if rows % (shards * micro_batches) == 0:
        return None
    micro = micro_batches > 1
    into = f" of micro_batches={micro_batches} equal micro-batches each" if micro else ""
    return (
        f"rows {rows} do not split over the mesh's {shards} batch shards (data x fsdp){into}. Fix: set rows "
        f"to a multiple of {shards * micro_batches}, or use another mesh entry than {mesh_entry(entry)} (one "
        f"whose data x fsdp{' x micro_batches' if micro else ''} divides {rows})."
    )


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of an existing sweep CSV ([] when absent).

    Raises:
        ConfigError: the file's header is not this harness's (naming the file and the fix).
    """
    if not csv_path.exists():
        return []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ConfigError(
                f"{csv_path}: its columns {reader.fieldnames} are not the scaling harness's "
                f"{list(CSV_COLUMNS)}. "
                "Fix: move the file away or set a new output_dir."
            )
        return list(reader)


def row_key(row: Mapping[str, str]) -> tuple[str, ...]:
    """A CSV row's point, its `KEY_COLUMNS` values: what a sweep measures once."""
    return tuple(row[k] for k in KEY_COLUMNS)


def sweep_settings(cfg: ScalingConfig, backend: str, device_kind: str) -> dict[str, Any]:
    """What the numbers of a point of `cfg` depend on besides the point's key, as `scaling_settings.json`
    records them: {"sweep": every field of `cfg` but `output_dir` and the axes, "models": {name: {"preset",
    "overrides"}}, "device": {"backend", "device_kind"}}."""
    sweep = {name: getattr(cfg, name) for name in cfg.__dataclass_fields__ if name not in _NOT_SETTINGS}
    return {
        "sweep": sweep,
        "models": {m.name: {"preset": m.preset, "overrides": m.overrides} for m in cfg.models},
        "device": {"backend": backend, "device_kind": device_kind},
    }


def read_recorded_settings(settings_path: Path, csv_path: Path) -> dict[str, Any] | None:
    """The settings `settings_path` (`scaling_settings.json`) records for the rows of `csv_path`; None when
    there is no such file.

    Raises:
        ConfigError: the file is not JSON, or not an object with `sweep`, `models` and `device` (naming the
            file, what is wrong and the fix).
    """
    if not settings_path.exists():
        return None
    fix = (
        f"Fix: restore it from a copy, or delete {csv_path} and {settings_path} to measure every point "
        "again; the CSV's rows cannot be reused without the settings they were measured with."
    )
    try:
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{settings_path} is damaged: it is not JSON ({e}). {fix}") from None
    keys = recorded if isinstance(recorded, dict) else {}
    missing = [k for k in ("sweep", "models", "device") if k not in keys]
    if missing or not isinstance(recorded["models"], dict):
        what = f"no {', '.join(f'`{k}`' for k in missing)}" if missing else "`models` is not an object"
        raise ConfigError(f"{settings_path} is damaged: {what}, which {SETTINGS_FILE} always records. {fix}")
    if isinstance(recorded["sweep"], dict):  # written before sweeps had the setting: the rolled scan
        recorded["sweep"].setdefault("scan_unroll", 1)
    return recorded


def settings_to_record(
    recorded: dict[str, Any] | None, current: dict[str, Any], rows: Sequence[dict[str, str]], csv_path: Path
) -> dict[str, Any]:
    """The `scaling_settings.json` to write before a sweep with settings `current` (`sweep_settings`) adds
    rows to `csv_path`, whose rows are `rows` and whose recorded settings are `recorded` (None: no file):
    `current`, with the recorded settings of models the sweep no longer names (their rows stay in the CSV).
    Only models with rows are compared: a model not yet measured may change.

    Raises:
        ConfigError: `rows` were measured with other settings than `current` (naming each differing key, the
            recorded value first, and the fix), or the CSV has rows and `recorded` is None.
    """
    fix = (
        f"Fix: set a new output_dir (or --output-dir) for the changed sweep, or delete {csv_path} to measure "
        "every point again."
    )
    if rows and recorded is None:
        raise ConfigError(
            f"{csv_path} holds measured points but no {SETTINGS_FILE} next to it records the settings "
            f"they were measured with (an older version wrote it, or the file was deleted), so they cannot "
            f"be reused. {fix}"
        )
    if not rows:
        return current
    measured = {r["model"] for r in rows} & current["models"].keys()
    only_measured = lambda s: {**s, "models": {n: m for n, m in s["models"].items() if n in measured}}
    changes = config_changes(only_measured(recorded), only_measured(current), ignore=lambda _: False)
    if changes:
        raise ConfigError(
            f"{csv_path} holds points measured with other settings than the sweep's, so its rows would stand "
            f"for numbers they are not; differing, the CSV's value first: {listed_changes(changes)}. {fix}"
        )
    return {**current, "models": {**recorded["models"], **current["models"]}}


def run_sweep(
    cfg: ScalingConfig,
    echo: Callable[[str], None] = print,
    *,
    config_path: str | None = None,
    point: int | None = None,
) -> Path:
    """Run every point of `cfg` not yet in `<output_dir>/scaling.csv`, then redraw the plot.

    On an accelerator, given the `config_path` it came from, every point runs in a child process of its own
    (`--point INDEX`): the device's peak-memory statistic cannot be reset, so one process per point is what
    makes it per point, and a point that runs out of memory does not end the sweep. `point`: run only the
    point of that index (in the order of the product models × seq_len × history × mesh), in this process. A
    point whose mesh entry does not fit the devices, whose rows do not split over the mesh's batch shards
    (`batch_misfit`) or whose rows hold more examples than `cudnn_max_segments` is skipped with a line naming
    it, why and the fix; the others still run.

    Returns the CSV's path (absent when every point was skipped and none was measured before).

    Raises:
        ConfigError: the CSV is not this harness's, or its rows were measured with other settings than
            `cfg`'s on this device, or it has no `scaling_settings.json` (`settings_to_record`), or that
            file is damaged (`read_recorded_settings`).
    """
    import jax

    from nextquill_jax.parallel import batch_shard_count, make_mesh, resolve_mesh_shape
    from nextquill_jax.train.model_setup import param_shardings

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "scaling.csv"
    rows = read_rows(csv_path)
    device_kind = jax.devices()[0].device_kind
    settings_path = out / SETTINGS_FILE
    recorded = read_recorded_settings(settings_path, csv_path)
    record = settings_to_record(
        recorded, sweep_settings(cfg, jax.default_backend(), device_kind), rows, csv_path
    )
    # Written before the first point, replaced whole: an interrupted run leaves rows it describes.
    write_text_atomic(settings_path, json.dumps(record, indent=1) + "\n")
    done = {row_key(r) for r in rows}
    peak = cfg.peak_tflops or peak_tflops(device_kind)
    isolate = config_path is not None and point is None and jax.default_backend() != "cpu"
    points = itertools.product(cfg.models, cfg.seq_len, cfg.history, cfg.mesh)
    for index, (model, seq_len, history, sizes) in enumerate(points):
        if point is not None and index != point:
            continue
        try:
            shape = resolve_mesh_shape(sizes, jax.device_count(), spelling="entry")
        except ValueError as e:
            echo(f"skip {point_label(model.name, seq_len, history, mesh_entry(sizes))}: {e}")
            continue
        key = (model.name, str(seq_len), str(history), mesh_label(shape))
        label = point_label(*key)
        if key in done:
            echo(f"done already: {label}")
            continue
        mesh = make_mesh(sizes)
        misfit = batch_misfit(cfg.rows, batch_shard_count(mesh), cfg.micro_batches, sizes)
        if misfit:
            echo(f"skip {label}: {misfit}")
            continue
        model_cfg = cfg.model_config(model)
        try:  # a mesh axis that does not divide a parameter's dimension (tensor 4 over 2 kv heads, say)
            param_shardings(model_cfg, mesh)
        except ValueError as e:
            why = str(e).split(" Fix:")[0]  # its fix speaks of a training config's mesh.* keys
            echo(
                f"skip {label}: the model does not split over this mesh: {why} Fix: use another mesh entry "
                f"than {mesh_entry(sizes)} (one whose axis sizes divide the model's dimensions)."
            )
            continue
        if isolate:
            child = [sys.executable, "-m", "nextquill_jax.bench.sweep", "--config", config_path,
                     "--output-dir", cfg.output_dir, "--point", str(index)]  # fmt: skip
            if cfg.cudnn_max_segments is not None:  # it may come from the command line, not the file
                child += ["--cudnn-max-segments", str(cfg.cudnn_max_segments)]
            status = subprocess.call(child)
            if status:
                echo(f"point {label} failed (exit status {status}); continuing with the next")
            continue
        try:
            batch, row_shape = synthetic_batch(
                cfg.rows,
                seq_len,
                history,
                context_tokens=cfg.context_tokens,
                entry_tokens=cfg.entry_tokens,
                target_tokens=cfg.target_tokens,
                vocab=model_cfg.vocab_size,
                length_multiple=cfg.length_multiple,
                seed=cfg.seed,
            )
            bound = packed_bound(cfg.cudnn_max_segments, batch)
        except ValueError as e:
            echo(f"skip {label}: {e}")
            continue
        if bound is not None:
            model_cfg = model_cfg.replace(cudnn_max_segments=bound)
            chosen = " (auto: the most examples a row holds)" if cfg.cudnn_max_segments == "auto" else ""
            echo(f"{label}: cudnn_max_segments {bound}{chosen}")
        harness = TrainingHarness(
            model_cfg,
            mesh,
            loss=LossConfig(variant=cfg.loss_variant),
            micro_batches=cfg.micro_batches,
            seed=cfg.seed,
        )
        timing = harness.time(batch, warmup=cfg.warmup_steps, steps=cfg.timed_steps)
        del harness
        row = point_row(cfg, model, model_cfg, key, shape, batch, row_shape, timing, peak, device_kind)
        new_file = not csv_path.exists()
        with csv_path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        echo(
            f"{label}: {row['tokens_per_s']} tokens/s, step {row['step_s']} s, compile {row['compile_s']} s, "
            f"memory {row['compiled_total_mib']} MiB, MFU {row['mfu'] or '-'}"
        )
    if point is not None or not csv_path.exists():  # a point's child, or every point skipped: nothing to plot
        return csv_path
    plot_rows(read_rows(csv_path), out / "scaling.png", csv_path.name)
    return csv_path


def point_row(
    cfg: ScalingConfig,
    model: SweepModel,
    model_cfg: ModelConfig,
    key: tuple[str, ...],
    shape: Sequence[int],
    batch: dict[str, np.ndarray],
    row_shape: RowShape,
    timing: StepTiming,
    peak: float | None,
    device_kind: str,
) -> dict[str, str]:
    """One CSV row (all values as strings) from a timed point."""
    import jax

    total, nonembed = param_counts(model_cfg)
    flops = step_flops(model_cfg, batch, nonembed, LossConfig(variant=cfg.loss_variant)).total
    step_s = timing.best_step_s
    real = int((batch["with_segment_ids"] > 0).sum() + (batch["without_segment_ids"] > 0).sum())
    slots = batch["with_segment_ids"].size + batch["without_segment_ids"].size
    targets = int((batch["labels"] >= 0).sum())
    devices = math.prod(shape)
    tflops = flops / step_s / 1e12
    mfu = tflops / (peak * devices) if peak else None
    values: dict[str, Any] = {
        "model": key[0],
        "params": total,
        "params_nonembed": nonembed,
        "seq_len": key[1],
        "history": key[2],
        "mesh": key[3],
        "devices": devices,
        "rows": cfg.rows,
        "seq_len_without": row_shape.without_len,
        "response_slots": row_shape.response_slots,
        "input_tokens": real,
        "target_tokens": targets,
        "padding_efficiency": f"{real / slots:.4f}",
        "compile_s": f"{timing.compile_s:.3f}",
        "step_s": f"{step_s:.5f}",
        "tokens_per_s": f"{real / step_s:.1f}",
        "target_tokens_per_s": f"{targets / step_s:.1f}",
        "flops_per_step": f"{flops:.4e}",
        "tflops_per_s": f"{tflops:.4f}",
        "mfu": "" if mfu is None else f"{mfu:.4f}",
        "compiled_temp_mib": f"{timing.compiled_temp_mib:.2f}",
        "compiled_total_mib": f"{timing.compiled_total_mib:.2f}",
        "device_peak_mib": "" if timing.device_peak_mib is None else f"{timing.device_peak_mib:.1f}",
        "first_loss": f"{timing.first_loss:.6f}",
        "backend": jax.default_backend(),
        "device_kind": device_kind,
    }
    return {k: str(values[k]) for k in CSV_COLUMNS}


def max_segments_arg(text: str) -> int | str:
    """The argparse type of --cudnn-max-segments (here and in `benchmarks/mfu.py`): `auto` or an int >= 1
    (argparse reports anything else)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or auto, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """`nextquill-jax bench scale --config FILE [--output-dir DIR] [--cudnn-max-segments N|auto]
    [--results FILE]`."""
    parser = ArgumentParser(prog="nextquill-jax bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="a sweep YAML file, e.g. configs/scaling/tiny_cpu.yaml"
    )
    parser.add_argument("--output-dir", help="overrides the file's output_dir")
    parser.add_argument(
        "--cudnn-max-segments",
        type=max_segments_arg,
        metavar="N|auto",
        help="overrides the file's cudnn_max_segments (with attention_impl: cudnn: its packed mode for rows "
        "of at most N examples; auto: the most a row of each point holds)",
    )
    parser.add_argument(
        "--results", type=results_file, help="append the rows measured as a Markdown table to this file"
    )
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # one point, in a child process
    args = parser.parse_args(argv)
    try:
        cfg = load_scaling_config(args.config, args.output_dir, args.cudnn_max_segments)
    except ConfigError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    earlier = {row_key(r) for r in read_rows(Path(cfg.output_dir) / "scaling.csv")}
    csv_path = run_sweep(cfg, config_path=args.config, point=args.point)
    if args.point is not None:
        return 0
    if not csv_path.exists():
        print(
            f"error: no point of {args.config} was measured: each was skipped, for the reason its line above "
            "gives; nothing was written. Fix: as those lines say (rows, the mesh entries, or a machine with "
            "the devices they need).",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")
    if args.results:
        # Only the rows measured now: the CSV's earlier rows came from another run, on another day perhaps,
        # which this section's date, command and machine would misdescribe.
        rows = [r for r in read_rows(csv_path) if row_key(r) not in earlier]
        if not rows:
            print(
                f"nothing measured (each point was in {csv_path} already or skipped): {args.results} is "
                "unchanged"
            )
            return 0
        command = invoked_command(["nextquill-jax", "bench", "scale"], argv)
        cols = (
            "model",
            "params",
            "seq_len",
            "history",
            "mesh",
            "tokens_per_s",
            "compiled_total_mib",
            "device_peak_mib",
            "tflops_per_s",
            "mfu",
            "compile_s",
        )
        source = [f"config `{args.config}`; CSV `{csv_path}`"]
        if earlier:
            source.append(
                f"{len(earlier)} earlier row(s) of the CSV, measured by an earlier run, are not listed"
            )
        lines = results_header("Scaling sweep", command, source)
        lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(r[c] or "-" for c in cols) + " |" for r in rows]
        append_results(args.results, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
