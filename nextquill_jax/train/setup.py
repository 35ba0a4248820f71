"""A run's set-up: everything that can fail does so here, before the first compile.

From a `Config` to the mesh, the data pipelines, the model graph and its parameter shardings, the
optimizer, the train state's shardings, the frozen reference model of `dce: fixed`, and the compiled train
and eval steps. The loop (`loop.py`), evaluation (`eval/evaluate.py`) and the benchmarks
(`bench/harness.py`) build on it.

    run = set_up_run(cfg, workdir)
    state = init_state(run.initial_params(), run.tx, cfg.train.seed, run.state_shardings)
    iterator = iter(run.train_data.dataset())  # host-local batches
    with jax.set_mesh(run.mesh):
        global_batch = to_global_batch(next(iterator), run.mesh)  # data/global_batch.py
        state, metrics = run.train_step(state, global_batch, run.reference_params, run.base_params)

as `loop.py` does (`base_params` is the frozen base under LoRA, else None). The model of `state.params`:
`model_and_adapters(run.graphdef, state.params, run.base_params, run.settings)` (`step.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextquill_jax import parallel
from nextquill_jax.config import Config, ModelRunConfig
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.pipeline import BatchPipeline
from nextquill_jax.data.prepared_split import PreparedSplit, check_finished, check_split, prepared_splits
from nextquill_jax.loss.config import LossConfig, streams_needed
from nextquill_jax.loss.weighting import check_weighting_values
from nextquill_jax.loss.weighting_record import weighting_fingerprint
from nextquill_jax.parallel import DEFAULT_RULES
from nextquill_jax.plural import counted
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.optimizer import (
    check_patterns,
    learning_rate_schedule,
    make_optimizer,
    trainable_mask,
    warmup_steps,
)
from nextquill_jax.train.reference_model import check_reference_token_ids, load_reference
from nextquill_jax.train.resume import data_identity
from nextquill_jax.train.state import TrainState
from nextquill_jax.train.step import StepSettings, joins_streams, make_eval_step, make_train_step
from nextquill_jax.train.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    build_mesh,
    data_dir_of,
    is_workdir,
)
from nextquill_jax.train.workdir_lock import WorkdirLock

Echo = Callable[[str], None]


def resolve_workdir(
    cfg: Config, override: str | Path | None, config_path: str | Path | None = None, echo: Echo = print
) -> Path:
    """The run's directory: `override` (--workdir); else, when `config_path` (the --config file) is the
    config.yaml of a run's workdir, that workdir, so that a moved or copied run resumes where it is (with a
    note `echo`ed when its `train.workdir` names another place); else `train.workdir`.

    Raises:
        ConfigError: none is set, `override` is empty, or it is a URL (such as gs://...), which would
            otherwise silently become a local folder named after the URL.
    """
    if override is None and config_path is not None and Path(config_path).name == CONFIG_FILE:
        home = Path(config_path).expanduser().absolute().parent
        if is_workdir(home):
            recorded = cfg.train.workdir
            # realpath: the same folder reached through a symbolic link has not moved
            if recorded is None or os.path.realpath(Path(recorded).expanduser()) != os.path.realpath(home):
                echo(
                    f"note: {config_path} is the config of the run in {home}, which records its workdir as "
                    f"{recorded} (moved or copied): it resumes in {home}; pass --workdir to train elsewhere"
                )
            return home
    if override is not None and not str(override).strip():
        # `Path("")` is the current directory, which would become the run's workdir.
        raise ConfigError("--workdir is empty (an unset shell variable?). Fix: name the run's directory")
    chosen = override if override is not None else cfg.train.workdir
    if chosen is None:
        raise ConfigError("no workdir: set train.workdir in the config or pass --workdir DIR")
    if "://" in str(chosen):
        raise ConfigError(
            f"workdir {chosen}: object-store URLs are not written directly; mount the bucket (gcsfuse, see "
            f"tpu_scripts/mount_bucket.sh) and pass the mounted path, e.g. --workdir gcs/runs/NAME"
        )
    return Path(chosen).expanduser().absolute()


class PreparedData(NamedTuple):
    """Where a run's prepared data is, and whether it was reused from the input files the config names
    (`data.prepare.prepare`'s `reused`: its fingerprint matched): record files of the content, names and
    count it was prepared from, a template of the same text and a tokenizer of the same serialisation, EOS
    and chat template, found where the config names them (where they moved to, say)."""

    dir: Path
    reused: bool


def prepared_data(cfg: Config, workdir: Path, echo: Echo) -> PreparedData:
    """The prepared data: `train.data_dir` as it is when `data.sources` is empty (and the format is not the
    in-process `synthetic`), else prepared (or reused by fingerprint) from the `data` section into
    `train.data_dir` or `<workdir>/prepared`.

    Data prepared with other settings is replaced only in `<workdir>/prepared` of a workdir without
    checkpoints: a directory `train.data_dir` names may serve other runs or hold a `data prepare` with
    overrides, and checkpoints were trained on their workdir's data.

    Process 0 prepares first; the others then find it up to date (shared disk) or prepare their own copy,
    or, when process 0 failed, raise `parallel.Process0FailedError` at once.

    Raises:
        DataError: invalid records (`data.on_error: fail`).
        ConfigError: what `data.prepare.prepare` rejects as a `data` section problem (files that match
            nothing, template fields a format lacks, no example left, ...), or data prepared with other
            settings that is not replaced (naming what differs and the fix).
        parallel.Process0FailedError: in processes other than 0, when process 0 failed to prepare the data.
        FileNotFoundError: `train.data_dir` as it is holds a preparation that did not finish
            (`check_finished`), or was prepared with no train record (`check_split`).
    """
    target = data_dir_of(cfg, workdir)
    if not cfg.data.sources and cfg.data.format != "synthetic":
        if not prepared_splits(target):
            raise ConfigError(
                f"data.sources is empty and {target} holds no prepared data (train/meta.json). Fix: list "
                f"the record files in data.sources, or point train.data_dir at the output of "
                f"`nextquill-jax data prepare`."
            )
        check_finished(target, "train.data_dir")
        check_split(target, "train", other_split=False)  # prepared, but perhaps with no train record
        return PreparedData(target, reused=False)
    from nextquill_jax.data.prepare import prepare
    from nextquill_jax.data.sources.records import DataError

    checkpoints = workdir / CHECKPOINT_DIR
    if cfg.train.data_dir:
        protected = (
            "train.data_dir names it, and train does not replace data it is pointed at. Fix: give the data "
            "settings it was prepared with, prepare it again on purpose (`nextquill-jax data prepare "
            f"--config FILE --out {target} --force`), or point train.data_dir at another directory."
        )
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        protected = (
            f"the checkpoints in {checkpoints} were trained on it. Fix: run with the data settings the run "
            f"was trained on (`nextquill-jax train --config {workdir / CONFIG_FILE}` resumes it), or use a "
            f"new --workdir."
        )
    else:
        protected = None

    def prepare_first() -> int:
        return int(prepare(cfg.data, target, protected=protected, echo=echo)["reused"])

    try:
        reused = parallel.process_0_result(prepare_first, f"to prepare the data in {target}")
        if jax.process_index() != 0:
            prepare(cfg.data, target, protected=protected, echo=lambda _: None)
    except DataError:
        raise
    except ValueError as e:  # prepare's ValueErrors are problems of the `data` section
        raise ConfigError(str(e)) from None
    return PreparedData(target, reused=bool(reused))


def plan_steps(pipeline: BatchPipeline, cfg: Config) -> tuple[int, list[int]]:
    """(total optimizer steps, the step that ends each epoch) for the run: the ends are the cumulative
    `pipeline.num_batches` of its epochs, those <= total (an epoch cut short by `train.max_steps` has none).

    An endless run (`num_epochs: null`) has epochs too: its iterator starts the next, reshuffled epoch after
    each (`_EpochsIterator` in data/pipeline.py), so its epochs are planned until they cover
    `train.max_steps`, as the same run with `num_epochs` set to cover it plans them: both evaluate and save
    at the same epoch ends, and log the same `epoch`.

    Raises:
        ConfigError: an endless data iterator (`num_epochs: null`, which `Config` allows with
            `train.max_steps` only) with an epoch that holds no batch.
    """
    epochs, max_steps = cfg.data.batching.num_epochs, cfg.train.max_steps
    ends, total, epoch = [], 0, 0
    while (epoch < epochs) if epochs is not None else (total < max_steps):
        batches = pipeline.num_batches(epoch)
        if batches == 0 and epochs is None:  # no step would ever come (the iterator would wait forever too)
            raise ConfigError(
                f"epoch {epoch} of the training data fills no complete global batch (data.batching."
                f"drop_remainder is true), so the endless run could never reach train.max_steps. Fix: set "
                f"data.batching.drop_remainder: false, or lower data.batching.rows_per_batch."
            )
        total += batches
        ends.append(total)
        epoch += 1
    if max_steps is not None:
        total = min(total, max_steps)
    return total, [e for e in ends if e <= total]


def batching_losses(pipelines: dict[str, BatchPipeline]) -> list[str]:
    """A note for each of `pipelines` (name -> pipeline) whose batching cuts or leaves out examples: targets
    cut to fit a row (`too_long: truncate`, the same in every epoch) and, in its first epoch, the examples of
    partly filled last batches left out (`drop_remainder`; a shuffled epoch leaves out others, as many).
    Empty where nothing is lost, which is what set-up otherwise says nothing about."""
    notes = []
    for name, pipeline in pipelines.items():
        stats = pipeline.epoch_stats(0)
        total, lost = stats.examples + stats.dropped_examples, []
        if stats.truncated_examples:
            lost.append(
                f"{stats.truncated_examples} of the {total} {name} examples have their target cut to fit a "
                f"row ({counted(stats.truncated_tokens, 'target token')} in all; data.batching.too_long: "
                f"truncate)"
            )
        if stats.dropped_examples:
            lost.append(
                f"its first epoch leaves {stats.dropped_examples} of the {total} {name} examples out "
                f"(data.batching.drop_remainder: its partly filled last batches)"
            )
        if lost:
            notes.append(f"note: {'; '.join(lost)}")
    return notes


def planned_examples_per_row(pipeline: BatchPipeline) -> tuple[int, int]:
    """(the most examples a planned row of `pipeline` holds, an epoch where it does), over every epoch of its
    `num_epochs` (the first only, when that is null: `examples_per_row` bounds an endless run's every epoch
    instead)."""
    epochs = range(pipeline.cfg.num_epochs or 1)
    return max((pipeline.epoch_stats(e).max_examples_per_row, e) for e in epochs)


def examples_per_row(pipeline: BatchPipeline) -> tuple[int, int | None]:
    """(the most examples a row of `pipeline` holds in any epoch it yields, an epoch where it does).

    With `num_epochs` set: over its planned epochs (`planned_examples_per_row`). Endless (`num_epochs: null`):
    `BatchPipeline.examples_per_row_bound`, which holds for every epoch (the epoch is None): the pipeline
    does not say how many epochs the run reaches, and the first epoch's count does not bound the later ones.
    """
    if pipeline.cfg.num_epochs is None:
        return pipeline.examples_per_row_bound(), None
    return planned_examples_per_row(pipeline)


def resolve_packed_segments(cfg: Config, pipelines: dict[str, BatchPipeline], echo: Echo) -> Config:
    """`cfg` with `model.cudnn_max_segments: auto` replaced by the most segments an attention row of
    `pipelines` holds (`segments_per_row` of `examples_per_row`: the count `check_packed_segments` checks),
    and one line `echo`ed saying which value and from what (`cfg` itself when not `auto`). `pipelines` maps a
    name (`train`, `eval`) to its pipeline.

    The value depends only on the prepared data, `data.batching` and `train.joint_forward`, so resuming the
    same run chooses the same value and compiles the same step. It is chosen again rather than read back from
    config.yaml: a resume must keep the data and `data.batching` (`train.resume`); one that changes
    `train.joint_forward` gets the bound its rows need (the key may change on resume).
    """
    if cfg.model.cudnn_max_segments != "auto":
        return cfg
    found = []
    for name, pipeline in pipelines.items():
        most, epoch = examples_per_row(pipeline)
        if epoch is None:
            why = f"at most that many {name} examples fit one row (num_epochs: null: a bound for every epoch)"
        else:
            why = f"the most examples a planned {name} row holds (epoch {epoch})"
        found.append((most, why))
    most, why = max(found, key=lambda f: f[0])
    chosen = segments_per_row(cfg.train.joint_forward, cfg.loss.loss_config(), most)
    if chosen != most:
        why = f"{why}, {most}, twice: {_JOINED}"
    echo(f"model.cudnn_max_segments: auto chose {chosen}: {why}")
    return dataclasses.replace(cfg, model=cfg.model.resolved(chosen))


def check_packed_segments(cfg: Config, pipelines: dict[str, BatchPipeline]) -> None:
    """Raise ConfigError if `model.cudnn_max_segments` is set and a row may hold more examples.

    cuDNN's packed attention takes at most that many segments per row and makes a row with more non-finite
    under jit, which would look like divergence. `pipelines` maps a name (`train`, `eval`) to its pipeline;
    each is checked against `examples_per_row`: its planned epochs, or, with `num_epochs: null`, the bound
    for every epoch. For a number set in the config: `auto` is resolved instead (`resolve_packed_segments`),
    to a value that covers every row.
    """
    limit = cfg.model.cudnn_max_segments
    if limit is None:
        return
    for name, pipeline in pipelines.items():
        most, epoch = examples_per_row(pipeline)
        needed = segments_per_row(cfg.train.joint_forward, cfg.loss.loss_config(), most)
        if needed <= limit:
            continue
        fix = f"Fix: set model.cudnn_max_segments to {needed} or more, or auto."
        joined = f" ({needed} segments: {_JOINED})" if needed != most else ""
        if epoch is None:
            raise ConfigError(
                f"data.batching.num_epochs is null, so any epoch may pack up to {most} examples into one "
                f"{name} row (the most of them that fit one row together: the first epoch's plan does not "
                f"bound the later ones){joined}, more than model.cudnn_max_segments={limit}: cuDNN's packed "
                f"attention would make such rows non-finite. {fix}"
            )
        raise ConfigError(
            f"data.batching packs up to {most} examples into one {name} row (epoch {epoch}){joined}, more "
            f"than model.cudnn_max_segments={limit}: cuDNN's packed attention would make those rows "
            f"non-finite. {fix}"
        )


_JOINED = "train.joint_forward joins both streams of a row into one attention row"


def segments_per_row(joint_forward: bool, loss: LossConfig, examples: int) -> int:
    """The most segments one attention row holds when a data row holds `examples` examples: twice as many
    where the step joins the with- and without-history rows (`train.step.joins_streams`;
    `joint_response_hidden` numbers the latter's examples after the former's); rows of equal length are
    interleaved instead, which the bound also covers."""
    return 2 * examples if joins_streams(joint_forward, loss) else examples


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


def state_shardings(
    tx: optax.GradientTransformation, abstract_params: dict, shardings: dict, mesh: Mesh
) -> TrainState:
    """Shardings of the whole TrainState: optimizer moments like their parameters, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    # Under `optim.trainable` (optax.multi_transform) a frozen parameter's moments are an empty MaskedNode:
    # it stays one (it holds no array), the others take their parameter's sharding.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(
        tx,
        lambda leaf, s: leaf if masked(leaf) else s,
        opt_abstract,
        shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    return TrainState(step=replicated, params=shardings, opt_state=opt, rng=replicated, skipped=replicated)


def new_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The train state at step 0: `params`, fresh optimizer moments, a PRNG key from `seed`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        skipped=jnp.zeros((), jnp.int32),
    )


def init_state(
    params: dict, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
    """`new_state` compiled with `shardings` as its out-shardings (optimizer moments placed like their
    parameters, never gathered on one device)."""
    return jax.jit(lambda p: new_state(p, tx, seed), out_shardings=shardings)(params)


def abstract_state(
    abstract_params: dict, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
    """The train state as `jax.ShapeDtypeStruct`s carrying `shardings` (what a checkpoint restores into)."""
    shapes = jax.eval_shape(lambda p: new_state(p, tx, seed), abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def check_model_sources(cfg: Config) -> None:
    """Check, from the file system alone (nothing is loaded, no device is touched), that `model.path` and a
    `loss.reference_model` that `dce: fixed` reads name something loadable (`model_setup.check_model_source`).
    The reference is loaded once the data is prepared, and `compare` runs its variants one after another:
    a path that names nothing would only fail then.

    Raises:
        ConfigError: naming the setting, the path and the fix.
    """
    model_setup.check_model_source(cfg.model)
    reference = cfg.loss.reference_model
    if cfg.loss.dce == "fixed" and reference not in (None, "base") and not is_workdir(reference):
        model_setup.check_model_source(ModelRunConfig(path=reference), key="loss.reference_model")


def reference_for_rows(reference: tuple[Any, dict], pipelines: dict[str, BatchPipeline]) -> tuple[Any, dict]:
    """`reference` (graphdef, params) made to run on the rows of `pipelines` (name -> pipeline): a
    `cudnn_max_segments` (M) of the reference model below the most examples a row may hold
    (`examples_per_row`, what the run's own M is checked against or `auto` chooses) is raised to that.

    A training workdir's model keeps the runtime settings saved with it, M included; M was checked against
    that run's rows, and this run's may pack more, which cuDNN's packed attention would make NaN. A NaN DCE
    does not show in the loss: it fails the threshold the loss weights compare it with, so it silently
    shifts the weights. The run's M cannot serve: it is null when the run itself does not use the packed
    mode. The same parameters with a larger bound compute the same attention.
    """
    graphdef, params = reference
    model = nnx.merge(graphdef, params)
    if model.cfg.cudnn_max_segments is None:
        return reference
    most = max(examples_per_row(pipeline)[0] for pipeline in pipelines.values())
    return model_setup.covering_graphdef(model, most), params


def step_settings(cfg: Config, reference_graphdef: Any = None) -> StepSettings:
    """The step's static settings from the config's `loss`, `train` and `model.lora` sections."""
    lora = cfg.model.lora
    return StepSettings(
        loss=cfg.loss.loss_config(),
        micro_batches=cfg.train.micro_batches,
        skip_nonfinite=cfg.train.nonfinite == "skip",
        token_chunk=cfg.loss.token_chunk,
        vocab_chunk=cfg.loss.vocab_chunk,
        operand_dtype=cfg.loss.operand_dtype,
        joint_forward=cfg.train.joint_forward,
        reference_graphdef=reference_graphdef,
        lora_scale=None if lora is None else lora.scale,
        lora_dropout=0.0 if lora is None else lora.dropout,
    )


def jit_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    settings: StepSettings,
    mesh: Mesh,
    shardings: TrainState,
    *,
    trainable: Any = None,
    reference_shardings: Any = None,
    base_shardings: Any = None,
) -> Callable:
    """`make_train_step` under `jax.jit`: the state donated and kept in `shardings`, the batch split over
    the mesh's batch axes, metrics replicated. Called as `step(state, batch, reference_params, base_params)`
    (each None when unused)."""
    return jax.jit(
        make_train_step(graphdef, tx, schedule, settings, mesh, trainable),
        in_shardings=(shardings, parallel.batch_sharding(mesh), reference_shardings, base_shardings),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def jit_eval_step(
    graphdef: Any,
    settings: StepSettings,
    mesh: Mesh,
    param_shardings: dict,
    reference_shardings: Any = None,
    base_shardings: Any = None,
) -> Callable:
    """`make_eval_step` under `jax.jit`: `eval_step(params, batch, reference_params, base_params) -> aux`."""
    return jax.jit(
        make_eval_step(graphdef, settings),
        in_shardings=(param_shardings, parallel.batch_sharding(mesh), reference_shardings, base_shardings),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


@dataclass(frozen=True)
class RunSetup:
    """What `train` needs before its first step.

    `config` is the run's config as set-up resolved it (`model.cudnn_max_segments: auto` chosen): what the
    steps were built from and what the workdir records. `eval_data` is None when the prepared data has no
    `eval.split`; `reference` is (graphdef, params) of the frozen reference model or None;
    `initial_params()` loads or initialises the starting parameters, the state's (only called when there is
    no checkpoint to resume from). Under `model.lora` the state's parameters are the adapters, `base_params`
    the frozen base and `base_identity` its path and fingerprint (both None for full fine-tuning).
    `data_identity` is `resume.data_identity` of the train and eval splits (`data_reused`: reused from the
    input files the config names, `PreparedData`), and `weighting_identity`
    `loss.weighting_record.weighting_fingerprint` of `loss.weighting` (None without one), which each
    checkpoint records, as it records `reference_identity`, the `reference_model.Reference.identity` of the
    frozen reference model (None without one).
    `graphdef` is the model's graph (the base's under LoRA), which the steps merge with the parameters:
    `step.model_and_adapters(graphdef, state.params, base_params, settings)` is the model a step runs (and
    its LoRA adapters).
    """

    config: Config
    mesh: Mesh
    data_dir: Path
    train_data: BatchPipeline
    eval_data: BatchPipeline | None
    total_steps: int
    epoch_ends: list[int]
    abstract_params: dict
    graphdef: Any
    tx: optax.GradientTransformation
    state_shardings: TrainState
    reference: tuple[Any, dict] | None
    settings: StepSettings
    train_step: Callable
    eval_step: Callable
    initial_params: Callable[[], dict]
    data_identity: dict
    weighting_identity: dict | None
    base_params: dict | None = None
    base_identity: dict | None = None
    reference_identity: dict | None = None
    data_reused: bool = False

    @property
    def reference_params(self) -> dict | None:
        """The frozen `dce: fixed` reference model's parameters, or None without one."""
        return None if self.reference is None else self.reference[1]


def set_up_run(
    cfg: Config,
    workdir: Path,
    echo: Echo = print,
    *,
    lock: WorkdirLock | None = None,
    on_locked: Callable[[], object] | None = None,
) -> RunSetup:
    """Multi-host start-up and mesh, data, model, optimizer, shardings and compiled steps for `cfg`
    (`model.cudnn_max_segments: auto` resolved: `RunSetup.config`). With `lock` (`train`'s), process 0 takes
    it once the config checks have passed, before anything is written in `workdir`; the caller releases it.
    `on_locked` (the CLI's: it opens the third-party log in `workdir`) is called next, on every process,
    once `workdir` exists and before set-up writes there; not at all when the lock is refused.

    Raises:
        WorkdirLockedError: another `train` holds `lock` (on the other processes of a multi-process run,
            Process0FailedError), before the workdir is written or the data prepared.
        ConfigError: any config problem found here (model source, an attention implementation the backend
            cannot run, mesh, micro-batches, `loss.weighting`'s values, LoRA targets and init_from, data,
            optimizer, fixed-DCE source),
            before anything is compiled; examples that do not fit a row of data.batching (`BatchPipeline`).
        FileNotFoundError: the prepared data holds no train split (`check_split`).
        IntegrityError: a prepared split that is damaged or holds what `data prepare` never writes
            (`PreparedSplit`, `BatchPipeline`).
    """
    mesh = build_mesh(cfg)
    check_model_sources(cfg)
    reference = cfg.loss.reference_model
    if reference is not None and cfg.loss.dce != "fixed":
        # Not refused: a compare file's base may set it for its fixed-DCE variants alone.
        why = (
            "the DCE that weights the targets is the trained model's own; loss.dce=fixed weights them by the "
            "reference's"
            if cfg.loss.loss_config().uses_target_weights
            else f"loss.variant {cfg.loss.variant} weights no target by DCE"
        )
        echo(
            f"note: loss.reference_model is {reference!r} but loss.dce is {cfg.loss.dce}: the reference is "
            f"not loaded ({why})"
        )
    model_setup.check_attention(cfg.model)
    check_micro_batches(cfg, mesh)
    check_weighting_values(cfg.loss.loss_config())
    if cfg.data.max_history == 0 and all(streams_needed(cfg.loss.loss_config())):
        echo(
            f"note: data.max_history is 0, so no prompt holds any history: the with- and without-history "
            f"passes see the same context, and loss.variant {cfg.loss.variant}'s effects of the history "
            f"(DCE, the alignment term) measure nothing"
        )
    lora = cfg.model.lora
    model_section = cfg.model if lora is None else adapters.base_section(cfg.model)
    # The architecture (a path's config.json, and its weights' headers), the LoRA targets and the init_from
    # adapter are checked before the workdir is created and the data prepared, which takes minutes on a real
    # dataset; `cudnn_max_segments: auto` is chosen from the data below, so 1 stands in for it (the
    # parameters do not depend on it).
    stand_in = model_setup.model_config(model_section.resolved(1))
    model_setup.check_weights(model_section, stand_in)
    # What the optimizer trains, as shapes, for its patterns: the adapters under LoRA, else the parameters.
    if lora is not None:
        # A resume restores its adapters: init_from's files are read by a fresh start only (`initial_params`,
        # which refuses a bad one itself), so a moved init_from does not block resuming a run.
        checkpoints = workdir / CHECKPOINT_DIR
        resuming = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        trained = adapters.check_lora(lora, stand_in, check_init_from=not resuming)
    else:
        trained = model_setup.abstract_model(stand_in)[1]
    try:
        check_patterns(cfg.optim, trained)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if lock is not None:
        # Process 0 alone (the others share its workdir, `WorkdirLock`); should it be refused, the others
        # stop too rather than wait for it in the next collective.
        parallel.process_0_result(
            lambda: int(lock.acquire(jax.process_index(), echo)), f"to lock the workdir {workdir}"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if on_locked is not None:
        on_locked()

    data_dir, data_reused = prepared_data(cfg, workdir, echo)
    check_split(data_dir, "train", other_split=False)  # train has no --split to offer
    train_data = BatchPipeline(PreparedSplit(data_dir, "train"), cfg.data.batching)
    total_steps, epoch_ends = plan_steps(train_data, cfg)
    eval_data = _eval_pipeline(cfg, data_dir, echo)
    pipelines = {"train": train_data, **({"eval": eval_data} if eval_data else {})}
    for line in batching_losses(pipelines):
        echo(line)
    if cfg.model.cudnn_max_segments == "auto":  # before any ModelConfig is built from cfg.model
        cfg = resolve_packed_segments(cfg, pipelines, echo)  # covers every planned row: nothing to check
    else:
        check_packed_segments(cfg, pipelines)
    if cfg.loss.dce == "fixed" and cfg.loss.reference_model is None and not train_data.has_reference_dce:
        raise ConfigError(
            f"loss.dce is 'fixed' but {data_dir} carries no reference_dce and loss.reference_model is not "
            f"set. Fix: set loss.reference_model (a training workdir, a Hugging Face directory or a packaged "
            f"model), or prepare data with precomputed reference_dce."
        )

    model_section = cfg.model if lora is None else adapters.base_section(cfg.model)  # `auto` resolved
    mcfg = model_setup.model_config(model_section)
    origin = model_setup.vocab_origin(model_section)
    splits = [pipeline.split for pipeline in pipelines.values()]
    for split in splits:  # before any weights are loaded or steps compiled
        model_setup.check_token_ids(split, mcfg.vocab_size, origin)
    check_reference_token_ids(cfg, splits)
    graphdef, abstract_params = model_setup.abstract_model(mcfg)
    try:
        p_shardings = model_setup.param_shardings(mcfg, mesh)
    except ValueError as e:
        raise ConfigError(f"mesh {dict(mesh.shape)} does not fit the model: {e}") from None
    seed = cfg.train.seed
    base, base_identity = None, None
    if lora is None:
        trainable_abstract, trainable_shardings = abstract_params, p_shardings
        initial_params = lambda: model_setup.initial_params(
            cfg.model, mcfg, p_shardings, mesh, seed, DEFAULT_RULES
        )
    else:
        adapter_cfg = mcfg.replace(param_dtype=cfg.model.param_dtype)
        trainable_abstract, trainable_shardings = adapters.adapter_layout(lora, adapter_cfg, mesh)

        def initial_params() -> dict:  # a fresh run's adapters; a resume restores its own instead
            note = adapters.init_from_note(cfg.model)
            if note is not None:
                echo(note)
            return adapters.initial_adapters(lora, adapter_cfg, trainable_abstract, trainable_shardings, seed)

        loaded = model_setup.initial_params(model_section, mcfg, p_shardings, mesh, seed, DEFAULT_RULES)
        base = adapters.frozen_base(loaded, lora)
        del loaded
        base_identity = adapters.base_identity(cfg.model, seed)
    try:
        tx = make_optimizer(cfg.optim, trainable_abstract, total_steps)
        trainable = trainable_mask(cfg.optim, trainable_abstract) if cfg.optim.trainable else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    s_shardings = state_shardings(tx, trainable_abstract, trainable_shardings, mesh)
    loaded_reference = load_reference(cfg, mesh, None if base is None else (graphdef, base))
    reference, reference_identity = None, None
    if loaded_reference is not None:
        reference = reference_for_rows((loaded_reference.graphdef, loaded_reference.params), pipelines)
        reference_identity = loaded_reference.identity
    ref_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference[1])
    base_shardings = None if base is None else jax.tree.map(lambda x: x.sharding, base)
    settings = step_settings(cfg, None if reference is None else reference[0])
    schedule = learning_rate_schedule(cfg.optim, total_steps)
    if total_steps == 1 and warmup_steps(cfg.optim, total_steps) >= 1:
        echo(
            "note: the run's one optimizer step is the first of its warm-up, whose learning rate is 0: it "
            "changes no weight. Fix: optim.warmup_steps=0, or more steps (train.max_steps, epochs)"
        )
    elif warmup_steps(cfg.optim, total_steps) > total_steps:
        last = float(schedule(total_steps - 1))  # the last update's learning rate
        echo(
            f"note: optim.warmup_steps is {warmup_steps(cfg.optim, total_steps)}, more than the run's "
            f"{total_steps} optimizer steps: the learning rate ends part-way up its warm-up, at {last:.3g} "
            f"({last / cfg.optim.learning_rate:.0%} of optim.learning_rate), and never decays"
        )
    return RunSetup(
        config=cfg,
        mesh=mesh,
        data_dir=data_dir,
        train_data=train_data,
        eval_data=eval_data,
        total_steps=total_steps,
        epoch_ends=epoch_ends,
        abstract_params=trainable_abstract,
        graphdef=graphdef,
        tx=tx,
        state_shardings=s_shardings,
        reference=reference,
        settings=settings,
        train_step=jit_train_step(
            graphdef,
            tx,
            schedule,
            settings,
            mesh,
            s_shardings,
            trainable=trainable,
            reference_shardings=ref_shardings,
            base_shardings=base_shardings,
        ),
        eval_step=jit_eval_step(graphdef, settings, mesh, trainable_shardings, ref_shardings, base_shardings),
        initial_params=initial_params,
        base_params=base,
        base_identity=base_identity,
        reference_identity=reference_identity,
        data_identity=data_identity(data_dir, {p.split.dir.name: p.split for p in pipelines.values()}),
        data_reused=data_reused,
        # Read once, as the steps are built: the code behind the name that this run trains with.
        weighting_identity=weighting_fingerprint(cfg.loss.weighting),
    )


def evaluation_pipeline(cfg: Config, split: PreparedSplit) -> BatchPipeline:
    """`split` batched as evaluation batches it: `data.batching` in the split's order, once, the last
    partial batch kept."""
    batching = dataclasses.replace(cfg.data.batching, shuffle=False, num_epochs=1, drop_remainder=False)
    return BatchPipeline(split, batching)


def _eval_pipeline(cfg: Config, data_dir: Path, echo: Echo) -> BatchPipeline | None:
    held = prepared_splits(data_dir)
    if cfg.eval.split not in held:
        best = cfg.checkpoint.best_metric
        kept = "" if best is None else f", so checkpoint.best_metric {best!r} keeps no best checkpoint"
        echo(
            f"{data_dir} has no {cfg.eval.split!r} split: no evaluation{kept} (eval.split names the split; "
            f"the data holds {', '.join(held) or 'none'})"
        )
        return None
    return evaluation_pipeline(cfg, PreparedSplit(data_dir, cfg.eval.split))
