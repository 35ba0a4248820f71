"""The training loop: set up (everything that can fail does so before compiling), then step, log, evaluate,
checkpoint, and stop cleanly on SIGTERM.

    result = train(load_config("configs/tiny_synthetic.yaml"), workdir)

Sections of `train`: 1. multi-host start-up and mesh; 2. data; 3. model, optimizer and state shardings;
4. restore or initialise; 5. compile; 6. the loop. All I/O lives here; the step is pure.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextquill_jax import parallel
from nextquill_jax.config import Config, ConfigError, config_to_dict, save_config
from nextquill_jax.data.global_batch import to_global_batch
from nextquill_jax.data.pipeline import BatchPipeline
from nextquill_jax.data.prepared import PreparedSplit
from nextquill_jax.losses import combine_aux, metrics_from_aux
from nextquill_jax.parallel import DEFAULT_RULES
from nextquill_jax.train import model_setup
from nextquill_jax.train.checkpoint import Checkpointer
from nextquill_jax.train.metrics_log import MetricsLog
from nextquill_jax.train.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from nextquill_jax.train.state import TrainState
from nextquill_jax.train.step import StepSettings, make_eval_step, make_train_step
from nextquill_jax.train.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    build_mesh,
    data_dir_of,
    is_workdir,
    restore_model,
)

# Step metrics that are not loss aux (the aux sums are logged through metrics_from_aux).
_STEP_EXTRAS = ("grad_norm", "learning_rate", "input_tokens", "padding_efficiency", "skipped")


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/inf (the message names the step and the last good checkpoint)."""


@dataclass(frozen=True)
class TrainResult:
    """How a run ended: `status` "finished" or "preempted" (SIGTERM: saved, resume by running again), the
    last step, the last checkpoint's step and the final train state (sharded arrays)."""

    status: str
    step: int
    workdir: Path
    last_checkpoint: int | None
    state: TrainState


def resolve_workdir(cfg: Config, override: str | Path | None) -> Path:
    """The run's directory: `override` (--workdir), else `train.workdir`.

    Raises:
        ConfigError: neither is set, or it is a URL (such as gs://...), which would otherwise silently become
            a local folder named after the URL.
    """
    chosen = override if override is not None else cfg.train.workdir
    if chosen is None:
        raise ConfigError("no workdir: set train.workdir in the config or pass --workdir DIR")
    if "://" in str(chosen):
        raise ConfigError(
            f"workdir {chosen}: object-store URLs are not written directly; mount the bucket (gcsfuse, see "
            f"tpu_scripts/mount_bucket.sh) and pass the mounted path, e.g. --workdir gcs/runs/NAME"
        )
    return Path(chosen).expanduser().absolute()


def prepared_dir(cfg: Config, workdir: Path, echo) -> Path:
    """The prepared data: `train.data_dir` as it is when `data.sources` is empty (and the format is not the
    in-process `synthetic`), else prepared (or reused by fingerprint) from the `data` section into
    `train.data_dir` or `<workdir>/prepared`.

    Process 0 prepares first; the others then find it up to date (shared disk) or prepare their own copy.
    """
    target = data_dir_of(cfg, workdir)
    if not cfg.data.sources and cfg.data.format != "synthetic":
        if not (target / "train" / "meta.json").exists():
            raise ConfigError(
                f"data.sources is empty and {target} holds no prepared data (train/meta.json). Fix: list "
                f"the record files in data.sources, or point train.data_dir at the output of "
                f"`nextquill-jax data prepare`."
            )
        return target
    from nextquill_jax.data.prepare import prepare

    quiet = lambda _: None
    if jax.process_index() == 0:
        prepare(cfg.data, target, echo=echo)
    _sync("prepared data")
    if jax.process_index() != 0:
        prepare(cfg.data, target, echo=quiet)
    return target


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def plan_steps(pipeline: BatchPipeline, cfg: Config) -> tuple[int, list[int]]:
    """(total optimizer steps, the step that ends each epoch) for the run.

    Raises:
        ConfigError: an endless data iterator (`num_epochs: null`) without `train.max_steps`.
    """
    epochs = cfg.data.batching.num_epochs
    if epochs is None and cfg.train.max_steps is None:
        raise ConfigError(
            "data.batching.num_epochs is null (repeat forever) and train.max_steps is not set: the run would "
            "never end. Fix: set data.batching.num_epochs or train.max_steps."
        )
    ends, total = [], 0
    for epoch in range(epochs if epochs is not None else 0):
        total += pipeline.num_batches(epoch)
        ends.append(total)
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps) if epochs is not None else cfg.train.max_steps
    return total, [e for e in ends if e <= total]


def check_micro_batches(cfg: Config, mesh: Mesh) -> None:
    """Raise ConfigError unless `train.micro_batches` divides the rows each batch shard holds."""
    rows = cfg.data.batching.rows_per_batch * jax.process_count()
    shards = parallel.batch_shard_count(mesh)
    m, per_process = cfg.train.micro_batches, cfg.data.batching.rows_per_batch
    if rows % shards or (rows // shards) % m:
        raise ConfigError(
            f"a global batch of {rows} rows (data.batching.rows_per_batch={per_process} x "
            f"{jax.process_count()} processes) does not split into {shards} batch shards (mesh data x fsdp) "
            f"of train.micro_batches={m} equal micro-batches. Fix: make rows_per_batch x processes a "
            f"multiple of {shards * m}, or change train.micro_batches / the mesh."
        )


def state_shardings(tx: optax.GradientTransformation, abstract_params: dict, shardings: dict, mesh: Mesh):
    """Shardings of the whole TrainState: optimizer moments like their parameters, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, shardings, transform_non_params=lambda _: replicated
    )
    return TrainState(step=replicated, params=shardings, opt_state=opt, rng=replicated, skipped=replicated)


def _new_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
    )


def reference_params(cfg: Config, mesh: Mesh) -> tuple[Any, dict] | None:
    """(graphdef, params) of the frozen `loss.reference_model` for `dce: fixed`, or None when not set.

    A training workdir (holding config.yaml and checkpoints/) gives its latest checkpoint's model (with the
    config saved with that checkpoint); anything else is loaded like `model.path`.
    """
    source = cfg.loss.reference_model
    if cfg.loss.dce != "fixed" or source is None:
        return None
    from nextquill_jax.config import ModelSection

    if is_workdir(source):
        try:
            restored = restore_model(source, mesh=mesh)
        except FileNotFoundError as e:
            raise ConfigError(f"loss.reference_model {source!r}: {e}") from None
        graphdef, params = nnx.split(restored.model, nnx.Param)
        return graphdef, nnx.to_pure_dict(params)
    section = ModelSection(
        path=source, param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype
    )
    model_setup.check_model_source(section)
    mcfg = model_setup.model_config(section)
    graphdef, _ = model_setup.abstract_model(mcfg)
    shardings = model_setup.param_shardings(mcfg, mesh)
    return graphdef, model_setup.initial_params(section, mcfg, shardings, mesh, 0, DEFAULT_RULES)


class _Preemption:
    """SIGTERM → stop after the current step. Single-process: our own handler. Multi-process: JAX's
    preemption sync service (it traps SIGTERM and makes all processes agree on the step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is not running
            return False

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: Config, workdir: Path, *, echo=print) -> TrainResult:
    """Run (or resume) the training `cfg` describes in `workdir`.

    Raises:
        ConfigError: a config problem found during set-up (before compiling).
        TrainingDivergedError: a non-finite loss with `train.nonfinite: stop`, or too many skipped updates.
    """
    # 1. Multi-host start-up and mesh.
    mesh = build_mesh(cfg)
    model_setup.check_model_source(cfg.model)
    check_micro_batches(cfg, mesh)
    workdir.mkdir(parents=True, exist_ok=True)

    # 2. Data.
    data_dir = prepared_dir(cfg, workdir, echo)
    train_data = BatchPipeline(PreparedSplit(data_dir, "train"), cfg.data.batching)
    total_steps, epoch_ends = plan_steps(train_data, cfg)
    eval_data = None
    if (data_dir / cfg.eval.split / "meta.json").exists():
        eval_batching = dataclasses.replace(
            cfg.data.batching, shuffle=False, num_epochs=1, drop_remainder=False
        )
        eval_data = BatchPipeline(PreparedSplit(data_dir, cfg.eval.split), eval_batching)
    else:
        echo(f"{data_dir} has no {cfg.eval.split!r} split: no evaluation (eval.split names the split)")
    if cfg.loss.dce == "fixed" and cfg.loss.reference_model is None and not train_data.has_reference_dce:
        raise ConfigError(
            f"loss.dce is 'fixed' but {data_dir} carries no reference_dce and loss.reference_model is not "
            f"set. Fix: set loss.reference_model (a training workdir, a Hugging Face directory or a packaged "
            f"model), or prepare data with precomputed reference_dce."
        )

    # 3. Model, optimizer and state shardings.
    mcfg = model_setup.model_config(cfg.model)
    graphdef, abstract_params = model_setup.abstract_model(mcfg)
    try:
        p_shardings = model_setup.param_shardings(mcfg, mesh)
    except ValueError as e:
        raise ConfigError(f"mesh {dict(mesh.shape)} does not fit the model: {e}") from None
    try:
        tx = make_optimizer(cfg.optim, abstract_params, total_steps)
        trainable = trainable_mask(cfg.optim, abstract_params) if cfg.optim.trainable else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    schedule = learning_rate_schedule(cfg.optim, total_steps)
    s_shardings = state_shardings(tx, abstract_params, p_shardings, mesh)
    reference = reference_params(cfg, mesh)
    settings = StepSettings(
        loss=cfg.loss.loss_config(),
        micro_batches=cfg.train.micro_batches,
        skip_nonfinite=cfg.train.nonfinite == "skip",
        token_chunk=cfg.loss.token_chunk,
        vocab_chunk=cfg.loss.vocab_chunk,
        reference_graphdef=None if reference is None else reference[0],
    )

    # 4. Restore or initialise.
    save_config(cfg, workdir / CONFIG_FILE)
    config_dict = config_to_dict(cfg)
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint)
    iterator = iter(train_data.dataset())
    start = ckpt.latest_step()
    if start is not None:
        abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(lambda p: _new_state(p, tx, cfg.train.seed), abstract_params),
            s_shardings,
        )
        state, _ = ckpt.restore(start, abstract_state, iterator)
        echo(f"resuming from {ckpt.directory / str(start)} (step {start})")
    else:
        start = 0
        params = model_setup.initial_params(cfg.model, mcfg, p_shardings, mesh, cfg.train.seed, DEFAULT_RULES)
        state = jax.jit(lambda p: _new_state(p, tx, cfg.train.seed), out_shardings=s_shardings)(params)
        del params

    # 5. Compile (once per batch shape).
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = parallel.batch_sharding(mesh)
    ref_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference[1])
    step_fn = jax.jit(
        make_train_step(graphdef, tx, schedule, settings, mesh, trainable),
        in_shardings=(s_shardings, batch_sharding, ref_shardings),
        out_shardings=(s_shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(graphdef, settings),
        in_shardings=(p_shardings, batch_sharding, ref_shardings),
        out_shardings=replicated,
    )
    ref = None if reference is None else reference[1]

    # 6. The loop.
    log = MetricsLog(workdir, cfg.logging, start_step=start, total_steps=total_steps)
    preemption = _Preemption()
    step = start
    last_saved = start if start > 0 else None
    pending: list[tuple[int, dict]] = []
    interval_start = [time.perf_counter()]

    def evaluate() -> dict[str, float]:
        if eval_data is None:
            return {}
        auxes = []
        for k, local in enumerate(eval_data.dataset()):
            if cfg.eval.max_batches is not None and k >= cfg.eval.max_batches:
                break
            auxes.append(eval_fn(state.params, to_global_batch(local, mesh), ref))
        values = metrics_from_aux(combine_aux(*auxes), settings.loss)
        return {f"eval/{k}": v for k, v in values.items()}

    def flush() -> dict[str, float]:
        """Fetch the pending steps' metrics, stop on a non-finite one (or too many skipped), write the
        logged rows. Tokens/s covers the interval since the previous flush (compilation included at first)."""
        nonlocal pending
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        rate = sum(float(m["input_tokens"]) for m in fetched) / max(now - interval_start[0], 1e-9)
        interval_start[0] = now
        good = ckpt.directory / str(last_saved) if last_saved is not None else "none"
        row: dict[str, float] = {}
        for (s, _), m in zip(pending, fetched, strict=True):
            if m["nonfinite"] and cfg.train.nonfinite == "stop":
                raise TrainingDivergedError(
                    f"the loss or gradient is not finite at step {s} (loss {float(m['loss'])}, grad norm "
                    f"{float(m['grad_norm'])}). Last good checkpoint: {good}. Fix: lower "
                    f"optim.learning_rate, or set train.nonfinite: skip to skip such updates."
                )
            if m["skipped"] > cfg.train.max_skips:
                raise TrainingDivergedError(
                    f"{int(m['skipped'])} updates skipped for non-finite losses by step {s} (limit "
                    f"train.max_skips={cfg.train.max_skips}). Last good checkpoint: {good}."
                )
            if s % cfg.logging.every_steps == 0 or s == pending[-1][0]:
                aux = {k: v for k, v in m.items() if k not in (*_STEP_EXTRAS, "loss", "nonfinite")}
                row = {
                    **metrics_from_aux(aux, settings.loss),
                    **{k: float(m[k]) for k in _STEP_EXTRAS},
                    "tokens_per_second": rate,
                    "epoch": _epoch_of(s, epoch_ends),
                }
                log.write(s, row)
        pending = []
        return row

    def save(metrics: dict[str, float], *, wait: bool = False) -> None:
        nonlocal last_saved
        progress = {"step": step, "epoch": _epoch_of(step, epoch_ends)}
        ckpt.save(step, state, iterator, config=config_dict, progress=progress, metrics=metrics, wait=wait)
        last_saved = step

    try:
        with jax.set_mesh(mesh):
            for local in iterator:
                state, metrics = step_fn(state, to_global_batch(local, mesh), ref)
                step += 1
                pending.append((step, metrics))
                epoch_end = step in epoch_ends
                last = step >= total_steps
                stop = preemption.reached(step)
                do_eval = eval_data is not None and (
                    epoch_end or last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)
                )
                do_save = (
                    last
                    or stop
                    or (epoch_end and cfg.checkpoint.on_epoch_end)
                    or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
                    or (do_eval and cfg.checkpoint.best_metric is not None)
                )
                if step % cfg.logging.every_steps == 0 or do_save or do_eval:
                    row = flush()
                    log.progress(step, row)
                eval_metrics = evaluate() if do_eval else {}
                if eval_metrics:
                    log.write(step, eval_metrics)
                if do_save:
                    save(eval_metrics, wait=stop or last)
                if stop:
                    log.message(
                        f"SIGTERM: stopped at step {step}; checkpoint {ckpt.directory / str(step)} is "
                        f"complete. Resume by running the same command again (workdir {workdir})."
                    )
                    return TrainResult("preempted", step, workdir, step, state)
                if last:
                    break
        if pending:
            flush()
        return TrainResult("finished", step, workdir, last_saved, state)
    finally:
        preemption.restore()
        ckpt.close()
        log.close()


def _epoch_of(step: int, epoch_ends: list[int]) -> int:
    """0-based epoch that `step` (1-based) belongs to."""
    return int(np.searchsorted(np.asarray(epoch_ends), step, side="left")) if epoch_ends else 0
