#!/usr/bin/env bash
# Runs on each TPU worker, started detached by launch.sh in REMOTE_DIR with stdout/stderr going to
# logs/train.log: runs the training command and keeps copies of what it writes to local files in directories
# under the bucket mount, refreshed every COPY_SECONDS and once more at exit, so they outlive a preempted or
# deleted VM. A file written through Cloud Storage FUSE reaches the bucket only when it is closed, so files
# open for the whole run never would; each copy is written and closed at once, and replaces the previous
# object in one piece. The copies:
#   logs/train.log -> LOG_COPY_DIR/<this worker's host>.log
#   every file in EVENTS_DIR (the TensorBoard event files; the trainer writes them on process 0 only, so the
#   other workers have none and copy nothing) -> EVENTS_COPY_DIR, under the same names. Files already in
#   EVENTS_COPY_DIR that EVENTS_DIR lacks (an earlier VM's, on resume) are left alone.
#
#   bin/worker_train.sh LOG_COPY_DIR COPY_SECONDS EVENTS_DIR EVENTS_COPY_DIR COMMAND ARG...
#
# SIGTERM (stop.sh, or the VM shutting down) is passed on to the training process, which saves a checkpoint
# and exits; the exit status is the training command's.
set -uo pipefail
shopt -s nullglob

log_copy_dir="$1"
copy_seconds="$2"
events_dir="$3"
events_copy_dir="$4"
shift 4
log_copy="$log_copy_dir/$(hostname).log"

copy_outputs() {
    mkdir -p "$log_copy_dir" && cp logs/train.log "$log_copy" ||
        echo "worker_train.sh: could not copy logs/train.log to $log_copy" >&2
    local events=("$events_dir"/*)
    if ((${#events[@]} > 0)); then
        mkdir -p "$events_copy_dir" && cp -R "${events[@]}" "$events_copy_dir/" ||
            echo "worker_train.sh: could not copy $events_dir to $events_copy_dir" >&2
    fi
}

"$@" &
train=$!
trap 'kill -TERM "$train" 2>/dev/null' TERM INT
# The copier finishes a copy in progress before it exits (bash runs a trap once the running command is
# done), so no earlier copy can land after the final one below. Sleeping in the background keeps `wait`
# interruptible, so the copier exits at once when it is not copying.
(
    sleeper=""
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    while true; do
        sleep "$copy_seconds" &
        sleeper=$!
        wait "$sleeper" || break # sleep refused COPY_SECONDS: copy at exit only
        copy_outputs
    done
) &
copier=$!

# `wait` returns early when a trapped signal arrives: wait again until the training process is gone.
while kill -0 "$train" 2>/dev/null; do
    wait "$train"
done
wait "$train"
status=$?
kill "$copier" 2>/dev/null
wait "$copier"
copy_outputs
# The run is over: a pid file left behind could name another process by the time stop.sh reads it. Only
# this run's own (launch.sh writes $! there just after starting it).
if [[ "$(cat logs/train.pid 2>/dev/null)" == "$$" ]]; then
    rm -f logs/train.pid
fi
exit "$status"
