"""The project's real training step, compiled and timed on synthetic batches: whole, or by part.

`TrainingHarness` wires the step exactly as training does (`train.setup`); `synthetic_batch` packs identical
random examples of given lengths with the pipeline's packer; `synthetic_train_split` prepares the synthetic
benchmark with a real tokenizer; `step_breakdown` times the step's parts alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nextquill_jax.config import LoraConfig, OptimConfig
from nextquill_jax.data.assemble import RowShape, assemble_batch
from nextquill_jax.data.config import DataConfig
from nextquill_jax.data.packing import first_fit_rows
from nextquill_jax.data.prepared_split import PreparedSplit
from nextquill_jax.loss import LossConfig
from nextquill_jax.models.config import ModelConfig

if TYPE_CHECKING:  # jax is imported where it is used, after the command has set its platform flags
    import jax

MIB = 2**20


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
        """The fastest of the timed steps, in seconds."""
        return min(self.step_s)


class TrainingHarness:
    """The project's real train step for one model on one mesh, ready to compile and time.

    Args:
        model_cfg: the architecture and runtime settings (random weights from `seed` unless `model` is given).
        mesh: the device mesh (`parallel.make_mesh`); parameters are placed by the logical-axis rules.
        loss: the loss configuration; micro_batches: gradient-accumulation micro-batches per step.
        optim: the optimizer settings (defaults: the public code's AdamW and clipping).
        model: an existing `CausalLM` to train instead of a random one (e.g. loaded weights).
        lora: train LoRA adapters on the frozen (random or given) model instead of the model itself, as
            `model.lora` does (its `base_dtype` quantizes the base; `init_from` is not read here).
        operand_dtype: the operands of the fused loss's with/without logits products (`loss.operand_dtype`).
        joint_forward: both forward passes as one call on a joined batch (`train.joint_forward`).
        abstract: hold the state as `jax.ShapeDtypeStruct`s (nothing allocated): the step can be compiled and
            analysed (`compile`), not run.

    Raises:
        ValueError: `abstract` with `model` or `lora`.
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
        lora: LoraConfig | None = None,
        operand_dtype: str = "float32",
        joint_forward: bool = False,
        abstract: bool = False,
    ):
        import jax
        from flax import nnx

        from nextquill_jax.parallel import batch_sharding
        from nextquill_jax.train import adapters
        from nextquill_jax.train.model_setup import abstract_model, param_shardings, random_params
        from nextquill_jax.train.optimizer import learning_rate_schedule, make_optimizer
        from nextquill_jax.train.setup import abstract_state, init_state, jit_train_step, state_shardings
        from nextquill_jax.train.step import StepSettings

        if abstract and (model is not None or lora is not None):
            raise ValueError("an abstract harness takes neither a model nor lora (it holds no parameters)")
        self.cfg, self.mesh = model_cfg, mesh
        optim = optim or OptimConfig()
        graphdef, abstract_params = abstract_model(model_cfg)
        p_shardings = param_shardings(model_cfg, mesh)
        if abstract:
            params = None
        elif model is None:
            params = random_params(model_cfg, p_shardings, seed)
        else:
            params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), p_shardings)
        self.base = None
        trainable, shardings = abstract_params, p_shardings
        if lora is not None:
            self.base = adapters.frozen_base(params, lora)
            trainable, shardings = adapters.adapter_layout(lora, model_cfg, mesh)
            params = adapters.initial_adapters(lora, model_cfg, trainable, shardings, seed)
        total_steps = 1000  # the schedule's length; it changes the learning rate, not the cost of a step
        tx = make_optimizer(optim, trainable, total_steps)
        s_shardings = state_shardings(tx, trainable, shardings, mesh)
        if abstract:
            self.state = abstract_state(abstract_params, tx, seed, s_shardings)
        else:
            self.state = init_state(params, tx, seed, s_shardings)
        settings = StepSettings(
            loss=loss or LossConfig(),
            micro_batches=micro_batches,
            operand_dtype=operand_dtype,
            joint_forward=joint_forward,
            lora_scale=None if lora is None else lora.scale,
            lora_dropout=0.0 if lora is None else lora.dropout,
        )
        self.graphdef, self.tx, self.settings = graphdef, tx, settings
        self._batch_sharding = batch_sharding(mesh)
        schedule = learning_rate_schedule(optim, total_steps)
        base_shardings = None if self.base is None else jax.tree.map(lambda x: x.sharding, self.base)
        self._step = jit_train_step(
            graphdef, tx, schedule, settings, mesh, s_shardings, base_shardings=base_shardings
        )

    def place(self, batch: dict[str, np.ndarray]) -> dict:
        """The batch as global arrays, rows split over the mesh's batch axes."""
        import jax

        return jax.device_put(batch, self._batch_sharding)

    def compile(self, batch: dict[str, np.ndarray]) -> jax.stages.Compiled:
        """The step compiled for `batch`'s shapes (`jax.stages.Compiled`); runs nothing."""
        import jax

        with jax.set_mesh(self.mesh):
            return self._step.lower(self.state, self.place(batch), None, self.base).compile()

    def stepper(self, batch: dict[str, np.ndarray]) -> Callable[[], Any]:
        """A call of no arguments that runs one step on `batch` (compiled here, once) and returns (state,
        metrics), advancing the state: for `alternating_best_seconds`."""
        compiled, placed = self.compile(batch), self.place(batch)

        def step() -> Any:
            self.state, metrics = compiled(self.state, placed, None, self.base)
            return self.state, metrics

        return step

    def head_weight(self, params: dict) -> jax.Array:
        """The LM head in `params` (the untied kernel [D, V], else the tied embedding [V, D])."""
        return params["lm_head"] if "lm_head" in params else params["embed"]

    def loss_value_and_grad(self) -> Callable:
        """`jax.jit` of the step's fused loss, value and gradient wrt both hidden streams and the head:
        f(hidden_with [B, R, D], hidden_without [B, R, D], head, labels [B, R]) -> (loss, grads)."""
        import jax

        from nextquill_jax.loss import loss_from_hidden

        settings = self.settings
        layout = "dv" if "lm_head" in self.state.params else "vd"

        def loss(h_w, h_o, w, labels):
            return loss_from_hidden(
                h_w, h_o, w, labels, settings.loss, head_layout=layout,
                token_chunk=settings.token_chunk, vocab_chunk=settings.vocab_chunk,
                operand_dtype=settings.operand_dtype,
            )[0]  # fmt: skip

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    def time(
        self,
        batch: dict[str, np.ndarray],
        *,
        warmup: int = 1,
        steps: int = 3,
        profile_dir: Path | None = None,
    ) -> StepTiming:
        """Compile the step for `batch`'s shapes, run `warmup` steps untimed and `steps` timed ones.

        Each timed step is waited for (`block_until_ready`) before the next starts. The state advances
        (parameters change), which does not change the step's cost. `profile_dir`: a `jax.profiler` trace of
        the timed steps is written there (the tracer's overhead is in their times).
        """
        import jax

        placed = self.place(batch)
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            compiled = self.compile(batch)
            compile_s = time.perf_counter() - start
            memory = compiled.memory_analysis()
            first_loss = float("nan")
            for i in range(max(warmup, 1)):
                self.state, metrics = compiled(self.state, placed, None, self.base)
                if i == 0:
                    first_loss = float(metrics["loss"])
            jax.block_until_ready(self.state)
            times = []
            trace = jax.profiler.trace(str(profile_dir)) if profile_dir else contextlib.nullcontext()
            with trace:
                for _ in range(steps):
                    start = time.perf_counter()
                    self.state, metrics = compiled(self.state, placed, None, self.base)
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


def alternating_best_seconds(calls: Mapping[str, Callable[[], Any]], rounds: int = 3) -> dict[str, float]:
    """Best wall time of each of `calls` (name -> a call of no arguments, compiled already where it is JAX's),
    after a warm-up call of each (compile excluded): `rounds` rounds call each once in turn, so that load from
    other jobs, or the machine's clock, biases none of them against the others (`best_seconds` times one call
    alone)."""
    import jax

    for call in calls.values():
        jax.block_until_ready(call())
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def step_breakdown(
    harness: TrainingHarness, batch: dict[str, np.ndarray], steps: int = 3
) -> dict[str, float]:
    """Seconds of the step's parts, each compiled and timed alone on `batch` (what limits the step):

    - "forward": both forward passes to the response hidden states (one call with `joint_forward`);
    - "forward+backward": both passes and their backward for a fixed linear function of those states;
    - "loss": `loss_from_hidden` value and gradient (wrt both hidden streams and the head) alone;
    - "optimizer": clipping + AdamW update of all parameters;
    - "step": the whole compiled train step.

    Raises:
        ValueError: a LoRA harness (its parts are not these).
    """
    if harness.base is not None:
        raise ValueError("step_breakdown times full fine-tuning harnesses (this one trains LoRA adapters)")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nextquill_jax.train.step import stream_hidden

    placed = harness.place(batch)
    params = harness.state.params
    graphdef = harness.graphdef

    def streams(p, b):
        return stream_hidden(nnx.merge(graphdef, p), b, harness.settings)

    def linear(p, b):
        h_w, h_o = streams(p, b)
        return (h_w.astype(jnp.float32) * 1e-3).sum() - (h_o.astype(jnp.float32) * 1e-3).sum()

    def update(p, opt_state):
        updates, opt_state = harness.tx.update(p, opt_state, p)
        return jax.tree.map(lambda a, u: a + u, p, updates), opt_state

    with jax.set_mesh(harness.mesh):
        h_w, h_o = jax.jit(streams)(params, placed)
        w = harness.head_weight(params)
        parts = {
            "forward": best_seconds(jax.jit(streams), params, placed, steps=steps),
            "forward+backward": best_seconds(jax.jit(jax.grad(linear)), params, placed, steps=steps),
            "loss": best_seconds(
                harness.loss_value_and_grad(),
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


def synthetic_train_split(
    out_dir: str | Path, *, users: int, seed: int, tokenizer: str, max_history: int
) -> PreparedSplit:
    """The training split of the synthetic benchmark (`users` users from `seed`) prepared into `out_dir` with
    `tokenizer`, keeping at most `max_history` history entries (reused when already up to date)."""
    from nextquill_jax.data.prepare import prepare

    cfg = DataConfig(
        format="synthetic",
        synthetic_users=users,
        synthetic_seed=seed,
        tokenizer=tokenizer,
        max_history=max_history,
    )
    prepare(cfg, out_dir, echo=lambda _: None)
    return PreparedSplit(out_dir, "train")
