"""Timing the training step, counting its FLOPs, and the scaling-study sweep (`nextquill-jax bench scale`).

The sweep (a YAML file, e.g. `configs/scaling/tiny_cpu.yaml`) crosses model sizes, with-stream sequence
lengths, history lengths and mesh shapes. For every point it builds a batch of synthetic examples (random
token ids with fixed prompt / history / target lengths, packed into rows by the pipeline's first-fit packer),
compiles the real train step (`train.step.make_train_step`: two forward passes, fused NextQuill loss,
backward, clipped AdamW), runs `warmup_steps` untimed and `timed_steps` timed steps, and appends one row to
`<output_dir>/scaling.csv`. Points already in the CSV are skipped, so an interrupted sweep resumes where it
stopped. A PNG plot (`scaling.png`: tokens/s, memory and MFU against each swept variable) is redrawn from the
whole CSV at the end.

FLOPs: the useful work of one step, both forward passes and the backward pass (backward = 2 × forward):

    FLOPs = 6 · P · (N_w + N_o)                       decoder layers (dense matmuls)
          + 12 · L · H · Hd · (A_w + A_o)             attention scores and values, causal, per segment
          + 6 · D · V · 2 · N_y                       LM head at the target positions of both streams

P: parameters other than the embedding and the LM head; N_w, N_o: real (non-padding) tokens of the with- and
without-history streams; L layers, H query heads of size Hd; A = Σ over examples of n(n+1)/2 (the query-key
pairs a causal mask leaves inside one example of n tokens: padding and cross-example pairs are not useful);
D hidden size, V vocabulary, N_y target tokens. The difference logits z_h − z_∅ need no extra matmul in this
count (they are a subtraction of logits already counted). MFU = FLOPs / step time / peak FLOP/s of the chips.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nextquill_jax.config import ConfigError, ModelSection, OptimConfig, build
from nextquill_jax.data.assemble import RowShape, assemble_batch
from nextquill_jax.data.packing import first_fit_rows
from nextquill_jax.losses import LossConfig
from nextquill_jax.models.config import ModelConfig

MIB = 2**20

# Dense bf16 peak TFLOP/s per chip, by a substring of the lower-case `jax.Device.device_kind`.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("h200", 989.4),
    ("h100", 989.4),
    ("a100", 312.0),
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
)


# ----------------------------------------------------------------------------------------------------
# Where and how a number was measured


def machine_description() -> dict[str, str]:
    """Date, CPU model and cores, JAX backend and device, library versions: what RESULTS.md rows need."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    devices = jax.devices()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} × {devices[0].device_kind}",
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}",
    }


def results_header(title: str, command: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The opening lines of a RESULTS.md section: title, exact command, machine and versions."""
    m = machine_description()
    return [
        f"## {title} ({m['date']})",
        "",
        f"- command: `{' '.join(command)}`",
        f"- machine: {m['cpu']}; backend {m['backend']}, {m['devices']}; {m['versions']}",
        *(f"- {line}" for line in extra),
        "",
    ]


def append_results(path: str | Path, lines: Sequence[str]) -> None:
    """Append a section (lines) to a Markdown results file, separated by a blank line."""
    with Path(path).open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one chip of this kind, or None when unknown (CPU, other chips)."""
    kind = device_kind.lower()
    return next((tf for key, tf in PEAK_TFLOPS_BF16 if key in kind), None)


# ----------------------------------------------------------------------------------------------------
# FLOPs


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters other than the embedding and the LM head) of a model; allocates nothing."""
    import jax
    from flax import nnx

    from nextquill_jax.models import CausalLM

    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    head = math.prod(params["embed"].shape) + (
        math.prod(params["lm_head"].shape) if "lm_head" in params else 0
    )
    return total, total - head


@dataclass(frozen=True)
class FlopCount:
    """Useful FLOPs of one training step by part (see the module docstring for the formula)."""

    layers: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.layers + self.attention + self.head


def causal_pairs(segment_ids: np.ndarray) -> int:
    """Σ n(n+1)/2 over the segments (examples) of every row; segment_ids [B, T] int, 0 = padding."""
    total = 0
    for row in np.asarray(segment_ids):
        counts = np.bincount(row[row > 0])
        total += int((counts * (counts + 1) // 2).sum())
    return total


def step_flops(
    cfg: ModelConfig, batch: dict[str, np.ndarray], nonembed_params: int | None = None
) -> FlopCount:
    """Useful FLOPs of one NextQuill training step on `batch` (both streams forward and backward).

    `nonembed_params`: P of the formula (computed from `cfg` when None).
    """
    if nonembed_params is None:
        nonembed_params = param_counts(cfg)[1]
    tokens = int(
        (np.asarray(batch["with_segment_ids"]) > 0).sum()
        + (np.asarray(batch["without_segment_ids"]) > 0).sum()
    )
    pairs = causal_pairs(batch["with_segment_ids"]) + causal_pairs(batch["without_segment_ids"])
    targets = int((np.asarray(batch["labels"]) >= 0).sum())
    return FlopCount(
        layers=6.0 * nonembed_params * tokens,
        attention=12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs,
        head=6.0 * cfg.hidden_size * cfg.vocab_size * 2 * targets,
    )


# ----------------------------------------------------------------------------------------------------
# Building and timing the step


@dataclass
class StepTiming:
    """What one timed run of the step gave. Times in seconds; memory in MiB (`device_peak_mib` None on CPU,
    whose devices keep no allocator statistics)."""

    compile_s: float
    step_s: list[float]
    first_loss: float
    compiled_temp_mib: float
    compiled_total_mib: float
    device_peak_mib: float | None

    @property
    def best_step_s(self) -> float:
        return min(self.step_s)


class TrainingHarness:
    """The project's real train step for one model on one mesh, ready to compile and time.

    Args:
        model_cfg: the architecture and runtime settings (random weights from `seed` unless `model` is given).
        mesh: the device mesh (`parallel.make_mesh`); parameters are placed by the logical-axis rules.
        loss: the loss configuration; micro_batches: gradient-accumulation micro-batches per step.
        optim: the optimizer settings (defaults: the public code's AdamW and clipping).
        model: an existing `CausalLM` to train instead of a random one (e.g. loaded weights).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        mesh,
        *,
        loss: LossConfig | None = None,
        micro_batches: int = 1,
        optim: OptimConfig | None = None,
        seed: int = 0,
        model=None,
    ):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec

        from nextquill_jax.models import CausalLM
        from nextquill_jax.parallel import batch_sharding
        from nextquill_jax.train.loop import state_shardings
        from nextquill_jax.train.model_setup import abstract_model, param_shardings
        from nextquill_jax.train.optimizer import learning_rate_schedule, make_optimizer
        from nextquill_jax.train.state import TrainState
        from nextquill_jax.train.step import StepSettings, make_train_step

        self.cfg, self.mesh = model_cfg, mesh
        optim = optim or OptimConfig()
        graphdef, abstract_params = abstract_model(model_cfg)
        p_shardings = param_shardings(model_cfg, mesh)
        if model is None:
            init = lambda: nnx.to_pure_dict(nnx.state(CausalLM(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))
            params = jax.jit(init, out_shardings=p_shardings)()
        else:
            params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), p_shardings)
        total_steps = 1000  # the schedule's length; it changes the learning rate, not the cost of a step
        tx = make_optimizer(optim, abstract_params, total_steps)
        s_shardings = state_shardings(tx, abstract_params, p_shardings, mesh)
        new_state = lambda p: TrainState(
            step=jnp.zeros((), jnp.int32),
            params=p,
            opt_state=tx.init(p),
            rng=jax.random.PRNGKey(seed),
            skipped=jnp.zeros((), jnp.int32),
        )
        self.state = jax.jit(new_state, out_shardings=s_shardings)(params)
        settings = StepSettings(loss=loss or LossConfig(), micro_batches=micro_batches)
        self.graphdef, self.tx, self.settings = graphdef, tx, settings
        self._batch_sharding = batch_sharding(mesh)
        step = make_train_step(graphdef, tx, learning_rate_schedule(optim, total_steps), settings, mesh)
        self._step = jax.jit(
            lambda state, batch: step(state, batch),  # no frozen reference model: two arguments
            in_shardings=(s_shardings, self._batch_sharding),
            out_shardings=(s_shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0,
        )

    def place(self, batch: dict[str, np.ndarray]) -> dict:
        """The batch as global arrays, rows split over the mesh's batch axes."""
        import jax

        return jax.device_put(batch, self._batch_sharding)

    def time(self, batch: dict[str, np.ndarray], *, warmup: int = 1, steps: int = 3) -> StepTiming:
        """Compile the step for `batch`'s shapes, run `warmup` steps untimed and `steps` timed ones.

        Each timed step is waited for (`block_until_ready`) before the next starts. The state advances
        (parameters change), which does not change the step's cost.
        """
        import jax

        placed = self.place(batch)
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            compiled = self._step.lower(self.state, placed).compile()
            compile_s = time.perf_counter() - start
            memory = compiled.memory_analysis()
            first_loss = float("nan")
            for i in range(max(warmup, 1)):
                self.state, metrics = compiled(self.state, placed)
                if i == 0:
                    first_loss = float(metrics["loss"])
            jax.block_until_ready(self.state)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                self.state, metrics = compiled(self.state, placed)
                jax.block_until_ready((self.state, metrics))
                times.append(time.perf_counter() - start)
        stats = jax.local_devices()[0].memory_stats()
        peak = stats.get("peak_bytes_in_use") / MIB if stats and "peak_bytes_in_use" in stats else None
        total = (
            memory.argument_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )
        return StepTiming(
            compile_s=compile_s,
            step_s=times,
            first_loss=first_loss,
            compiled_temp_mib=memory.temp_size_in_bytes / MIB,
            compiled_total_mib=total / MIB,
            device_peak_mib=peak,
        )


def best_seconds(fn: Callable, *args, steps: int = 3) -> float:
    """Best wall time of `steps` calls of the compiled `fn(*args)` after a warm-up call (compile excluded)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def step_breakdown(
    harness: TrainingHarness, batch: dict[str, np.ndarray], steps: int = 3
) -> dict[str, float]:
    """Seconds of the step's parts, each compiled and timed alone on `batch` (what limits the step):

    - "forward": both forward passes to the response hidden states;
    - "forward+backward": both passes and their backward for a fixed linear function of those states;
    - "loss": `loss_from_hidden` value and gradient (wrt both hidden streams and the head) alone;
    - "optimizer": clipping + AdamW update of all parameters;
    - "step": the whole compiled train step.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nextquill_jax.losses import loss_from_hidden
    from nextquill_jax.train.step import response_hidden

    placed = harness.place(batch)
    params = harness.state.params
    graphdef, settings = harness.graphdef, harness.settings

    def streams(p, b):
        model = nnx.merge(graphdef, p)
        return response_hidden(model, b, "with"), response_hidden(model, b, "without")

    def linear(p, b):
        h_w, h_o = streams(p, b)
        return (h_w.astype(jnp.float32) * 1e-3).sum() - (h_o.astype(jnp.float32) * 1e-3).sum()

    def loss(h_w, h_o, w, labels):
        layout = "dv" if "lm_head" in params else "vd"
        return loss_from_hidden(
            h_w, h_o, w, labels, settings.loss, head_layout=layout,
            token_chunk=settings.token_chunk, vocab_chunk=settings.vocab_chunk,
        )[0]  # fmt: skip

    def update(p, opt_state):
        updates, opt_state = harness.tx.update(p, opt_state, p)
        return jax.tree.map(lambda a, u: a + u, p, updates), opt_state

    with jax.set_mesh(harness.mesh):
        h_w, h_o = jax.jit(streams)(params, placed)
        w = params["lm_head"] if "lm_head" in params else params["embed"]
        parts = {
            "forward": best_seconds(jax.jit(streams), params, placed, steps=steps),
            "forward+backward": best_seconds(jax.jit(jax.grad(linear)), params, placed, steps=steps),
            "loss": best_seconds(
                jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                h_w,
                h_o,
                w,
                placed["labels"],
                steps=steps,
            ),
            "optimizer": best_seconds(jax.jit(update), params, harness.state.opt_state, steps=steps),
        }
    parts["step"] = harness.time(batch, warmup=1, steps=steps).best_step_s
    return parts


# ----------------------------------------------------------------------------------------------------
# Synthetic batches


def synthetic_batch(
    rows: int,
    seq_len: int,
    history: int,
    *,
    context_tokens: int,
    entry_tokens: int,
    target_tokens: int,
    vocab: int,
    length_multiple: int,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], RowShape]:
    """`rows` packed rows of identical synthetic examples (random ids below `vocab`).

    An example has a without-history prompt of `context_tokens`, a with-history prompt of
    `context_tokens + history * entry_tokens` and a target of `target_tokens`. The with stream holds `seq_len`
    tokens per row; the without stream and the response slots are sized to hold the same examples, rounded up
    to `length_multiple` (as the pipeline derives them).

    Raises:
        ValueError: one example does not fit a row of `seq_len` tokens.
    """
    p_w, p_o, n_y = context_tokens + history * entry_tokens, context_tokens, target_tokens
    per_row = seq_len // (p_w + n_y)
    if per_row < 1:
        raise ValueError(
            f"an example of {p_w + n_y} with-stream tokens (history {history} × {entry_tokens} + context "
            f"{context_tokens} + target {target_tokens}) does not fit seq_len {seq_len}"
        )
    up = lambda x: -(-x // length_multiple) * length_multiple
    shape = RowShape(seq_len, up(per_row * (p_o + n_y)), up(per_row * n_y))
    count = rows * per_row
    rng = np.random.default_rng(seed)
    examples = [
        {
            "prompt_with": rng.integers(1, vocab, p_w, dtype=np.int32),
            "prompt_without": rng.integers(1, vocab, p_o, dtype=np.int32),
            "target": rng.integers(1, vocab, n_y, dtype=np.int32),
        }
        for _ in range(count)
    ]
    need = np.tile([p_w + n_y, p_o + n_y, n_y], (count, 1))
    packed = first_fit_rows(need, np.arange(count), shape.as_tuple(), open_rows=rows)
    batch = assemble_batch([[examples[i] for i in row] for row in packed], shape, with_reference_dce=False)
    return batch, shape


# ----------------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class SweepModel:
    """One model size of a sweep: a preset with architecture overrides, named for the CSV and the plot."""

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScalingConfig:
    """A scaling sweep (YAML). Every combination of `models` × `seq_len` × `history` × `mesh` is one point.

    `mesh`: mesh sizes as in the train config's `mesh` section (`{data: 1, fsdp: -1, tensor: 1}`); a shape
    that does not fit the devices present is skipped (and not written). `rows`: rows of the global batch.
    Example lengths in tokens: `context_tokens` (the without-history prompt), `entry_tokens` per history
    entry, `target_tokens`. `peak_tflops`: per-chip peak for MFU (None: from the device kind where known).
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
    loss_variant: str = "nextquill"
    micro_batches: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "xla"
    warmup_steps: int = 1
    timed_steps: int = 3
    peak_tflops: float | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("models", "seq_len", "history", "mesh"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` needs at least one value")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        for name in (
            "rows",
            "context_tokens",
            "entry_tokens",
            "target_tokens",
            "length_multiple",
            "timed_steps",
            "micro_batches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if any(s < 1 for s in self.seq_len) or any(h < 0 for h in self.history):
            raise ValueError(f"seq_len must be >= 1 and history >= 0, got {self.seq_len}, {self.history}")
        for model in self.models:
            try:
                self.model_config(model)
            except ValueError as e:
                raise ValueError(f"model {model.name!r}: {e}") from None

    def model_config(self, model: SweepModel) -> ModelConfig:
        """The ModelConfig of one sweep model with this sweep's runtime settings."""
        section = ModelSection(
            preset=model.preset,
            overrides=model.overrides,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
        )
        return section.model_config()


CSV_COLUMNS: tuple[str, ...] = (
    "model", "params", "params_nonembed", "seq_len", "history", "mesh", "devices", "rows",
    "seq_len_without", "response_slots", "input_tokens", "target_tokens", "padding_efficiency",
    "compile_s", "step_s", "tokens_per_s", "target_tokens_per_s", "flops_per_step", "tflops_per_s", "mfu",
    "compiled_temp_mib", "compiled_total_mib", "device_peak_mib", "first_loss", "backend", "device_kind",
)  # fmt: skip
KEY_COLUMNS: tuple[str, ...] = ("model", "seq_len", "history", "mesh")


def load_scaling_config(path: str | Path, output_dir: str | None = None) -> ScalingConfig:
    """Read a sweep YAML file (unknown keys and wrong types are errors naming the key).

    Raises:
        ConfigError: as `config.load_config`. FileNotFoundError: `path` does not exist.
    """
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return build(ScalingConfig, raw, "", str(path))


def mesh_label(shape: Sequence[int]) -> str:
    """ "data=1,fsdp=2,tensor=1" for a resolved mesh shape."""
    from nextquill_jax.parallel import MESH_AXES

    return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True))


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of an existing sweep CSV ([] when absent).

    Raises:
        ValueError: the file's header is not this harness's (naming the file and the fix).
    """
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(
                f"{csv_path}: its columns {reader.fieldnames} are not the scaling harness's "
                f"{list(CSV_COLUMNS)}. "
                "Fix: move the file away or set a new output_dir."
            )
        return list(reader)


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
    point of that index (in the order of the product models × seq_len × history × mesh), in this process.

    Returns the CSV's path."""
    import jax

    from nextquill_jax.parallel import make_mesh, resolve_mesh_shape

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "scaling.csv"
    done = {tuple(r[k] for k in KEY_COLUMNS) for r in read_rows(csv_path)}
    device_kind = jax.devices()[0].device_kind
    peak = cfg.peak_tflops or peak_tflops(device_kind)
    isolate = config_path is not None and point is None and jax.default_backend() != "cpu"
    points = itertools.product(cfg.models, cfg.seq_len, cfg.history, cfg.mesh)
    for index, (model, seq_len, history, sizes) in enumerate(points):
        if point is not None and index != point:
            continue
        try:
            shape = resolve_mesh_shape(sizes, jax.device_count())
        except ValueError as e:
            echo(f"skip {model.name} seq_len {seq_len} history {history} mesh {sizes}: {e}")
            continue
        key = (model.name, str(seq_len), str(history), mesh_label(shape))
        if key in done:
            echo(f"done already: {key}")
            continue
        if isolate:
            child = [sys.executable, "-m", "nextquill_jax.scaling", "--config", config_path, "--output-dir",
                     cfg.output_dir, "--point", str(index)]  # fmt: skip
            status = subprocess.call(child)
            if status:
                echo(f"point {key} failed (exit status {status}); continuing with the next")
            continue
        model_cfg = cfg.model_config(model)
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
        except ValueError as e:
            echo(f"skip {key}: {e}")
            continue
        mesh = make_mesh(sizes)
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
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        echo(
            f"{key}: {row['tokens_per_s']} tokens/s, step {row['step_s']} s, compile {row['compile_s']} s, "
            f"memory {row['compiled_total_mib']} MiB, MFU {row['mfu'] or '-'}"
        )
    if point is not None:
        return csv_path
    plot_csv(csv_path, out / "scaling.png")
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
    flops = step_flops(model_cfg, batch, nonembed).total
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


def plot_csv(csv_path: Path, png_path: Path) -> Path:
    """Plot tokens/s, memory and MFU (TFLOP/s where no MFU is known) against every variable that takes more
    than one value in the CSV, one line per combination of the others; returns `png_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    # (x column, the key column it varies, axis label)
    variables = [
        ("params", "model", "model parameters"),
        ("seq_len", "seq_len", "sequence length (with stream)"),
        ("history", "history", "history entries"),
        ("devices", "mesh", "devices"),
    ]
    swept = [v for v in variables if len({r[v[1]] for r in rows}) > 1] or variables[:1]
    metrics = [
        ("tokens_per_s", "tokens/s"),
        (
            "device_peak_mib" if any(r["device_peak_mib"] for r in rows) else "compiled_total_mib",
            "memory MiB",
        ),
        ("mfu", "MFU") if any(r["mfu"] for r in rows) else ("tflops_per_s", "TFLOP/s"),
    ]
    fig, axes = plt.subplots(len(swept), 3, figsize=(13, 3.6 * len(swept)), squeeze=False)
    for (x_col, key_col, label), ax_row in zip(swept, axes, strict=True):
        others = [k for _, k, _ in variables if k != key_col]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault(tuple(r[o] for o in others), []).append(r)
        for (metric, metric_label), ax in zip(metrics, ax_row, strict=True):
            for group_key, members in sorted(groups.items()):
                members = sorted((m for m in members if m[metric]), key=lambda m: float(m[x_col]))
                if members:
                    ax.plot(
                        [float(m[x_col]) for m in members],
                        [float(m[metric]) for m in members],
                        marker="o",
                        label=", ".join(f"{o}={g}" for o, g in zip(others, group_key, strict=True)),
                    )
            ax.set_xlabel(label)
            ax.set_ylabel(metric_label)
            ax.grid(alpha=0.3)
            if x_col in ("params", "seq_len"):
                ax.set_xscale("log")
        ax_row[0].legend(fontsize=7)
    kinds = sorted({r["device_kind"] for r in rows})
    fig.suptitle(f"NextQuill training step scaling ({', '.join(kinds)}; {csv_path.name})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv: list[str] | None = None) -> int:
    """`nextquill-jax bench scale --config FILE [--output-dir DIR] [--results FILE]`."""
    parser = argparse.ArgumentParser(prog="nextquill-jax bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="a sweep YAML file, e.g. configs/scaling/tiny_cpu.yaml"
    )
    parser.add_argument("--output-dir", help="overrides the file's output_dir")
    parser.add_argument("--results", type=Path, help="append the CSV as a Markdown table to this file")
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # one point, in a child process
    args = parser.parse_args(argv)
    try:
        cfg = load_scaling_config(args.config, args.output_dir)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    csv_path = run_sweep(cfg, config_path=args.config, point=args.point)
    if args.point is not None:
        return 0
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")
    if args.results:
        command = ["nextquill-jax", "bench", "scale", *(argv if argv is not None else sys.argv[1:])]
        rows = read_rows(csv_path)
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
        lines = results_header("Scaling sweep", command, [f"config `{args.config}`; CSV `{csv_path}`"])
        lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(r[c] or "-" for c in cols) + " |" for r in rows]
        append_results(args.results, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
