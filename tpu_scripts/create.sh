#!/usr/bin/env bash
# Create the TPU VM or pod slice TPU_NAME (ACCELERATOR_TYPE, e.g. v4-32 or v5p-32) in ZONE and wait until it is up;
# recreate it when a spot preemption left it PREEMPTED (or its queued resource SUSPENDED).
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [ACCELERATOR_TYPE=v4-32] [RUNTIME_VERSION=...] [PROJECT=...] [SPOT=1] [QUEUED=1]
       [SERVICE_ACCOUNT=EMAIL] [VALID_UNTIL_DURATION=24h] [POLL_SECONDS=60] [POLL_RETRIES=10]
       tpu_scripts/create.sh [--dry-run]

Creates the slice (with QUEUED=1 through a queued resource, which waits for capacity) and returns when it is
READY / ACTIVE. RUNTIME_VERSION defaults to the image Google recommends for JAX on that TPU generation.
If TPU_NAME exists already: READY / ACTIVE is left as it is; PREEMPTED, TERMINATED (a TPU VM) or SUSPENDED,
FAILED (a queued resource) is deleted and created again, which is how a preempted spot TPU comes back (it
cannot be restarted); STOPPED (a TPU VM stopped by its owner) is an error naming the command that starts it.
A queued request expires after VALID_UNTIL_DURATION without capacity; its state is
polled every POLL_SECONDS, and POLL_RETRIES failed polls in a row (network, API errors) end the wait.
A dry run prints the state query and the commands for a slice that does not exist yet."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE
: "${VALID_UNTIL_DURATION:=24h}"
: "${POLL_SECONDS:=60}"
: "${POLL_RETRIES:=10}"

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
    resource=(gcloud compute tpus queued-resources)
    describe=("${resource[@]}" describe "$TPU_NAME" "${flags[@]}" --format='value(state.state)')
    delete=("${resource[@]}" delete "$TPU_NAME" "${flags[@]}" --force --quiet)
    create=("${resource[@]}" create "$TPU_NAME" "${flags[@]}" --node-id="$TPU_NAME"
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" "${capacity[@]}"
        --valid-until-duration="$VALID_UNTIL_DURATION")
else
    resource=(gcloud compute tpus tpu-vm)
    describe=("${resource[@]}" describe "$TPU_NAME" "${flags[@]}" --format='value(state)')
    delete=("${resource[@]}" delete "$TPU_NAME" "${flags[@]}" --quiet)
    create=("${resource[@]}" create "$TPU_NAME" "${flags[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${capacity[@]}")
fi
# The describe command without its --format (the last word), quoted to be pasted: messages name it.
see="$(shell_words "${describe[@]:0:${#describe[@]}-1}")"

# state: print TPU_NAME's state, or nothing when it does not exist. Returns 1 (gcloud's message on stderr)
# when the query itself failed.
state() {
    local out errors status=0
    errors="$(mktemp)"
    out="$("${describe[@]}" 2>"$errors")" || status=$?
    if ((status)) && ! grep -q NOT_FOUND "$errors"; then
        cat "$errors" >&2
        rm -f "$errors"
        return 1
    fi
    rm -f "$errors"
    if ((status == 0)); then
        echo "$out"
    fi
}

if ((DRY_RUN)); then
    run "${describe[@]}"
    run "${create[@]}"
    if [[ "$QUEUED" == 1 ]]; then
        run "${describe[@]}"
    fi
    exit 0
fi

current="$(state)" || exit 1
case "$current" in
    "") ;;
    READY | ACTIVE)
        echo "$TPU_NAME exists and is $current: nothing to create" >&2
        exit 0
        ;;
    STOPPED)
        echo "error: $TPU_NAME is STOPPED (stopped by its owner; its disk is kept): start it with" \
            "$(shell_words gcloud compute tpus tpu-vm start "$TPU_NAME" "${flags[@]}"), or delete it with" \
            "tpu_scripts/delete.sh and run create.sh again" >&2
        exit 1
        ;;
    PREEMPTED | TERMINATED | SUSPENDED | FAILED)
        echo "$TPU_NAME is $current: deleting it and creating it again (a preempted spot TPU cannot be restarted)" >&2
        run "${delete[@]}"
        ;;
    *)
        echo "error: $TPU_NAME is $current; wait until it settles (see: $see), or delete it" \
            "with tpu_scripts/delete.sh, then run create.sh again" >&2
        exit 1
        ;;
esac

run "${create[@]}"
if [[ "$QUEUED" == 1 ]]; then
    # The request waits in a queue until capacity is granted; poll its state, riding out failed polls.
    failures=0
    while true; do
        if current="$(state)"; then
            failures=0
            echo "queued resource $TPU_NAME: ${current:-not found}" >&2
            case "$current" in
                ACTIVE) break ;;
                FAILED | SUSPENDED | "")
                    echo "error: queued resource $TPU_NAME is ${current:-gone}; see: $see" >&2
                    exit 1
                    ;;
            esac
        else
            failures=$((failures + 1))
            echo "warning: polling $TPU_NAME failed ($failures of $POLL_RETRIES in a row)" >&2
            if ((failures >= POLL_RETRIES)); then
                echo "error: gave up polling queued resource $TPU_NAME; the request may still be granted:" \
                    "$see" >&2
                exit 1
            fi
        fi
        sleep "$POLL_SECONDS"
    done
fi
