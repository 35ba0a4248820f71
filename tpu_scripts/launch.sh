#!/usr/bin/env bash
# Start `nextquill-jax train` on every worker of TPU_NAME: the same command everywhere, detached from the ssh
# session; jax.distributed discovers the other workers of the slice by itself.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE CONFIG=configs/X.yaml WORKDIR=gcs/runs/NAME [TRAIN_ARGS='k=v ...']
       [TRAIN_ENV='VAR=value ...'] [PROJECT=...] [REMOTE_DIR=nextquill] tpu_scripts/launch.sh [--dry-run]

Copies CONFIG (a local YAML file) to every worker, then runs on each, in REMOTE_DIR:
  nextquill-jax train --config configs/<CONFIG's file name> --workdir WORKDIR TRAIN_ARGS...
TRAIN_ARGS: space-separated section.key=value overrides (no spaces inside a value). TRAIN_ENV: space-separated
VAR=value environment settings for the run (e.g. LIBTPU_INIT_ARGS=...). WORKDIR must be one directory shared by
all workers, relative to REMOTE_DIR: a path under the bucket mount of mount_bucket.sh (e.g. gcs/runs/NAME).
Every worker writes its part of each checkpoint there; a later launch with the same WORKDIR resumes.
Output goes to REMOTE_DIR/logs/train.log on each worker (follow it with tpu_scripts/logs.sh)."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE CONFIG WORKDIR

if [[ ! -f "$CONFIG" ]]; then
    echo "error: CONFIG=$CONFIG is not a file (give the path of a YAML config on this machine)" >&2
    exit 2
fi
if [[ "$WORKDIR" != gs://* && "$WORKDIR" != "$MOUNT_DIR"/* ]]; then
    echo "warning: WORKDIR=$WORKDIR is neither under the bucket mount ($MOUNT_DIR/..., mount_bucket.sh)" \
        "nor gs://...: on a multi-host slice every worker must write to the same workdir" >&2
fi
read -r -a overrides <<<"${TRAIN_ARGS:-}"
read -r -a environment <<<"${TRAIN_ENV:-}"

remote_config="configs/$(basename "$CONFIG")"
on_workers all "mkdir -p $(shell_words "$REMOTE_DIR/configs" "$REMOTE_DIR/logs")"
copy_to_workers "$CONFIG" "$REMOTE_DIR/$remote_config"

train=(env "${environment[@]}" venv/bin/nextquill-jax train --config "$remote_config" --workdir "$WORKDIR"
    "${overrides[@]}")
start="set -euo pipefail; cd $(shell_words "$REMOTE_DIR")"
start+="; if [ -f logs/train.pid ] && kill -0 \"\$(cat logs/train.pid)\" 2>/dev/null; then"
start+=" echo \"training already runs here (pid \$(cat logs/train.pid)); stop it with tpu_scripts/stop.sh\" >&2; exit 1; fi"
start+="; nohup setsid $(shell_words "${train[@]}") > logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid"
start+="; echo \"\$(hostname): started pid \$(cat logs/train.pid)\""
on_workers all "$start"
