#!/usr/bin/env bash
# Start `nextquill-jax train` on every worker of TPU_NAME: the same command everywhere, detached from the ssh
# session; jax.distributed discovers the other workers of the slice by itself.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE CONFIG=configs/X.yaml WORKDIR=gcs/runs/NAME [TRAIN_ARGS='k=v ...']
       [TRAIN_ENV='VAR=value'] [LOG_COPY_DIR=WORKDIR/logs] [LOG_COPY_SECONDS=60] [PROJECT=...]
       [REMOTE_DIR=nextquill] tpu_scripts/launch.sh [--dry-run]

Copies CONFIG (a local YAML file) and worker_train.sh to every worker, then runs on each, in REMOTE_DIR:
  nextquill-jax train --config configs/<CONFIG's file name> --workdir WORKDIR TRAIN_ARGS...
TRAIN_ARGS: section.key=value overrides separated by spaces or newlines (no spaces inside a value). TRAIN_ENV: environment
settings for the run, one VAR=value per line; the value is everything after the first '=', spaces included
(e.g. TRAIN_ENV='LIBTPU_INIT_ARGS=--xla_a=true --xla_b=false'). WORKDIR must be one directory shared by all
workers, relative to REMOTE_DIR: a path under the bucket mount of mount_bucket.sh (e.g. gcs/runs/NAME), not a
gs:// URI. Every worker writes its part of each checkpoint there; a later launch with the same WORKDIR resumes.
Output goes to REMOTE_DIR/logs/train.log on each worker (follow it with tpu_scripts/logs.sh), and a copy of
each worker's log to LOG_COPY_DIR/<host>.log every LOG_COPY_SECONDS and at exit. The TensorBoard event files
are written on the worker's disk, in REMOTE_DIR/logs/tensorboard/WORKDIR (logging.tensorboard_dir), and
copied into WORKDIR/tensorboard at the same times."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE CONFIG WORKDIR
: "${LOG_COPY_DIR:=$WORKDIR/logs}"
: "${LOG_COPY_SECONDS:=60}"

if [[ ! -f "$CONFIG" ]]; then
    echo "error: CONFIG=$CONFIG is not a file (give the path of a YAML config on this machine)" >&2
    exit 2
fi
if [[ "$WORKDIR" == gs://* ]]; then
    echo "error: WORKDIR=$WORKDIR: training writes to a directory, not to a gs:// URI. Mount the bucket on" \
        "every worker (tpu_scripts/mount_bucket.sh) and use the path under the mount, e.g." \
        "WORKDIR=$MOUNT_DIR/${WORKDIR#gs://*/}" >&2
    exit 2
fi
for setting in WORKDIR LOG_COPY_DIR; do
    if [[ "${!setting}" == "~"* ]]; then
        echo "error: $setting=${!setting}: a leading ~ is not expanded on the workers (the trainer would" \
            "expand it, the log and TensorBoard copies would not); write it relative to REMOTE_DIR (e.g." \
            "$MOUNT_DIR/runs/NAME) or as an absolute path" >&2
        exit 2
    fi
done
if [[ "$WORKDIR" != "$MOUNT_DIR"/* ]]; then
    echo "warning: WORKDIR=$WORKDIR is not under the bucket mount ($MOUNT_DIR/..., mount_bucket.sh): on a" \
        "multi-host slice every worker must write to the same workdir" >&2
fi
# -d '': every line, where `read` stops at the first (a TRAIN_ARGS written over several lines lost the rest).
read -r -d '' -a overrides <<<"${TRAIN_ARGS:-}" || true
environment=()
while IFS= read -r setting; do
    if [[ -z "${setting//[[:space:]]/}" ]]; then
        continue
    fi
    if [[ ! "$setting" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
        echo "error: TRAIN_ENV line '$setting' is not VAR=value (one setting per line)" >&2
        exit 2
    fi
    # A second NAME= after a space is almost surely a second setting on the same line, not part of the value.
    if [[ "${setting#*=}" =~ (^|[[:space:]])[A-Za-z_][A-Za-z0-9_]*= ]]; then
        echo "error: TRAIN_ENV line '$setting' holds two settings; put each VAR=value on its own line" >&2
        exit 2
    fi
    environment+=("$setting")
done <<<"${TRAIN_ENV:-}"

remote_config="configs/$(basename "$CONFIG")"
# Event files stay open for the whole run, so through the bucket mount they would reach the bucket only at the
# end; they are written locally instead and worker_train.sh copies them. One folder per workdir keeps the
# files of another run on this VM out of this run's copies.
events_dir="logs/tensorboard/${WORKDIR#/}"
# The trainer reads an override's value as YAML: single-quoted (quotes doubled inside), a WORKDIR with ' #' or
# ': ' in it stays one string instead of losing its tail to a comment or becoming a mapping.
events_value="'${events_dir//\'/\'\'}'"
on_workers all "mkdir -p $(shell_words "$REMOTE_DIR/configs" "$REMOTE_DIR/logs" "$REMOTE_DIR/bin")"
copy_to_workers "$CONFIG" "$REMOTE_DIR/$remote_config"
copy_to_workers "$SCRIPT_DIR/worker_train.sh" "$REMOTE_DIR/bin/worker_train.sh"

# PYTHONUNBUFFERED: the log shows each line when it is printed, and a preempted run loses none.
# The user's overrides come last, so a logging.tensorboard_dir of their own wins (and nothing is copied);
# one in the config file is replaced by this one.
train=(env PYTHONUNBUFFERED=1 "${environment[@]}" bash bin/worker_train.sh "$LOG_COPY_DIR" "$LOG_COPY_SECONDS"
    "$events_dir" "$WORKDIR/tensorboard" venv/bin/nextquill-jax train --config "$remote_config"
    --workdir "$WORKDIR" "logging.tensorboard_dir=$events_value" "${overrides[@]}")
start="set -euo pipefail; cd $(shell_words "$REMOTE_DIR")"
start+="; if $RUN_ALIVE; then"
start+=" echo \"training already runs here (pid \$(cat logs/train.pid)); stop it with tpu_scripts/stop.sh\" >&2; exit 1; fi"
start+="; nohup setsid $(shell_words "${train[@]}") > logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid"
start+="; echo \"\$(hostname): started pid \$(cat logs/train.pid)\""
on_workers all "$start"
