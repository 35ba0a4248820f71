#!/usr/bin/env bash
# Create the TPU VM or pod slice TPU_NAME (ACCELERATOR_TYPE, e.g. v4-32 or v5p-32) in ZONE and wait until it is up.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [ACCELERATOR_TYPE=v4-32] [RUNTIME_VERSION=...] [PROJECT=...] [SPOT=1] [QUEUED=1]
       [SERVICE_ACCOUNT=EMAIL]
       tpu_scripts/create.sh [--dry-run]

Creates the slice (with QUEUED=1 through a queued resource, which waits for capacity) and returns when it is
READY / ACTIVE. RUNTIME_VERSION defaults to the image Google recommends for JAX on that TPU generation."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE

version="$(runtime_version)"
mapfile -t flags < <(gcloud_flags)
# The VM's service account reads the data and writes checkpoints to Cloud Storage; IAM on the bucket decides.
capacity=(--scopes=https://www.googleapis.com/auth/cloud-platform)
if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then
    capacity+=(--service-account="$SERVICE_ACCOUNT")
fi
if [[ "$SPOT" == 1 ]]; then
    capacity+=(--spot)
fi

if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" "${flags[@]}" --node-id="$TPU_NAME" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" "${capacity[@]}"
    # The request waits in a queue until capacity is granted; poll its state.
    describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${flags[@]}" --format='value(state.state)')
    if ((DRY_RUN)); then
        run "${describe[@]}"
        exit 0
    fi
    while true; do
        state="$("${describe[@]}")"
        echo "queued resource $TPU_NAME: $state" >&2
        case "$state" in
            ACTIVE) break ;;
            FAILED | SUSPENDED)
                echo "error: queued resource $TPU_NAME is $state; see: ${describe[*]% --format*}" >&2
                exit 1
                ;;
        esac
        sleep 60
    done
else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${capacity[@]}"
fi
