# shellcheck shell=bash
# Shared settings and helpers for the tpu_scripts/*.sh commands. Sourced, never run.
#
# Every script takes `--dry-run` (print each command, run none) and `--help`. Settings come from environment
# variables (see README.md beside this file); the ones a script needs are checked before anything runs.

set -euo pipefail

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "error: these scripts need bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
    exit 2
fi

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

DRY_RUN=0

# Settings with defaults. TPU_NAME and ZONE have none: a wrong default zone would create billable hardware
# somewhere unintended.
: "${ACCELERATOR_TYPE:=v4-32}"
: "${PROJECT:=}"                      # empty: gcloud's configured project
: "${REMOTE_DIR:=nextquill}"          # on each worker, relative to the login user's home
: "${MOUNT_DIR:=gcs}"                 # the bucket mount of mount_bucket.sh, relative to REMOTE_DIR
: "${PYTHON_VERSION:=3.11}"           # the package needs >= 3.11; TPU images ship 3.10, so uv provides it
: "${SPOT:=0}"                        # 1: spot capacity (cheaper, preemptible; training resumes from the workdir)
: "${QUEUED:=0}"                      # 1: request through a queued resource (usual for v5p / large slices)

# usage TEXT: the --help text of the calling script.
usage() {
    printf '%s\n' "$1"
    exit 0
}

# parse_args "$@": the options every script shares. Anything else is an error naming the option.
parse_args() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            --dry-run) DRY_RUN=1 ;;
            -h | --help) usage "$USAGE" ;;
            *)
                echo "error: unknown argument '$arg' (accepted: --dry-run, --help; settings are environment variables)" >&2
                exit 2
                ;;
        esac
    done
}

# An example value of each setting `require` may ask for.
declare -A EXAMPLES=(
    [TPU_NAME]=nq-v4-32
    [ZONE]=us-central2-b
    [CONFIG]=configs/MY_CONFIG.yaml
    [WORKDIR]=gcs/runs/NAME
    [BUCKET]=MY_BUCKET
    [DATA_URI]=gs://MY_BUCKET/data
)

# require VAR...: fail naming every unset variable, each with an example value.
require() {
    local name missing=() examples=()
    for name in "$@"; do
        if [[ -z "${!name:-}" ]]; then
            missing+=("$name")
            examples+=("$name=${EXAMPLES[$name]:-VALUE}")
        fi
    done
    if ((${#missing[@]})); then
        echo "error: set ${missing[*]} (see tpu_scripts/README.md), e.g. ${examples[*]}" >&2
        exit 2
    fi
}

# runtime_version: the TPU VM software image for ACCELERATOR_TYPE unless RUNTIME_VERSION is set.
runtime_version() {
    if [[ -n "${RUNTIME_VERSION:-}" ]]; then
        echo "$RUNTIME_VERSION"
        return
    fi
    case "$ACCELERATOR_TYPE" in
        v6e-*) echo "v2-alpha-tpuv6e" ;;
        v5p-*) echo "v2-alpha-tpuv5" ;;
        v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
        v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
        *)
            echo "error: no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" >&2
            exit 2
            ;;
    esac
}

# quote ARG: ARG as one shell word, single-quoted only when it needs to be (readable dry-run output); for
# `--flag=value` only the value is quoted.
quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        printf '%s' "$1"
    elif [[ "$1" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
        printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# shell_words ARG...: the arguments as one line of shell words (for printing, or for a remote command).
shell_words() {
    local arg out=""
    for arg in "$@"; do
        out+="$(quote "$arg") "
    done
    printf '%s' "${out% }"
}

# run CMD ARG...: run the command (echoing it to stderr), or with --dry-run only print it to stdout.
run() {
    if ((DRY_RUN)); then
        shell_words "$@"
        echo
    else
        echo "+ $(shell_words "$@")" >&2
        "$@"
    fi
}

# gcloud_flags: the location flags every `gcloud compute tpus` call takes, one per line.
gcloud_flags() {
    echo "--zone=$ZONE"
    if [[ -n "$PROJECT" ]]; then
        echo "--project=$PROJECT"
    fi
}

# on_workers WORKER CMD: run the shell command CMD on WORKER ("all" or an index) of the slice.
on_workers() {
    local -a flags
    mapfile -t flags < <(gcloud_flags)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=$1" "--command=$2"
}

# copy_to_workers SRC DEST: copy the local file or directory SRC to DEST (relative to home) on every worker.
copy_to_workers() {
    local -a flags
    mapfile -t flags < <(gcloud_flags)
    run gcloud compute tpus tpu-vm scp --recurse "$1" "$TPU_NAME:$2" "${flags[@]}" --worker=all
}

# A worker-side test (for the remote command strings) that this directory's run is alive: logs/train.pid
# names a process that is still bin/worker_train.sh. Not `kill -0` alone: a pid file left by a run that ended
# (a VM restart, a long uptime) may name another process by now, which stop.sh would then kill.
# shellcheck disable=SC2016,SC2034 # expanded on the worker; used by the scripts that source this
RUN_ALIVE='[ -f logs/train.pid ] && [[ "$(ps -o args= -p "$(cat logs/train.pid)" 2>/dev/null)" == *bin/worker_train.sh* ]]'
