#!/usr/bin/env bash
# Mount the Cloud Storage bucket BUCKET with Cloud Storage FUSE at REMOTE_DIR/MOUNT_DIR on every worker of
# TPU_NAME, so that all workers share one directory for the training workdir (checkpoints, metrics, logs).
USAGE="usage: TPU_NAME=NAME ZONE=ZONE BUCKET=NAME [MOUNT_DIR=gcs] [PROJECT=...] [REMOTE_DIR=nextquill]
       tpu_scripts/mount_bucket.sh [--dry-run]

Checks that BUCKET has hierarchical namespace (else refuses: see README.md), installs gcsfuse on each worker
if missing (Google's apt repository), then mounts gs://BUCKET at REMOTE_DIR/MOUNT_DIR. Use a workdir under
it: WORKDIR=MOUNT_DIR/runs/NAME in launch.sh. Mounting again is a no-op (unmount first, with
fusermount -u REMOTE_DIR/MOUNT_DIR on every worker, to change the options).
Why: Orbax commits a checkpoint by renaming its temporary directory, which Cloud Storage renames atomically only
in a bucket with hierarchical namespace. Every worker writes through its own mount, so the mount caches no
metadata (--metadata-cache-ttl-secs=0, and 0 for the cache of names that do not exist): each worker sees the
others' files at once."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE BUCKET

bucket_name="${BUCKET#gs://}"
bucket_name="${bucket_name%/}"
namespace=(gcloud storage buckets describe "gs://$bucket_name" --format='value(hierarchical_namespace)')
if ((DRY_RUN)); then
    run "${namespace[@]}"
else
    hns="$("${namespace[@]}")"
    if [[ "${hns,,}" != *true* ]]; then
        echo "error: gs://$bucket_name has no hierarchical namespace (gcloud reports '${hns}'), so Orbax's" \
            "checkpoint commits (directory renames) would not be atomic. Hierarchical namespace can only be" \
            "chosen when a bucket is created: create a new bucket with --enable-hierarchical-namespace" \
            "--uniform-bucket-level-access (tpu_scripts/README.md, section 1) and copy the data into it" >&2
        exit 2
    fi
fi

mount_point="$(shell_words "$REMOTE_DIR/$MOUNT_DIR")"
mount="set -euo pipefail"
mount+="; if ! command -v gcsfuse > /dev/null; then"
mount+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null"
mount+="; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
mount+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
mount+="; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
mount+="; mkdir -p $mount_point"
mount+="; mountpoint -q $mount_point || gcsfuse --metadata-cache-ttl-secs=0 --metadata-cache-negative-ttl-secs=0"
mount+=" $(shell_words "$bucket_name") $mount_point"
mount+="; echo \"\$(hostname): gs://$bucket_name mounted at\" $mount_point"
on_workers all "$mount"
