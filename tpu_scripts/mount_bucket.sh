#!/usr/bin/env bash
# Mount the Cloud Storage bucket BUCKET with Cloud Storage FUSE at REMOTE_DIR/MOUNT_DIR on every worker of
# TPU_NAME, so that all workers share one directory for the training workdir (checkpoints, metrics, logs).
USAGE="usage: TPU_NAME=NAME ZONE=ZONE BUCKET=NAME [MOUNT_DIR=gcs] [PROJECT=...] [REMOTE_DIR=nextquill]
       tpu_scripts/mount_bucket.sh [--dry-run]

Installs gcsfuse on each worker if missing (Google's apt repository), then mounts gs://BUCKET at
REMOTE_DIR/MOUNT_DIR. Use a workdir under it: WORKDIR=MOUNT_DIR/runs/NAME in launch.sh. Mounting again is a
no-op. Directory renames (Orbax commits a checkpoint by renaming its temporary directory) are enabled with
--rename-dir-limit."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE BUCKET

bucket_name="${BUCKET#gs://}"
mount_point="$(shell_words "$REMOTE_DIR/$MOUNT_DIR")"
mount="set -euo pipefail"
mount+="; if ! command -v gcsfuse > /dev/null; then"
mount+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null"
mount+="; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
mount+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
mount+="; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
mount+="; mkdir -p $mount_point"
mount+="; mountpoint -q $mount_point || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $(shell_words "$bucket_name") $mount_point"
mount+="; echo \"\$(hostname): gs://$bucket_name mounted at $mount_point\""
on_workers all "$mount"
