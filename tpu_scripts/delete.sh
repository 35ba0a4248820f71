#!/usr/bin/env bash
# Delete the TPU VM / slice TPU_NAME (and its queued resource with QUEUED=1). Local disks, and so the staged
# data and logs on them, are lost; the gs:// WORKDIR (checkpoints, metrics) stays.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=...] [QUEUED=1] tpu_scripts/delete.sh [--dry-run]"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE

mapfile -t flags < <(gcloud_flags)
if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${flags[@]}" --force --quiet
else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
fi
