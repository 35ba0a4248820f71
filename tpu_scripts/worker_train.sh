#!/usr/bin/env bash
# Runs on each TPU worker, started detached by launch.sh in REMOTE_DIR with stdout/stderr going to
# logs/train.log: runs the training command and keeps a copy of that log in LOG_COPY_DIR (a directory under
# the bucket mount), refreshed every COPY_SECONDS and once more at exit, so the log outlives a preempted or
# deleted VM. A file written through Cloud Storage FUSE reaches the bucket only when it is closed, so the log
# itself (open for the whole run) never would; each copy is written and closed at once, and replaces the
# previous object in one piece. It is named after this worker's host.
#
#   bin/worker_train.sh LOG_COPY_DIR COPY_SECONDS COMMAND ARG...
#
# SIGTERM (stop.sh, or the VM shutting down) is passed on to the training process, which saves a checkpoint
# and exits; the exit status is the training command's.
set -uo pipefail

log_copy_dir="$1"
copy_seconds="$2"
shift 2
log_copy="$log_copy_dir/$(hostname).log"

copy_log() {
    mkdir -p "$log_copy_dir" && cp logs/train.log "$log_copy" ||
        echo "worker_train.sh: could not copy logs/train.log to $log_copy" >&2
}

"$@" &
train=$!
trap 'kill -TERM "$train" 2>/dev/null' TERM INT
while sleep "$copy_seconds"; do copy_log; done &
copier=$!

# `wait` returns early when a trapped signal arrives: wait again until the training process is gone.
while kill -0 "$train" 2>/dev/null; do
    wait "$train"
done
wait "$train"
status=$?
kill "$copier" 2>/dev/null
copy_log
exit "$status"
