#!/usr/bin/env bash
# Copy the data and the model from Cloud Storage to the local disk of every worker of TPU_NAME.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=...] DATA_URI=gs://... [MODEL_URI=gs://...] [REMOTE_DIR=nextquill]
       tpu_scripts/stage_data.sh [--dry-run]

DATA_URI (a gs:// folder) is synchronised to REMOTE_DIR/data and MODEL_URI (a gs:// Hugging Face model folder)
to REMOTE_DIR/model on each worker, so training reads local files. Point the config at them, e.g.
TRAIN_ARGS='model.path=model data.tokenizer=model' (paths are relative to REMOTE_DIR, where training runs).
Re-running copies only what changed."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE DATA_URI

sync="set -euo pipefail"
sync+="; gcloud storage rsync --recursive $(shell_words "$DATA_URI" "$REMOTE_DIR/data")"
if [[ -n "${MODEL_URI:-}" ]]; then
    sync+="; gcloud storage rsync --recursive $(shell_words "$MODEL_URI" "$REMOTE_DIR/model")"
fi
on_workers all "$sync"
