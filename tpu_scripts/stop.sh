#!/usr/bin/env bash
# Stop training on every worker of TPU_NAME with SIGTERM: the run writes a final checkpoint and exits, and a
# later launch.sh with the same WORKDIR resumes from it. The TPU VM keeps running (and billing): delete.sh.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [STOP_TIMEOUT=600] [PROJECT=...] [REMOTE_DIR=nextquill]
       tpu_scripts/stop.sh [--dry-run]

Sends SIGTERM to the training process on each worker and waits up to STOP_TIMEOUT seconds for the final
checkpoint to be written; after that it sends SIGKILL to the run's processes (the run then resumes from the
last complete checkpoint)."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE
: "${STOP_TIMEOUT:=600}"

# A wrong REMOTE_DIR is an error, not "no training running" (the run would go on, billing).
stop="cd $(shell_words "$REMOTE_DIR") || exit 1"
stop+="; if ! { $RUN_ALIVE; }; then"
stop+=" echo \"\$(hostname): no training running\"; exit 0; fi"
stop+="; pid=\$(cat logs/train.pid); kill -TERM \"\$pid\""
stop+="; for _ in \$(seq $(shell_words "$STOP_TIMEOUT")); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done"
# launch.sh started the run with setsid: the pid leads its own process group, which SIGKILL takes whole.
stop+="; if kill -0 \"\$pid\" 2>/dev/null; then kill -KILL -- \"-\$pid\"; echo \"\$(hostname): killed \$pid\";"
stop+=" else echo \"\$(hostname): stopped \$pid\"; fi; rm -f logs/train.pid"
on_workers all "$stop"
