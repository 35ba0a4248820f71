"""The offline demo (`nextquill-jax demo`): NextQuill end to end on a CPU.

    1. data       the synthetic personalised-review benchmark (`data.sources.synth`): each user's signature
                  words, favourite aspects and sign-off are visible only through their past reviews, and every
                  target token's role (preference / context / noise) is known.
    2. tokenizer  a byte-level BPE trained here on the training split (`demo.tokenizer`), so a tiny model
                  has a vocabulary of ~1,300 tokens instead of Qwen's 151,936.
    3. base       a tiny Qwen2-family model trained from scratch as a plain language model on the training
                  users' reviews (each user's reviews, oldest first, as one document), then exported as a
                  Hugging Face directory. Like the paper's pretrained base, it knows the language and has
                  learnt to reuse what a document said before, but has never seen a prompt, a history block or
                  a personalisation objective. Every variant starts from it, so they differ only in the loss.
    4. variants   `sft`, `context_sft`, `nextquill` (and `mce`, `dce` in the full run) fine-tune the base for
                  the same number of steps on the same batches: a comparison (`eval.compare`, the code of
                  `nextquill-jax compare`) whose variants differ only in `loss.variant`, each run through
                  `train`, `evaluate` (greedy, repetition penalty 1.2; the without-history prompt for sft)
                  and an effect report (per-token DCE, its AUROC against the ground-truth preference tokens).
    5. table      the comparison's table with each variant's difference to the baseline (context_sft) and its
                  paired bootstrap 95% interval; the reading says "no significant difference" wherever the
                  interval covers 0. results.md / results.json / training_curves.png (`demo.report`), and the
                  real-model study's recorded table (benchmarks/STUDY.md) beside it.

What runs is a demo config (configs/demo.yaml; --quick: configs/demo_quick.yaml): a `demo` section (sizes,
variants) and two training configs, `pretrain` (the base) and `finetune` (the comparison's base config;
`loss.variant` is set per variant). The paths in them are set from --out; the seed sets the data, the
initialisation and the data order. Everything the demo writes lives in --out (variant runs in
`<out>/seed<S>/<variant>`), and its runs there are replaced on every start. So one demo at a time owns --out:
it holds `<out>/demo.lock` (`LOCK`, `train.workdir_lock`) from before it deletes or writes anything there
until it ends, and a second demo on the same --out is refused at once instead of deleting the running one's
runs. The demo is a single-process command (it generates and prepares its data without the coordination
`train` gives a multi-process run), so it takes the lock as process 0.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextquill_jax.atomic_file import write_text_atomic
from nextquill_jax.config import Config
from nextquill_jax.config_paths import absolute_data_paths
from nextquill_jax.config_schema import ConfigError, build, read_yaml, with_line
from nextquill_jax.eval.compare_file import CompareConfig, Comparison, VariantConfig
from nextquill_jax.train.workdir_lock import LockUse, WorkdirLock

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_OUT = Path("demo_out")
VARIANTS = ("sft", "context_sft", "mce", "dce", "js", "nextquill")
SECTIONS = ("demo", "pretrain", "finetune")
# The lock on --out. The runs below it take their own (`train.lock` in each run's workdir), another file.
LOCK = LockUse(
    command="demo",
    file_name="demo.lock",
    clash="a second demo there would delete the running one's runs (every demo starts its runs over)",
    on_stop="the demo starts over when run again",
    elsewhere="use another --out",
    unlocked="running the demo without the --out lock",
)


@dataclass(frozen=True)
class DemoPlan:
    """The `demo` section: what to generate, which variants to train and how to evaluate them.

    Fields:
        users: synthetic users (each gives 4 training, 1 validation and 1 test example).
        variants: loss variants to fine-tune, in table order.
        split: the prepared split that is generated for and scored.
        eval_examples: the split's first N examples are generated and scored.
        eval_batch_size: prompts decoded together.
        max_new_tokens: generation limit (the synthetic reviews are at most ~90 tokens).
        effect_examples: examples of the split in each effect report (the DCE AUROC is over their tokens).
        baseline: the variant every other one is compared with (paired bootstrap intervals).
        resamples: bootstrap resamples of each interval.
    """

    users: int = 400
    variants: tuple[str, ...] = ("sft", "context_sft", "nextquill")
    split: str = "test"
    eval_examples: int = 200
    eval_batch_size: int = 40
    max_new_tokens: int = 96
    effect_examples: int = 32
    baseline: str = "context_sft"
    resamples: int = 2000

    def __post_init__(self) -> None:
        for name in ("users", "eval_examples", "eval_batch_size", "max_new_tokens", "effect_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"demo.{name} must be an integer >= 1, got {value!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(
                f"demo.variants must be distinct names from {list(VARIANTS)}, got {list(self.variants)}"
            )
        if self.baseline not in self.variants:
            raise ValueError(
                f"demo.baseline {self.baseline!r} must be one of demo.variants {list(self.variants)}"
            )


@dataclass(frozen=True)
class DemoConfig:
    """A loaded demo config: the plan, the base's training config, and the variants' base config as a mapping
    (`finetune`, validated as `finetune_config`), with the run paths and seed set."""

    plan: DemoPlan
    pretrain: Config
    finetune: dict[str, Any]
    finetune_config: Config
    out_dir: Path
    seed: int
    source: str = field(default="<config>")

    def comparison(self) -> Comparison:
        """The variants as a comparison: `loss.variant` set per variant, runs in `<out>/seed<seed>/<variant>`,
        every difference to `plan.baseline` with a paired bootstrap interval."""
        plan = self.plan
        compare = CompareConfig(
            out=str(self.out_dir),
            baseline=plan.baseline,
            split=plan.split,
            max_examples=plan.eval_examples,
            eval_batch_size=plan.eval_batch_size,
            effect_examples=plan.effect_examples,
            max_new_tokens=plan.max_new_tokens,
            seeds=[self.seed],
            resamples=plan.resamples,
        )
        variants = {v: VariantConfig(overrides=[f"loss.variant={v}"]) for v in plan.variants}
        return Comparison(compare, variants, self.finetune, self.source)

    def variant_config(self, variant: str) -> Config:
        """The fine-tuning config of one variant."""
        return self.comparison().run_config(variant, self.seed)


def default_config(quick: bool) -> Path:
    """configs/demo.yaml or configs/demo_quick.yaml of the source tree."""
    return CONFIG_DIR / ("demo_quick.yaml" if quick else "demo.yaml")


def load_demo_config(path: str | Path, out_dir: str | Path = DEFAULT_OUT, seed: int = 0) -> DemoConfig:
    """Read and validate a demo config, with its paths under `out_dir` and its seeds set to `seed`.

    The demo sets, in both training configs: `data.tokenizer` (`<out>/tokenizer`), `train.seed` and
    `data.batching.seed` (`seed`); in `pretrain`: `data.sources` (`<out>/data/pretrain.jsonl`),
    `train.data_dir` (`<out>/prepared_base`), `train.workdir` (`<out>/runs/base`); in `finetune`:
    `data.sources` (`<out>/data/synthetic.jsonl`), `train.data_dir` (`<out>/prepared`), `model.path`
    (`<out>/base`, the exported base).

    Raises:
        FileNotFoundError: `path` does not exist.
        ConfigError: invalid YAML, a missing or unknown section or key, or an invalid value (naming it); a
            `pretrain` model that is not a preset; a tokenizer vocabulary the model cannot hold. An error
            about a key the file writes names its line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"demo config {path} not found. Fix: run from a clone of the repository (configs/ beside the "
            f"package) or pass --config FILE"
        )
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict) or sorted(raw) != sorted(SECTIONS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{source}: a demo config has exactly the sections {list(SECTIONS)}, found {found}")
    try:
        return _demo_config(raw, Path(out_dir), seed, source)
    except ConfigError as e:
        raise with_line(e, path) from None


def _demo_config(raw: dict, out: Path, seed: int, source: str) -> DemoConfig:
    """`load_demo_config`'s sections built, from the file's mapping `raw` (read from `source`)."""
    plan = build(DemoPlan, raw["demo"], "demo", source)
    common = {
        ("data", "tokenizer"): str(out / "tokenizer"),
        ("train", "seed"): seed,
        ("data", "batching", "seed"): seed,
    }
    pretrain_paths = {
        ("data", "sources"): [str(out / "data" / "pretrain.jsonl")],
        ("train", "data_dir"): str(out / "prepared_base"),
        ("train", "workdir"): str(out / "runs" / "base"),
    }
    finetune_paths = {
        ("data", "sources"): [str(out / "data" / "synthetic.jsonl")],
        ("train", "data_dir"): str(out / "prepared"),
        ("model", "path"): str(out / "base"),
    }
    pretrain = build(Config, _with_values(raw["pretrain"], {**common, **pretrain_paths}), "pretrain", source)
    finetune = _with_values(raw["finetune"], {**common, **finetune_paths})
    finetune_config = build(Config, finetune, "finetune", source)
    if pretrain.model.preset is None:
        raise ConfigError(f"{source}: `pretrain.model` must name a preset (the base is trained from scratch)")
    return DemoConfig(plan, pretrain, finetune, finetune_config, out, seed, source)


def _with_values(section: Any, values: dict[tuple[str, ...], Any]) -> dict:
    """A copy of a training-config mapping with the values at the given key paths set."""
    out = copy.deepcopy(section) if isinstance(section, dict) else {}  # any YAML value, dates too
    for keys, value in values.items():
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


def write_pretrain_documents(records_path: str | Path, out_path: str | Path) -> int:
    """Write the base model's corpus: per user, every review up to the last training target (never a
    validation or test target), oldest first, as one generic record whose first review is its history and
    whose target is the others joined by newlines (the `sft` loss on it is plain language modelling of the
    document). Returns the number of documents.

    Raises:
        ValueError: no training record in `records_path`.
    """
    last: dict[str, dict] = {}
    with open(records_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "train":
                last[record["user_id"]] = record  # records are in time order per user
    if not last:
        raise ValueError(f"{records_path} has no training records to build the pre-training corpus from")
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        for user_id, record in last.items():
            texts = [h["text"] for h in record["history"]] + [record["target"]]
            doc = {
                "user_id": user_id,
                "context": {},
                "history": texts[:1],
                "target": "\n".join(texts[1:]),
                "split": "train",
            }
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return len(last)


class _Clock:
    """Wall time of each named stage, echoed as it ends."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo, self.seconds, self.start = echo, {}, time.perf_counter()

    def stamped(self, message: str) -> None:
        """`message` prefixed with the seconds since the start."""
        self.echo(f"[{time.perf_counter() - self.start:5.0f} s] {message}")

    def stage(self, name: str, started: float) -> None:
        """Record and show the seconds since `started` as stage `name`'s time."""
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.stamped(f"{name}: {self.seconds[name]:.1f} s")


def run_demo(
    cfg: DemoConfig, *, echo: Callable[[str], None] = print, on_locked: Callable[[], object] | None = None
) -> dict[str, Any]:
    """Run the demo `cfg` describes (module docstring) and return the contents of results.json: the
    comparison's (`compare_table.write_results`) with the demo's reading, files and stage times.

    Holds `<out>/demo.lock` (`LOCK`) from before anything in `cfg.out_dir` is deleted or written until it
    returns or raises. `on_locked` (the CLI's: it opens the third-party log in --out) is called once the lock
    is held, and not at all when it is refused.

    Raises:
        WorkdirLockedError: another demo is running in `cfg.out_dir` (nothing there is changed).
        ConfigError: a configuration problem found while setting up a run.
        TrainingDivergedError: a run's loss became non-finite.
        TrainingStoppedError: a run's training stopped on SIGTERM or Ctrl-C.
    """
    lock = WorkdirLock(cfg.out_dir, LOCK)
    lock.acquire(0, echo)
    try:
        if on_locked is not None:
            on_locked()
        return _run_demo(cfg, echo)
    finally:
        lock.release()


def _run_demo(cfg: DemoConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    """`run_demo`'s stages, once it holds the lock on --out."""
    from nextquill_jax.data.prepare import prepare
    from nextquill_jax.data.sources.synth import generate_synthetic
    from nextquill_jax.demo.report import plot_training_curves, reading, study_table
    from nextquill_jax.demo.tokenizer import record_texts, train_tokenizer
    from nextquill_jax.eval.compare import run_variant
    from nextquill_jax.eval.compare_table import markdown, write_results
    from nextquill_jax.train.export import export
    from nextquill_jax.train.loop import train_to_the_end
    from nextquill_jax.train.metrics_log import strict_json

    plan, out = cfg.plan, cfg.out_dir
    clock = _Clock(echo)
    echo = clock.stamped
    comparison = cfg.comparison()
    runs = {v: comparison.workdir(v, cfg.seed) for v in plan.variants}
    for run in (out / "runs" / "base", *runs.values()):  # the demo's own earlier runs: they would resume
        shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(out / "base", ignore_errors=True)

    t = time.perf_counter()
    data_dir = out / "data"
    manifest = generate_synthetic(data_dir, users=plan.users, seed=cfg.seed)
    documents = write_pretrain_documents(data_dir / "synthetic.jsonl", data_dir / "pretrain.jsonl")
    counts = manifest["records"]  # per split
    splits = ", ".join(f"{split} {n}" for split, n in counts.items())
    total = sum(counts.values())
    echo(f"synthetic benchmark: {total} records ({splits}); {documents} pre-training documents")
    clock.stage("data", t)

    t = time.perf_counter()
    model_cfg = cfg.pretrain.model.resolved(1).model_config()  # the vocabulary does not depend on M
    vocab = model_cfg.vocab_size
    ft_data = cfg.finetune_config.data
    texts = record_texts(data_dir / "synthetic.jsonl", ft_data.template, max_history=ft_data.max_history)
    tokenizer = train_tokenizer(texts, out / "tokenizer", vocab_size=vocab)
    eos_ids = model_cfg.eos_token_ids
    if tokenizer.eos_token_id not in eos_ids:
        raise ConfigError(
            f"{cfg.source}: pretrain.model.overrides.eos_token_ids {list(eos_ids)} must hold the demo "
            f"tokenizer's EOS id {tokenizer.eos_token_id}"
        )
    echo(f"tokenizer: {len(tokenizer)} tokens (model vocabulary {vocab}) -> {out / 'tokenizer'}")
    # Recorded absolute in summary.json, as `data prepare` and `train` record them: an --out given relative
    # would otherwise name the tokenizer and sources relative to this directory only.
    for data, prepared_dir in (
        (cfg.pretrain.data, cfg.pretrain.train.data_dir),
        (ft_data, cfg.finetune_config.train.data_dir),
    ):
        prepare(absolute_data_paths(data, Path.cwd()), prepared_dir, tokenizer=tokenizer, echo=echo)
    clock.stage("tokenizer and prepared data", t)

    t = time.perf_counter()
    base = train_to_the_end(cfg.pretrain, out / "runs" / "base", echo=echo)
    export(out / "runs" / "base", out / "base")
    echo(f"base model: {base.step} steps of language modelling -> {out / 'base'}")
    clock.stage("base pre-training", t)

    records = []
    for variant in plan.variants:
        t = time.perf_counter()
        records.append(run_variant(comparison, variant, cfg.seed, echo))
        clock.stage(f"{variant}: training, evaluation and effect report", t)

    result = write_results(comparison, records)
    plot_training_curves(runs, out / "training_curves.png", base=out / "runs" / "base")
    effect_variant = "nextquill" if "nextquill" in plan.variants else plan.variants[-1]
    results = {
        **result,
        "date": time.strftime("%Y-%m-%d"),
        "seed": cfg.seed,
        "plan": {**dataclasses.asdict(plan), "variants": list(plan.variants)},
        "reading": reading(result),
        "effect_report": str((runs[effect_variant] / "effects" / "index.html").absolute()),
        "training_curves": str((out / "training_curves.png").absolute()),
        "seconds": {**clock.seconds, "total": round(time.perf_counter() - clock.start, 1)},
    }
    write_text_atomic(out / "results.json", strict_json(results))
    write_text_atomic(out / "results.md", _results_markdown(results, markdown(result), study_table()))
    return results


def _results_markdown(results: dict[str, Any], table: str, study: str) -> str:
    plan = results["plan"]
    return (
        f"# NextQuill demo ({results['date']}, seed {results['seed']}, {results['config']})\n\n"
        f"{table}\n"
        f"The first {plan['eval_examples']} {results['split']} examples; greedy decoding, repetition "
        f"penalty 1.2. pref. recall: share of the user's signature words in the generation. pref. NLL: "
        f"teacher-forced NLL of the ground-truth preference tokens with the history (first "
        f"{plan['effect_examples']} examples). DCE AUROC: how well DCE separates the preference tokens from "
        f"context and noise tokens (0.5 = chance).\n\n"
        f"Reading: {results['reading']}\n\n"
        f"Effect report: {results['effect_report']}\n"
        f"Training curves: {results['training_curves']}\n\n"
        f"{study}"
    )
