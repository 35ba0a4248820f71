"""Test-suite settings (CPU only, quiet logs) and the fixtures that tests in several folders share:

- `tiny_tokenizer`, `save_tiny_tokenizer`: a tiny fast tokenizer trained on the fixture text;
- `small_dpl`: DPL thresholds small enough for the tiny Amazon fixtures;
- `write_random_data`, `tiny_config`, `write_config`: tiny prepared data and a tiny training config;
- `tiny_hf_config`: the tiny transformers config (Llama, Qwen2, Qwen3) the model tests build checkpoints from;
- `tiny_model_config`: our ModelConfig at test size, for tests that need no checkpoint;
- `compilations`: the executables compiled (or read from the compilation cache) while a test runs;
- `trained_run`: one tiny run trained once per session (records -> prepare -> 2 steps -> export), which the
  evaluation, effect-report and README export-check tests read;
- `programs`: runs the programs under tests/programs in a fresh Python with N simulated CPU devices (the
  device count is fixed when JAX starts, so multi-device and multi-process runs are subprocesses instead of
  setting XLA_FLAGS for the whole suite).

Constants that `@pytest.mark.parametrize` or module-level tables need are in tests/shared.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.shared import FIXTURES, MARKED_TARGET, TINY_EOS_ID, TINY_HF, TINY_QWEN

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Compilation dominates the suite on CPU. XLA's backend optimisation level 0 compiles faster (~3x: first
# written at 875d5df, measurement not recorded) and cut the suite's CPU time by a quarter (28 -> 21
# CPU-minutes on the 2-core VM, 2026-12-01, a fresh clone of 04f1d37). Every value is
# still compared with a reference, or with another run under the same flags; the cost-analysis and memory
# tests pass under it too.
# Turning XLA's CPU fusion emitters off cut compilation by about a third again (four training test files,
# run alone: 150 -> 102 CPU-s; one accumulation step 8.4 -> 2.5 CPU-s; 2026-12-01, 2-core VM). The same
# holds for every value as above.
# A user's own XLA_FLAGS take precedence.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).resolve().parent / "programs"


def readme_python_block(after: str) -> str:
    """The README's first ```python block after the text `after`: a snippet the tests run as written."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme[readme.index(after) :], re.S).group(1)


def as_saved_with(workdir, section: str = "model", **keys) -> None:
    """Rewrite the `keys` of `section` in `workdir`'s config.yaml and in its checkpoint 2's saved config
    (re-hashed in its manifest): the files a run with those settings (e.g. on a GPU) writes."""
    import yaml

    from nextquill_jax.train.checkpoint import MANIFEST, write_manifest

    config_file = workdir / "config.yaml"
    cfg = yaml.safe_load(config_file.read_text())
    cfg[section].update(keys)
    config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    saved = workdir / "checkpoints" / "2" / "config" / "metadata"
    cfg = json.loads(saved.read_text())
    cfg[section].update(keys)
    saved.write_text(json.dumps(cfg))
    (saved.parents[1] / MANIFEST).unlink()  # else listed in the new one
    write_manifest(saved.parents[1])


def pytest_configure(config: pytest.Config) -> None:
    """SIGINT back to Python's handler where the suite was started with it ignored: a shell that starts a
    command in the background without job control (`nohup`, `cmd &` in a script) hands it SIGINT ignored,
    which `train` and `compare` rightly leave ignored, and the Ctrl-C tests would then see no Ctrl-C. Runs in
    each xdist worker too (they inherit the ignored signal)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files marked `slow` first (a stable sort, so the order within each group stays): with several xdist
    workers taking whole files in this order, the long fixtures start early instead of finishing last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> Path:
    """JAX's persistent compilation cache, in a directory every xdist worker of this session shares.

    Many tests train the same tiny config; compiling its steps dominates them on CPU (the suite ran in 17 min
    without the cache, 13 with it, on 2 cores). An executable read back from the cache is the one XLA compiled
    for the same program and flags, so no result changes. Source locations are not part of the key (they hold
    the calling test's frames, so no test would reuse another's): a program's HLO may name the frames of the
    test that compiled it first, below the same library frames. A test that counts compilations counts cache
    hits too (`compilations` below). Every executable is cached, however fast it compiled (JAX's default
    leaves out those under 1 s; 0.5 s here until 2026-12-02): five training and evaluation files took 5%
    less CPU that way (2 workers on 2 cores, two runs each: 230 and 221 against 217 and 209 user CPU-s)."""
    import jax

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    jax.config.update("jax_compilation_cache_dir", str(shared / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return shared / "jax_cache"


@pytest.fixture
def compilations():
    """Count the executables obtained while the test runs: XLA backend compilations, and executables read
    from the persistent compilation cache instead (`compilation_cache` above). Set-up errors are checked to
    come before anything is compiled with it."""
    import jax

    events: list[str] = []

    def on_duration(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    def on_event(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    yield events
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)


# ------------------------------------------------------------------------------------------------------------
# The tiny tokenizer.

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def _tiny_tokenizer(vocab_size: int = 700):
    """A PreTrainedTokenizerFast trained on every text file under tests/fixtures (cached per vocab size).

    Byte-level BPE (any text round-trips) with the ChatML special tokens, `<|endoftext|>` as EOS and a ChatML
    chat template, so the data code runs exactly as with Qwen's tokenizer but in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(FIXTURES.rglob("*.json*"))]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def _save_tiny_tokenizer(out_dir: Path, vocab_size: int = 700) -> Path:
    """Save `tiny_tokenizer(vocab_size)` as a Hugging Face directory and return it."""
    _tiny_tokenizer(vocab_size).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """`tiny_tokenizer(vocab_size=700)`: the tiny tokenizer (one object per vocabulary size)."""
    return _tiny_tokenizer


@pytest.fixture(scope="session")
def save_tiny_tokenizer():
    """`save_tiny_tokenizer(out_dir, vocab_size=700)`: the tiny tokenizer saved to `out_dir`; returns it."""
    return _save_tiny_tokenizer


@pytest.fixture(scope="session")
def small_dpl():
    """DPL thresholds small enough for the tiny Amazon fixtures (text and description lengths stay public)."""
    return types.MappingProxyType(
        dict(
            dpl_min_item_users=2,
            dpl_min_user_reviews=5,
            dpl_num_targets=3,
            dpl_min_profile_item_users=2,
            dpl_min_profile_reviews=2,
        )
    )


# ------------------------------------------------------------------------------------------------------------
# Tiny training data and config: hidden 32, 2 layers, vocab 128, rows of 64 tokens.

VOCAB = TINY_QWEN["vocab_size"]


def _write_random_data(
    out_dir: Path, *, train: int = 48, val: int = 8, seed: int = 0, marked: int | None = None
) -> Path:
    """Random token examples (ids 1..VOCAB-1) whose targets repeat a per-example pattern, so loss can fall,
    with the summary.json `data prepare` finishes with (its example counts; no sources were read).
    `marked`: the training example whose targets are all `MARKED_TARGET`."""
    import numpy as np

    from nextquill_jax.data.prepared_split import SUMMARY_FILE, TokenizedExample, write_split

    rng = np.random.default_rng(seed)
    counts = {split: count for split, count in (("train", train), ("val", val)) if count}
    for split, count in counts.items():
        examples = []
        for _ in range(count):
            target = np.tile(rng.integers(1, 16, 3), 4)[: rng.integers(6, 12)]
            if split == "train" and len(examples) == marked:
                target = np.full_like(target, MARKED_TARGET)
            examples.append(
                TokenizedExample(
                    prompt_with=rng.integers(1, VOCAB, rng.integers(8, 20)).astype(np.int32),
                    prompt_without=rng.integers(1, VOCAB, rng.integers(3, 8)).astype(np.int32),
                    target=target.astype(np.int32),
                )
            )
        write_split(out_dir, split, examples)
    (out_dir / SUMMARY_FILE).write_text(json.dumps({"examples": counts, "splits": list(counts)}))
    return out_dir


def _tiny_config(data_dir: Path, workdir: Path, **sections) -> dict:
    """A config dict for a tiny random qwen2-family model on `data_dir`; `sections` update sections."""
    cfg = {
        "model": {
            "preset": "qwen2.5-0.5b",
            "overrides": {**TINY_QWEN, "eos_token_ids": [TINY_EOS_ID]},
            "compute_dtype": "float32",
        },
        "data": {
            "batching": {
                "mode": "pack",
                "seq_len_with": 64,
                "seq_len_without": 32,
                "response_slots": 32,
                "length_multiple": 8,
                "rows_per_batch": 8,
                "num_epochs": 2,
                "read_threads": 0,
                "prefetch_batches": 0,
            }
        },
        "loss": {"variant": "nextquill", "token_chunk": 64, "vocab_chunk": 64},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 1},
        "train": {"workdir": str(workdir), "data_dir": str(data_dir), "seed": 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every_steps": 3, "keep": 2, "async_save": True},
        "eval": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def _write_config(cfg: dict, path: Path) -> Path:
    """Write a config dict as YAML to `path`; returns `path`."""
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def write_random_data():
    """`write_random_data(out_dir, *, train=48, val=8, seed=0, marked=None)`: random prepared splits of the
    tiny vocabulary (ids 1..127) whose targets repeat a per-example pattern, so loss can fall (training
    example `marked`'s targets are all `MARKED_TARGET`); returns `out_dir`."""
    return _write_random_data


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(data_dir, workdir, **sections)`: a config dict for a tiny random qwen2-family model
    (hidden 32, 2 layers, vocab 128, rows of 64 tokens) on `data_dir`; `sections` update sections."""
    return _tiny_config


@pytest.fixture(scope="session")
def write_config():
    """`write_config(cfg, path)`: the config dict as YAML at `path`; returns `path`."""
    return _write_config


# ------------------------------------------------------------------------------------------------------------
# Tiny models.


def _tiny_hf_config(family: str = "qwen2", *, tied: bool = False, **fields):
    """A transformers config of `family` ("llama", "qwen2" or "qwen3"): TINY_HF with `fields` applied."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return config_class(**{**TINY_HF, **fields}, tie_word_embeddings=tied)


@pytest.fixture(scope="session")
def tiny_hf_config():
    """`tiny_hf_config(family="qwen2", *, tied=False, **fields)`: a tiny transformers LlamaConfig, Qwen2Config
    or Qwen3Config (vocab 300, hidden 64, mlp 128, 2 layers, 4 heads, 2 kv heads, 256 positions, RMS eps 1e-6;
    other fields transformers' defaults), with the word embeddings tied or not and `fields` changed."""
    return _tiny_hf_config


# Our ModelConfig: Llama family, 2 layers, 4 query heads and 2 kv heads of 8.
TINY_MODEL = dict(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


@pytest.fixture(scope="session")
def tiny_model_config():
    """`tiny_model_config(**fields)`: our ModelConfig at test size (Llama family, vocab 64, hidden 32, mlp 64,
    2 layers, 4 heads and 2 kv heads of 8) with `fields` changed."""
    from nextquill_jax.models import ModelConfig

    return lambda **fields: ModelConfig(**{**TINY_MODEL, **fields})


# ------------------------------------------------------------------------------------------------------------
# One trained run, shared by every module that reads a finished workdir.

RECORD_WORDS = ["tea", "coffee", "rain", "books", "walk", "chess", "bread", "coast", "train", "quiet"]
# Loss settings other than the defaults, so a reader of the run can show it used the run's own.
TRAINED_RUN_LOSS = {"variant": "context_sft", "threshold": 0.0, "high": 0.8, "low": 0.2}


def _write_records(path: Path, seed: int = 0) -> Path:
    """16 generic records (5 users, 2 history entries each, categories notes/posts); the last 5 are `test`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(16):
        sentence = lambda n: " ".join(rng.choice(RECORD_WORDS, n)) + "."
        rows.append(
            {
                "user_id": f"u{i % 5}",
                "id": f"r{i}",
                "context": f"Write about {rng.choice(RECORD_WORDS)}.",
                "history": [sentence(4), sentence(3)],
                "target": sentence(int(rng.integers(3, 7))),
                "category": ["notes", "posts"][i % 2],
                "split": "test" if i >= 11 else "train",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TrainedRun(NamedTuple):
    """A finished tiny run: `workdir` (config.yaml, prepared/, checkpoints/2) and `exported`, its last
    checkpoint as a Hugging Face directory. Shared: copy the workdir before writing into it."""

    workdir: Path
    exported: Path


def _train_tiny_run(root: Path) -> None:
    """The generic records -> `data prepare` (tiny tokenizer) -> 2 training steps of a tiny random model
    (context_sft, every example whole in its row) -> `export`: `root`/run and `root`/exported."""
    from nextquill_jax.config import load_config
    from nextquill_jax.train import loop, setup
    from nextquill_jax.train.export import export

    cfg = _tiny_config(None, root / "run")
    cfg["model"]["overrides"]["vocab_size"] = 704  # the tokenizer has 700 ids
    cfg["data"].update(
        format="generic",
        template="plain",
        sources=[str(_write_records(root / "records.jsonl"))],
        tokenizer=str(_save_tiny_tokenizer(root / "tok")),
    )
    cfg["data"]["batching"].update(seq_len_with=160, seq_len_without=96)  # no example is cut
    cfg["loss"].update(TRAINED_RUN_LOSS)
    cfg["train"].update(max_steps=2, data_dir=None)
    config = load_config(_write_config(cfg, root / "run.yaml"))
    result = loop.train(config, setup.resolve_workdir(config, None), echo=lambda _: None)
    assert result.status == "finished" and result.last_checkpoint == 2, result
    export(root / "run", root / "exported")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """`TrainedRun` of `_train_tiny_run`, trained once per test session: under pytest-xdist the first worker
    to ask trains it (the others wait on a file lock) in the directory all workers' temporary dirs share."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root, done = shared / "trained_run", shared / "trained_run.done"
    with FileLock(str(shared / "trained_run.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker that died while training left it
            root.mkdir()
            _train_tiny_run(root)
            done.touch()
    return TrainedRun(root / "run", root / "exported")


# ------------------------------------------------------------------------------------------------------------
# Programs in subprocesses.


class Finished(NamedTuple):
    """A program's output, once it has exited as expected."""

    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        """The JSON the program printed on its `RESULT ` line."""
        line = next(line for line in self.stdout.splitlines() if line.startswith("RESULT "))
        return json.loads(line[len("RESULT ") :])


class Programs:
    """Runs tests/programs/<name> in a fresh Python with `devices` simulated CPU devices (XLA_FLAGS set in
    that process only), the repository first on its path and `env` added to its environment."""

    @staticmethod
    def start(
        name: str, *args: str, devices: int = 1, fast_compile: bool = False, env: dict | None = None
    ) -> subprocess.Popen:
        """Start the program with `args`; stdout and stderr are pipes. `fast_compile` adds FAST_COMPILE."""
        flags = f"--xla_force_host_platform_device_count={devices}"
        full_env = dict(os.environ)
        full_env.update(
            {
                "XLA_FLAGS": f"{flags} {FAST_COMPILE}" if fast_compile else flags,
                "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(REPO),
                **(env or {}),
            }
        )
        return subprocess.Popen(
            [sys.executable, str(PROGRAMS / name), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=REPO,
        )

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 600, expect: int = 0) -> Finished:
        """Wait for `proc`; raises AssertionError (with its output's tail) unless it exits with `expect`."""
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != expect:
            raise AssertionError(
                f"{proc.args[1]} exited {proc.returncode}, not {expect}:\n{out[-3000:]}\n{err[-6000:]}"
            )
        return Finished(out, err)

    @staticmethod
    def free_port() -> int:
        """A local TCP port free now (the OS's choice), for a coordinator that binds it shortly after."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def hosts(self, count: int) -> list[dict[str, str]]:
        """The environments of `count` programs that join as the processes of one multi-host run (gloo
        collectives, coordinator on a free local port): the NEXTQUILL_* variables `parallel` reads."""
        coordinator = f"127.0.0.1:{self.free_port()}"
        return [
            {
                "NEXTQUILL_COORDINATOR": coordinator,
                "NEXTQUILL_NUM_PROCESSES": str(count),
                "NEXTQUILL_PROCESS_ID": str(i),
            }
            for i in range(count)
        ]

    def run(
        self,
        name: str,
        *args: str,
        devices: int = 1,
        fast_compile: bool = False,
        timeout: float = 600,
        env: dict | None = None,
    ) -> Finished:
        """Run the program to completion; raises AssertionError (with its output) unless it exits with 0."""
        proc = self.start(name, *args, devices=devices, fast_compile=fast_compile, env=env)
        return self.finish(proc, timeout)


@pytest.fixture(scope="session")
def programs() -> Programs:
    """Starts and runs the programs under tests/programs (see `Programs`)."""
    return Programs()
