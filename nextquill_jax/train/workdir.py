"""A training workdir's layout, its mesh, and its checkpoints' models (for evaluation, export, effect
reports and a frozen reference model).

    <workdir>/config.yaml      the run's config
    <workdir>/checkpoints/N/   Orbax checkpoints (state, data iterator, the config of that step)
    <workdir>/prepared/        prepared data, unless `train.data_dir` points elsewhere
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, get_args

import jax
from flax import nnx
from jax.sharding import Mesh

from nextquill_jax import parallel
from nextquill_jax.config import CheckpointConfig, Config, RunDtype, load_config
from nextquill_jax.config_schema import ConfigError
from nextquill_jax.data.checksums import IntegrityError
from nextquill_jax.loss.weighting_record import READ_WITH_OTHER_WEIGHTS, weighting_fingerprint, weighting_note
from nextquill_jax.models import CausalLM, attention, lora
from nextquill_jax.train import adapters, model_setup
from nextquill_jax.train.checkpoint import Checkpointer, moved_aside, verify_error

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
PREPARED_DIR = "prepared"
# Where a run has no checkpoint, what evaluate / effects / export can still read from it.
STEP_0_HINT = "The model the run starts from (untrained) is its step 0: pass `--step 0`."


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model placed on `mesh`, and where it came from: the run's config, the checkpoint step (None for a
    `load_pretrained` path) and a readable `source`. A LoRA run's model is its base carrying the adapters
    (`CausalLM.attach_adapters`), which it applies apart as training does; `merged_model` folds them in."""

    model: CausalLM
    config: Config
    mesh: Mesh
    step: int | None
    source: str
    weighting_note: str | None = None  # as `RestoredParams`'s
    progress: dict[str, Any] | None = None  # as `RestoredParams`'s; None for step 0 and a model path too


def _check_compute_dtype(compute_dtype: str | None) -> None:
    """Raise ValueError unless `compute_dtype` is None or a `RunDtype` (naming the choices)."""
    if compute_dtype is not None and compute_dtype not in get_args(RunDtype):
        raise ValueError(
            f"compute_dtype must be one of {list(get_args(RunDtype))} (or None: the run's own), "
            f"got {compute_dtype!r}"
        )


def _with_compute_dtype(cfg: Config, compute_dtype: RunDtype | None) -> Config:
    """`cfg` with `model.compute_dtype` replaced by `compute_dtype` (`cfg` itself for None)."""
    if compute_dtype is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=compute_dtype))


def is_workdir(path: str | Path) -> bool:
    """True if `path` holds a run's config.yaml and checkpoints/ directory."""
    root = Path(path).expanduser()
    return (root / CONFIG_FILE).is_file() and (root / CHECKPOINT_DIR).is_dir()


def checkpoints_dir(workdir: str | Path, no_checkpoint_hint: str = STEP_0_HINT) -> Path:
    """`workdir`'s checkpoints directory, which must exist. `no_checkpoint_hint` ends the message for a run
    that has not saved one yet (`STEP_0_HINT`: what the reading command can read from it instead).

    Raises:
        FileNotFoundError: `workdir` is not a training workdir (naming the missing directory, `workdir`
            itself or its checkpoints/, and the fix).
    """
    if not Path(workdir).expanduser().exists():
        raise FileNotFoundError(
            f"{workdir} does not exist{model_setup.relative_to_cwd(str(workdir))}, so it is not a training "
            "workdir. Fix: pass the workdir of a `nextquill-jax train` run (it holds config.yaml and "
            "checkpoints/)."
        )
    directory = Path(workdir).expanduser() / CHECKPOINT_DIR
    if not directory.is_dir() and (Path(workdir).expanduser() / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{workdir} holds a run's {CONFIG_FILE} but no checkpoints ({directory} does not exist): a "
            f"compare `train: false` variant, or a run stopped before its first save. {no_checkpoint_hint}"
        )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{workdir} is not a training workdir: {directory} does not exist. Fix: pass the workdir of a "
            "`nextquill-jax train` run (it holds config.yaml and checkpoints/)."
        )
    return directory


def data_dir_of(cfg: Config, workdir: str | Path) -> Path:
    """Where the run's prepared data lives: `train.data_dir`, else `<workdir>/prepared`."""
    return Path(cfg.train.data_dir).expanduser() if cfg.train.data_dir else Path(workdir) / PREPARED_DIR


def load_given_tokenizer(given: str | None, setting: str | None = "--tokenizer") -> Any:
    """The tokenizer a command's `--tokenizer` names (`given`; None: none given, None returned), loaded before
    the run's model is restored: a typo is named at once, not after minutes of reading a large checkpoint.

    Raises:
        ValueError / TypeError: it does not load (`data.prepare.load_fast_tokenizer`), naming `setting`.
    """
    from nextquill_jax.data.prepare import load_fast_tokenizer

    return None if given is None else load_fast_tokenizer(given, setting or "tokenizer")


def load_run_tokenizer(loaded: LoadedModel, setting: str | None = "--tokenizer") -> Any:
    """The tokenizer of a run's model `loaded`: the run's `data.tokenizer` in the config the model was read
    with (`data.prepare.load_fast_tokenizer`). A command's `--tokenizer` (`setting`) replaces it where it
    moved (`load_given_tokenizer`).

    Raises:
        ValueError: it does not load; where it is no longer there, the fix: `setting` naming its new place
            (None: a command without such a flag, `compare`: put it back).
    """
    from nextquill_jax.data.prepare import load_fast_tokenizer

    name = loaded.config.data.tokenizer
    try:
        return load_fast_tokenizer(name)
    except ValueError as e:
        if Path(name).expanduser().exists():  # there, but not a tokenizer that loads: nothing moved
            raise
        fix = (
            f"pass {setting} with its new place"
            if setting is not None
            else "put it back, or a symbolic link to its new place at that path"
        )
        raise ValueError(
            f"{e}; it is the run's tokenizer (data.tokenizer of the run's config): where it moved, {fix}"
        ) from None


def build_mesh(cfg: Config) -> Mesh:
    """Multi-host start-up (when configured) and the mesh; errors are ConfigErrors naming `mesh.*`."""
    start_distributed(cfg)
    try:
        return parallel.make_mesh(cfg.mesh.sizes())
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None


def start_distributed(cfg: Config) -> None:
    """Start JAX's multi-process runtime where `cfg.mesh` (or the environment) asks for it
    (`parallel.initialize_distributed`); a no-op once started. Call before anything touches a device.

    Raises:
        ConfigError: incomplete multi-host settings, naming `mesh.*`.
    """
    m = cfg.mesh
    try:
        parallel.initialize_distributed(
            m.coordinator, m.num_processes, m.process_id, mode=m.distributed, peer_timeout_s=m.peer_timeout_s
        )
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None


# Data parallel over every device: the parameters replicated, so it fits any model's shapes.
READING_FALLBACK = {"data": -1, "fsdp": 1, "tensor": 1}


def reading_mesh(cfg: Config) -> Mesh:
    """The mesh to read a trained run on (evaluate, effects, a reference model): the run's own (`build_mesh`)
    where this machine has the devices it names, else every device along `data` (parameters replicated,
    which any model's shapes allow), with a note on stderr. A run trained on 8 devices is then read on 1.

    Raises:
        ConfigError: incomplete multi-host settings (`build_mesh`).
    """
    start_distributed(cfg)  # its errors (incomplete multi-host settings) are raised, not read around
    try:
        return parallel.make_mesh(cfg.mesh.sizes())
    except ValueError as e:
        if jax.process_count() > 1 or cfg.mesh.sizes() == READING_FALLBACK:
            raise ConfigError(f"mesh: {e}") from None
    sizes = ", ".join(f"{k}={v}" for k, v in cfg.mesh.sizes().items())
    print(
        f"note: the run's mesh ({sizes}) needs other than the {jax.device_count()} device(s) here; reading "
        "it with every device along `data` instead",
        file=sys.stderr,
    )
    return parallel.make_mesh(READING_FALLBACK)


def reading_config(cfg: Config, source: str, runs_attention: bool = True) -> Config:
    """The config to read a trained run with here (evaluate, effects, export, a reference model): `cfg`, but
    where its `model.attention_impl` cannot run on JAX's backend (a `cudnn` run read without an NVIDIA GPU, a
    `splash` one without a TPU), `xla` instead, with a note on stderr naming `source` (where `cfg` was read)
    and the setting. `xla` applies the same mask rule (causal, within a segment; padding outputs unused), so
    the model's outputs are the same up to rounding; `model.cudnn_max_segments`, a setting of cuDNN's packed
    mode, is dropped with it. Training keeps refusing such a setting (`model_setup.check_attention`): a run
    is not silently trained with another kernel than its config names. Without `runs_attention` (export,
    which only writes the weights and runs no attention) the note is left out: nothing is computed with
    either kernel, so it would only alarm.

    A saved `model.cudnn_max_segments: auto` is read as null: a run saves the value it chose, so `auto` is
    the default filled in for a config.yaml saved before the key existed (2026-11-30), whose run used
    cuDNN's dense segment mask.
    """
    if cfg.model.cudnn_max_segments == "auto":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cudnn_max_segments=None))
    impl = cfg.model.attention_impl
    try:  # looked up when called, so that tests emulating cuDNN on CPU (replacing it) keep `cudnn`
        attention.check_attention_backend(impl)
    except ValueError:
        pass
    else:
        return cfg
    segments = cfg.model.cudnn_max_segments
    dropped = "" if segments is None else f" (without its model.cudnn_max_segments: {segments})"
    note = (
        f"note: {source} sets model.attention_impl={impl!r}, which JAX cannot run on "
        f"{jax.default_backend()!r}; reading the model with model.attention_impl='xla'{dropped}, the same "
        "attention computed blockwise in XLA"
    )
    if runs_attention:
        print(note, file=sys.stderr)
    model = dataclasses.replace(cfg.model, attention_impl="xla", cudnn_max_segments=None)
    return dataclasses.replace(cfg, model=model)


# What a reader that runs no model (export) leaves out of a saved config: the `loss.weighting` function, whose
# module would otherwise have to import where the weights are only written.
WITHOUT_LOSS_FUNCTION = ("loss.weighting=null",)


def _load_overrides(runs_model: bool) -> dict:
    """`load_config`'s overrides for a reader of a saved config: none, or without `runs_model` (export)
    `WITHOUT_LOSS_FUNCTION`, named as export's in an error."""
    if runs_model:
        return {}
    return {"overrides": WITHOUT_LOSS_FUNCTION, "overrides_source": "export, which computes no loss"}


def saved_config(workdir: str | Path, runs_model: bool = True, start_runtime: bool = True) -> Config:
    """The config the run in `workdir` saved as its config.yaml, as `reading_config` reads it here; without
    `runs_model` (export), without its note and its `loss.weighting` (`WITHOUT_LOSS_FUNCTION`). With
    `start_runtime`, JAX's multi-process runtime is started first where that config or the environment asks
    for it (`start_distributed`); a caller that reads on devices of its own choosing passes False.

    Raises:
        FileNotFoundError: `workdir` has no config.yaml.
        ConfigError: config.yaml does not load here (with `runs_model`: a `loss.weighting` whose module does
            not import).
    """
    config_file = Path(workdir) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist: is {workdir} a training workdir?")
    cfg = load_config(config_file, **_load_overrides(runs_model))
    if start_runtime:  # before JAX's backend starts, which `reading_config`'s backend check does
        start_distributed(cfg)
    return reading_config(cfg, str(config_file), runs_model)


def single_device_mesh() -> Mesh:
    """A mesh of this process's first device (all axes of size 1)."""
    return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])


@dataclasses.dataclass(frozen=True)
class RestoredParams:
    """A checkpoint's trained parameters (the model's, or the LoRA adapters under `model.lora`), placed on
    `mesh`, with the config saved with it (as `reading_config` reads it here); `weighting_note`: the warning
    that the run's `loss.weighting` module has changed since the checkpoint was saved (`weighting_note`),
    for a command that weights tokens with it to print, else None. `progress`: the progress saved with it
    (`Checkpointer.read_progress`), whose identities say what it was trained with (its fixed-DCE reference
    model's, which `eval.evaluate` checks against the reference it loads: `resume.check_same_reference`)."""

    params: dict
    config: Config
    mesh: Mesh
    step: int
    source: str
    weighting_note: str | None = None
    progress: dict[str, Any] | None = None


def restore_params(
    workdir: str | Path,
    step: int | None = None,
    mesh: Mesh | None = None,
    runs_model: bool = True,
    no_checkpoint_hint: str = STEP_0_HINT,
) -> RestoredParams:
    """The trained parameters of checkpoint `step` (default: the newest that verifies against its manifest;
    damaged newer ones are named on stderr) of the run in `workdir`, placed on `mesh` by the default rules
    (default: the config's mesh); the config saved with it as `reading_config` reads it here. Without
    `runs_model` (export, which writes the weights and runs neither attention nor a loss) `reading_config`'s
    note is left out, and the config's `loss.weighting` too (`WITHOUT_LOSS_FUNCTION`: its module need not
    import where a run is exported). `no_checkpoint_hint` ends the message for a run without a checkpoint
    (`checkpoints_dir`).

    Raises:
        FileNotFoundError: no checkpoints directory, no complete checkpoint, or none at `step` (naming the
            steps there are).
        checksums.IntegrityError: checkpoint `step` is damaged, or (no `step`) no checkpoint verifies; the
            message names the files.
        ConfigError: a LoRA checkpoint whose base (`model.path`) is no longer the one it was trained on
            (`adapters.check_same_base`; its note on a checkpoint with the earlier fingerprint: to stderr),
            or a saved config that does not load here (with `runs_model`: a `loss.weighting` whose module
            does not import), naming the checkpoint.
    """
    directory = checkpoints_dir(workdir, no_checkpoint_hint)
    if mesh is None and (config_file := Path(workdir) / CONFIG_FILE).exists():
        # Multi-host start-up (mesh.* or the environment) before JAX's backend starts, which opening the
        # checkpoints does (Orbax asks for the process index); the run's config.yaml names the settings.
        start_distributed(load_config(config_file, **_load_overrides(runs_model=False)))
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=True)
    try:
        if step is not None:
            ckpt.require_verified(step)
        chosen = ckpt.newest_verified() if step is None else step
        if chosen is None and ckpt.all_steps():
            raise IntegrityError(f"no checkpoint in {directory} verifies (see the lines above)")
        if chosen is None:  # no step at all: say so, naming any a resume moved aside as damaged
            raise FileNotFoundError(
                f"{verify_error(directory, [], moved_aside(directory))} {no_checkpoint_hint}"
            )
        source = f"{directory / str(chosen)}"
        saved = f"the config saved with checkpoint {source}"
        saved_dict = ckpt.read_config(chosen)  # raises if the checkpoint is not complete
        cfg = load_config(None, base=saved_dict, base_source=saved, **_load_overrides(runs_model))
        cfg = reading_config(cfg, saved, runs_model)
        progress = ckpt.read_progress(chosen)
        weighting = weighting_fingerprint(cfg.loss.weighting)
        changed = weighting_note(progress.get("weighting"), weighting, source, READ_WITH_OTHER_WEIGHTS)
        mesh = reading_mesh(cfg) if mesh is None else mesh
        lora_cfg = cfg.model.lora
        if lora_cfg is None:
            mcfg = model_setup.model_config(cfg.model)
            abstract = model_setup.abstract_model(mcfg)[1]
            shardings = model_setup.param_shardings(mcfg, mesh)
        else:
            current = adapters.base_identity(cfg.model, cfg.train.seed)
            legacy = lambda: adapters.legacy_fingerprint(cfg.model, cfg.train.seed)
            if note := adapters.check_same_base(progress.get("base"), current, source, legacy):
                print(note, file=sys.stderr)
            mcfg = model_setup.model_config(adapters.base_section(cfg.model))
            adapter_cfg = mcfg.replace(param_dtype=cfg.model.param_dtype)
            abstract, shardings = adapters.adapter_layout(lora_cfg, adapter_cfg, mesh)
        placed = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        params = ckpt.restore_params(chosen, placed)
    finally:
        ckpt.close()
    return RestoredParams(params, cfg, mesh, chosen, source, changed, progress)


def restore_model(
    workdir: str | Path,
    step: int | None = None,
    mesh: Mesh | None = None,
    runs_model: bool = True,
    compute_dtype: RunDtype | None = None,
) -> LoadedModel:
    """The model of checkpoint `step` (default: the newest that verifies) of the run in `workdir`, with the
    config saved with that checkpoint (its attention one that runs here: `reading_config`); a LoRA run's is
    its base as training saw it carrying the adapters, applied apart as training applies them (`_lora_model`;
    `merged_model` merges them). Step 0 is the model the run starts from (`initial_model`): no checkpoint
    holds it, since training saves after a step, and a compare `train: false` variant's directory has only
    that one. Parameters are placed on `mesh` by the default rules (default: the config's mesh). Without
    `runs_model` (export) `reading_config`'s note and the config's `loss.weighting` are left out.

    The model computes in the run's `model.compute_dtype` (bfloat16 unless the run set float32), as training
    did; `compute_dtype` replaces it (in the returned config too), e.g. "float32" to read a bfloat16 run's
    logits without bfloat16's rounding. The parameters are the checkpoint's either way.

    Raises:
        FileNotFoundError / IntegrityError / ConfigError: as `restore_params`, or for step 0 as
            `initial_model`.
        ValueError: a `compute_dtype` other than "float32" or "bfloat16" (before anything is read).
    """
    _check_compute_dtype(compute_dtype)
    if step == 0:
        return initial_model(workdir, mesh, runs_model, compute_dtype)
    restored = restore_params(workdir, step, mesh, runs_model)
    cfg = _with_compute_dtype(restored.config, compute_dtype)
    if cfg.model.lora is None:
        graphdef = model_setup.abstract_model(model_setup.model_config(cfg.model))[0]
        model = nnx.merge(graphdef, restored.params)
    else:
        base = model_setup.load_params(adapters.base_section(cfg.model), restored.mesh, cfg.train.seed)[1]
        model = _lora_model(cfg, base, restored.params)
    return LoadedModel(
        model, cfg, restored.mesh, restored.step, restored.source, restored.weighting_note, restored.progress
    )


def _lora_model(cfg: Config, base: dict, weights: dict) -> CausalLM:
    """The LoRA run `cfg`'s base `base` (as `model_setup.load_params` gives it) as its adapters saw it
    (`adapters.base_as_trained`), carrying the adapters `weights` (`CausalLM.attach_adapters`): every
    forward adds x·(alpha / r)·A·B to the adapted projections apart, in the compute dtype, as training's
    does. Merged into the kernels instead, a small trained update would be rounded away where a bfloat16
    compute dtype reads them (most of it, in a probe), so evaluation would not see the trained model."""
    lora_cfg = cfg.model.lora
    mcfg = model_setup.model_config(adapters.base_section(cfg.model))
    model = nnx.merge(model_setup.abstract_model(mcfg)[0], adapters.base_as_trained(base, lora_cfg))
    model.attach_adapters(weights, lora_cfg.scale)
    return model


def merged_model(model: CausalLM) -> CausalLM:
    """`model` with the adapters it carries (`CausalLM.attach_adapters`; a LoRA run's `restore_model`)
    merged into its kernels, for `export --merged`; `model` itself when it carries none.

    The merged kernels are W + (alpha / r)·A·B in float32 (`lora.merge`), so it computes what the run
    trained to float32 rounding (in a float32 compute dtype) whatever `model.lora.base_dtype`. Its config's
    `param_dtype` is that of the merged kernels (`lora.MERGED_DTYPE`): `save_pretrained` declares it in
    config.json, so transformers' dtype="auto" does not round them back to the base's bfloat16; the other
    parameters keep the base's dtype (widened exactly where loaded as float32)."""
    attached = model.attached_adapters()
    if attached is None:
        return model
    params = lora.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param)), attached.weights, attached.scale)
    with jax.set_mesh(None):  # abstract_model would read the logical axes as axes of a mesh in context
        graphdef = model_setup.abstract_model(model.cfg.replace(param_dtype=lora.MERGED_DTYPE))[0]
    return nnx.merge(graphdef, params)


def initial_model(
    workdir: str | Path,
    mesh: Mesh | None = None,
    runs_model: bool = True,
    compute_dtype: RunDtype | None = None,
) -> LoadedModel:
    """The model the run in `workdir` (its config.yaml) starts training from, as `restore_model` would give a
    checkpoint of step 0: a `model.preset` with its `model.overrides`, randomly initialised from `train.seed`
    as training initialises it, or `model.path` loaded with them; under `model.lora`, the base as the
    adapters see it carrying the initial adapters (`_lora_model`; fresh ones, B = 0, leave its outputs
    unchanged). Parameters are placed on `mesh` by the default rules (default: the config's mesh); the config
    is `saved_config(workdir, runs_model)`'s (JAX's multi-process runtime started only without `mesh`), its
    `model.compute_dtype` replaced by `compute_dtype` when given (`restore_model`).

    Raises:
        FileNotFoundError: `workdir` has no config.yaml.
        ConfigError: `model.path` names nothing loadable, or `model.lora.init_from` no fitting adapter.
        ValueError: a `compute_dtype` other than "float32" or "bfloat16".
    """
    _check_compute_dtype(compute_dtype)
    # A caller's mesh: the devices are its choice, as in `restore_params` (export and effects read on one).
    cfg = _with_compute_dtype(saved_config(workdir, runs_model, start_runtime=mesh is None), compute_dtype)
    mesh = reading_mesh(cfg) if mesh is None else mesh
    lora_cfg, seed = cfg.model.lora, cfg.train.seed
    section = cfg.model if lora_cfg is None else adapters.base_section(cfg.model)
    graphdef, params = model_setup.load_params(section, mesh, seed)
    if lora_cfg is None:
        model = nnx.merge(graphdef, params)
    else:
        adapter_cfg = model_setup.model_config(section).replace(param_dtype=cfg.model.param_dtype)
        abstract, shardings = adapters.adapter_layout(lora_cfg, adapter_cfg, mesh)
        weights = adapters.initial_adapters(lora_cfg, adapter_cfg, abstract, shardings, seed)
        model = _lora_model(cfg, params, weights)
    source = cfg.model.path if cfg.model.preset is None else f"preset {cfg.model.preset}"
    return LoadedModel(model, cfg, mesh, 0, f"{source} untrained (step 0 of {workdir})")
