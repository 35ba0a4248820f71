"""Every YAML file under configs/ loads, validates and fits the hardware its header names (no training).

Found by glob, so a new file is covered without touching this test. The header contract (configs/README.md):
comment lines before the first key that say what the file runs, `Hardware:` naming at least one target of
`HARDWARE` below (the file as written runs there), `Time:` and `Expect:`, and the command that runs it
(`nextquill-jax ... --config <this file>`). `On <target>: add k=v ...` lines name targets that need
overrides. For every target the test resolves the mesh for that many devices, splits the global batch over
the batch axes and micro-batches, checks that the mesh axes divide every parameter of the model (an abstract
mesh: no devices, no compilation) and that the attention implementation runs on that backend. Documented
`train` / `launch.sh` commands load with their overrides; `data prepare --out` is the config's
`train.data_dir`. Paper configs also keep the public code's protocol (NEXTQUILL.md), and configs sharing a
prepared-data directory agree on everything that decides its contents.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, AxisType

from nextquill_jax.bench.sweep import ScalingConfig, load_scaling_config
from nextquill_jax.config import Config, ModelRunConfig, config_to_dict, load_config
from nextquill_jax.demo.run import load_demo_config
from nextquill_jax.eval.compare_file import load_comparison
from nextquill_jax.models.attention import check_attention_backend
from nextquill_jax.models.config import ModelConfig
from nextquill_jax.models.presets import PRESETS
from nextquill_jax.parallel import MESH_AXES, batch_shard_count, resolve_mesh_shape
from nextquill_jax.train.model_setup import param_shardings

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))

# Target name: (JAX devices, processes, backend). TPU v4 and v5p run the two TensorCores of a chip as one
# (megacore) JAX device, and their slice names count TensorCores: v4-32 and v5p-32 are 16 chips = 16 devices
# on 4 hosts of 4 chips (a v4-32 lists process_index 0-3 with 4 devices each; the Cloud TPU v5p table gives
# 2x2x2 = 16 cores, 8 chips, 2 VMs and 2x4x4 = 64 cores, 32 chips, 8 VMs).
HARDWARE: dict[str, tuple[int, int, str]] = {
    "CPU": (1, 1, "cpu"),
    "1xGPU": (1, 1, "gpu"),
    "1xH100": (1, 1, "gpu"),
    "8xH100": (8, 1, "gpu"),
    "v4-8": (4, 1, "tpu"),
    "v4-32": (16, 4, "tpu"),
    "v5p-8": (4, 1, "tpu"),
    "v5p-32": (16, 4, "tpu"),
    "v5p-64": (32, 8, "tpu"),
    "v5p-128": (64, 16, "tpu"),
}
_TARGET_RE = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(n) for n in sorted(HARDWARE, key=len, reverse=True)) + r")(?![\w-])",
    re.IGNORECASE,
)
_CANONICAL = {n.lower(): n for n in HARDWARE}


@dataclass
class Header:
    """What a config file's leading comment block says."""

    lines: list[str]  # comment text, '#' and surrounding spaces removed, continuations ('\') joined
    fields: dict[str, str]  # "Hardware" / "Time" / "Expect" -> the text after the label on its line
    targets: list[str]  # HARDWARE names on the Hardware line: the file runs there as written
    on: dict[str, list[str]] = field(default_factory=dict)  # target -> overrides it needs
    commands: list[list[str]] = field(default_factory=list)  # shell words of each documented command


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def read_header(path: Path) -> Header:
    """Parse the comment lines before the first YAML content line of `path`."""
    raw: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        raw.append(stripped.lstrip("#").strip())
    lines: list[str] = []
    for text in raw:
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1].rstrip() + " " + text
        else:
            lines.append(text)
    fields: dict[str, str] = {}
    for text in lines:
        for label in ("Hardware", "Time", "Expect"):
            m = re.search(rf"(?:^|\s){label}:\s*(.*)", text)
            if m and label not in fields:
                fields[label] = m.group(1).strip()
    targets = [_CANONICAL[m.lower()] for m in _TARGET_RE.findall(fields.get("Hardware", ""))]
    header = Header(lines=lines, fields=fields, targets=list(dict.fromkeys(targets)))
    for text in lines:
        m = re.match(r"On (\S+): add (.+)$", text)
        if m:
            assert m.group(1) in HARDWARE, (
                f"{rel(path)}: 'On {m.group(1)}:' names no known target; known: {sorted(HARDWARE)} "
                f"(add a new one to HARDWARE in tests/test_configs.py with its device and host counts)"
            )
            header.on[m.group(1)] = m.group(2).split()
        start = text.find("nextquill-jax ")
        if start >= 0 and text[start:].split()[1:2] in (
            ["train"],
            ["data"],
            ["bench"],
            ["demo"],
            ["compare"],
        ):
            header.commands.append(shlex.split(text[start:]))
        elif "tpu_scripts/launch.sh" in text:
            header.commands.append(shlex.split(text))
    return header


def parse_command(words: list[str]) -> tuple[str, dict[str, str], list[str]]:
    """(kind, options, overrides) of a documented command: kind is 'train', 'data prepare', 'bench scale',
    'data <other>' or 'launch'; options hold --config/--workdir/--out (for launch: CONFIG, WORKDIR)."""
    if words[0] == "nextquill-jax":
        kind = " ".join(words[1:3]) if words[1] in ("data", "bench") else words[1]
        rest = words[3:] if words[1] in ("data", "bench") else words[2:]
        options, overrides, i = {}, [], 0
        while i < len(rest):
            if rest[i].startswith("--"):
                options[rest[i]] = rest[i + 1]
                i += 2
            else:
                overrides.append(rest[i])
                i += 1
        return kind, options, overrides
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("tpu_scripts/"))
    return "launch", {"--config": env.get("CONFIG", "")}, env.get("TRAIN_ARGS", "").split()


def architecture(section: ModelRunConfig) -> ModelConfig:
    """The model's architecture: its preset, or the preset its folder / packaged name is named after."""
    section = section.resolved(1)  # `cudnn_max_segments: auto` (cuDNN's default) shapes no parameter
    if section.preset is not None:
        return section.model_config()
    name = Path(section.path).name.lower()
    assert name in PRESETS, (
        f"model.path {section.path!r}: the test reads the architecture from the preset of the same name, and "
        f"there is none; name the folder after one of {sorted(PRESETS)} or add a preset to models/presets.py"
    )
    runtime = section.runtime()
    return ModelRunConfig(preset=name, overrides=section.overrides, **runtime).model_config()


def check_fits(
    sizes: dict[str, int],
    micro_batches: int,
    rows_per_process: int | None,
    model: ModelConfig,
    attention_impl: str,
    target: str,
    where: str,
) -> None:
    """Raise AssertionError (naming `where` and `target`) unless the mesh, batch split and model fit."""
    devices, hosts, backend = HARDWARE[target]
    try:
        shape = resolve_mesh_shape(sizes, devices)
    except ValueError as e:
        raise AssertionError(f"{where} on {target} ({devices} devices): {e}") from None
    mesh = AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if rows_per_process is not None:
        rows, shards = rows_per_process * hosts, batch_shard_count(mesh)
        assert rows % shards == 0 and (rows // shards) % micro_batches == 0, (
            f"{where} on {target}: a global batch of {rows} rows ({rows_per_process} per host x {hosts} "
            f"hosts) does not split into {shards} batch shards x {micro_batches} micro-batches"
        )
    try:
        param_shardings(model, mesh)
        check_attention_backend(attention_impl, backend)
    except ValueError as e:
        raise AssertionError(f"{where} on {target} (mesh {dict(mesh.shape)}): {e}") from None


def targets_with_overrides(header: Header) -> list[tuple[str, list[str]]]:
    """(target, overrides) pairs: each Hardware-line target as written, then each `On <target>: add` line."""
    return [(t, []) for t in header.targets] + list(header.on.items())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=rel)
def test_header_says_how_to_run_on_what_and_what_to_expect(path):
    header = read_header(path)
    assert sum(1 for line in header.lines if line) >= 3, f"{rel(path)}: no comment block before the first key"
    for label in ("Hardware", "Time", "Expect"):
        assert header.fields.get(label), f"{rel(path)}: the header has no non-empty `{label}:` line"
    assert header.targets, (
        f"{rel(path)}: the Hardware line names no known target ({sorted(HARDWARE)}); "
        f"got {header.fields['Hardware']!r}"
    )
    named = {parse_command(words)[1].get("--config") for words in header.commands} - {None}
    assert named == {rel(path)}, (
        f"{rel(path)}: the header's commands name --config {sorted(named)}; they must show how to run this "
        f"file, `--config {rel(path)}` (a moved or copied file must update them)"
    )


@pytest.mark.parametrize("path", CONFIG_FILES, ids=rel)
def test_config_loads_and_fits_its_hardware(path):
    header = read_header(path)
    if "scaling" in path.relative_to(CONFIG_DIR).parts:
        _check_scaling(path, header)
        return
    if path.name.startswith("demo"):
        _check_demo(path, header)
        return
    if "study" in path.relative_to(CONFIG_DIR).parts:
        _check_compare(path, header)
        return
    cfg = load_config(path)
    for words in header.commands:
        kind, options, overrides = parse_command(words)
        if options.get("--config") != rel(path):
            continue
        if kind in ("train", "launch"):
            load_config(path, overrides)
        elif kind == "data prepare" and cfg.train.data_dir is not None:
            assert options.get("--out") == cfg.train.data_dir, (
                f"{rel(path)}: the header prepares data into {options.get('--out')} but train.data_dir is "
                f"{cfg.train.data_dir}: the run would prepare it again"
            )
    for target, overrides in targets_with_overrides(header):
        c = load_config(path, overrides)
        check_fits(
            c.mesh.sizes(),
            c.train.micro_batches,
            c.data.batching.rows_per_batch,
            architecture(c.model),
            c.model.attention_impl,
            target,
            f"{rel(path)} {' '.join(overrides)}".strip(),
        )


def _check_demo(path: Path, header: Header) -> None:
    """Demo files hold a plan and two training configs (`pretrain`, `finetune`); every variant's config must
    load and fit the CPU the demo runs on."""
    demo = load_demo_config(path)
    assert demo.plan.variants, f"{rel(path)}: no variants"
    for target, overrides in targets_with_overrides(header):
        assert not overrides, f"{rel(path)}: demo files take no overrides ('On {target}:')"
        for name, c in [("pretrain", demo.pretrain)] + [
            (v, demo.variant_config(v)) for v in demo.plan.variants
        ]:
            assert c.loss.variant == name or name == "pretrain", (
                f"{rel(path)}: variant {name} runs {c.loss.variant}"
            )
            check_fits(
                c.mesh.sizes(),
                c.train.micro_batches,
                c.data.batching.rows_per_batch,
                c.model.model_config() if c.model.preset is not None else demo.pretrain.model.model_config(),
                c.model.attention_impl,
                target,
                f"{rel(path)} [{name}]",
            )


def _check_compare(path: Path, header: Header) -> None:
    """Compare files (configs/study/) hold a base config and variants: every variant's config must load and
    fit the hardware the file names."""
    comparison = load_comparison(path)
    for target, overrides in targets_with_overrides(header):
        assert not overrides, f"{rel(path)}: compare files take no overrides ('On {target}:')"
        for name in comparison.variants:
            c = comparison.run_config(name, comparison.compare.seeds[0])
            check_fits(
                c.mesh.sizes(),
                c.train.micro_batches,
                c.data.batching.rows_per_batch,
                architecture(c.model),
                c.model.attention_impl,
                target,
                f"{rel(path)} [{name}]",
            )


def _check_scaling(path: Path, header: Header) -> None:
    sweep: ScalingConfig = load_scaling_config(path)
    for target, overrides in targets_with_overrides(header):
        assert not overrides, f"{rel(path)}: sweep files take no overrides ('On {target}:')"
        devices = HARDWARE[target][0]
        fitting = []
        for sizes in sweep.mesh:
            try:
                resolve_mesh_shape(sizes, devices)
                fitting.append(sizes)
            except ValueError:
                continue  # the sweep skips shapes that do not fit the devices present, by design
        assert fitting, f"{rel(path)}: no mesh of {sweep.mesh} fits {target} ({devices} devices)"
        for model in sweep.models:
            for sizes in fitting:
                check_fits(
                    sizes,
                    sweep.micro_batches,
                    None,
                    sweep.model_config(model),
                    sweep.attention_impl,
                    target,
                    f"{rel(path)} model {model.name}",
                )


# configs/paper/<name>_fast.yaml: the twin of <name>.yaml with the project's own choices (not the protocol).
FAST_FILES = [p for p in CONFIG_FILES if p.parent.name == "paper" and p.stem.endswith("_fast")]
PAPER_FILES = [p for p in CONFIG_FILES if p.parent.name == "paper" and p not in FAST_FILES]


@pytest.mark.parametrize("path", PAPER_FILES, ids=rel)
def test_paper_configs_keep_the_public_protocol(path):
    """NEXTQUILL.md, "The public code's protocol": AdamW lr 5e-6, weight decay 0.025, warm-up 1%, linear
    decay, 5 epochs, 16 examples per update drawn at random, clipping 1.0, seed 42, bf16; 8 history entries
    (at least one kept, prompts cut at 2048 tokens), targets of 2048 tokens; the mean of per-example means;
    α 0.1 (0.01 for the mce ablation), δ 0.05, λ 0.9, ε 0.1, unweighted L_p, dynamic DCE."""
    header = read_header(path)
    assert load_config(path, ["loss.variant=mce"]).loss.alpha == 0.01, f"{rel(path)}: mce takes α 0.01"
    for target, overrides in targets_with_overrides(header):
        c: Config = load_config(path, overrides)
        hosts = HARDWARE[target][1]
        b, o, d, loss = c.data.batching, c.optim, c.data, c.loss
        where = f"{rel(path)} on {target}"
        assert b.mode == "random" and b.rows_per_batch * hosts == 16, f"{where}: not 16 random examples"
        assert (loss.normalize, d.history_fit) == ("example", "public"), where
        assert (b.num_epochs, c.train.max_steps, c.train.seed, b.seed) == (5, None, 42, 42), where
        assert (o.learning_rate, o.weight_decay, o.warmup_ratio, o.warmup_steps) == (
            5e-6,
            0.025,
            0.01,
            None,
        ), where
        assert (o.schedule, o.min_lr_ratio, o.clip_norm) == ("linear", 0.0, 1.0), where
        assert (c.model.compute_dtype, c.model.param_dtype) == ("bfloat16", "float32"), where
        assert (d.max_history, d.max_prompt_tokens, d.max_target_tokens) == (8, 2048, 2048), where
        assert b.seq_len_with >= d.max_prompt_tokens + d.max_target_tokens + 1, (
            f"{where}: the longest example does not fit"
        )
        assert (loss.variant, loss.alpha, loss.threshold, loss.high, loss.low) == (
            "nextquill",
            0.1,
            0.05,
            0.9,
            0.1,
        )
        assert (loss.weight_alignment, loss.dce) == (False, "dynamic"), where


@pytest.mark.parametrize("path", FAST_FILES, ids=rel)
def test_a_fast_twin_differs_from_its_paper_config_only_in_the_keys_its_header_names(path):
    twin = path.with_name(path.name.replace("_fast.yaml", ".yaml"))
    assert twin in PAPER_FILES, f"{rel(path)}: no paper config {rel(twin)} to be the twin of"

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fast, paper = flat(config_to_dict(load_config(path))), flat(config_to_dict(load_config(twin)))
    differ = {k for k in paper if fast[k] != paper[k]} - {"train.workdir"}
    assert differ == {"data.batching.mode", "loss.normalize"}, (rel(path), sorted(differ))
    header = " ".join(read_header(path).lines)
    for key in differ:
        assert key in header, f"{rel(path)}: the header does not say what `{key}` changes"


def test_configs_sharing_prepared_data_agree_on_its_contents():
    """Two runs with one `train.data_dir` must prepare identical data, or the second re-prepares (and
    replaces) the first's; batching is free to differ."""
    by_dir: dict[str, list[tuple[str, dict]]] = {}
    for path in CONFIG_FILES:
        parts = path.relative_to(CONFIG_DIR).parts
        if "scaling" in parts or "study" in parts or path.name.startswith("demo"):
            continue
        cfg = load_config(path)
        if cfg.train.data_dir is not None:
            by_dir.setdefault(cfg.train.data_dir, []).append((rel(path), cfg.data.fingerprint_fields()))
    assert by_dir, "no config sets train.data_dir"
    for data_dir, users in by_dir.items():
        first_name, first = users[0]
        for name, fields in users[1:]:
            differ = sorted(k for k in first if first[k] != fields[k])
            assert not differ, f"{name} and {first_name} share {data_dir} but differ in data.{differ}"
