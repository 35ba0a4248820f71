#!/usr/bin/env bash
# Follow the training log of one worker of TPU_NAME (worker 0 by default), or print the tail of every worker's.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [WORKER=0|all] [LINES=50] [PROJECT=...] [REMOTE_DIR=nextquill]
       tpu_scripts/logs.sh [--dry-run]

WORKER=0 (default) follows worker 0's REMOTE_DIR/logs/train.log until Ctrl-C (training goes on).
WORKER=all prints the last LINES lines of every worker's log and returns."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE
: "${WORKER:=0}"
: "${LINES:=50}"

log="$(shell_words "$REMOTE_DIR/logs/train.log")"
if [[ "$WORKER" == all ]]; then
    on_workers all "echo \"== \$(hostname)\"; tail -n $(shell_words "$LINES") $log"
else
    on_workers "$WORKER" "tail -n $(shell_words "$LINES") -F $log"
fi
