#!/usr/bin/env bash
# Install nextquill-jax (with its `tpu` extra) into a Python venv on every worker of TPU_NAME.
USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=...] [PACKAGE_SPEC=...] [PYTHON_VERSION=3.11] [REMOTE_DIR=nextquill]
       [CHECK_TIMEOUT=600] tpu_scripts/setup.sh [--dry-run]

Without PACKAGE_SPEC, builds a wheel of this checkout, copies it to every worker and installs it with the
[tpu] extra. With PACKAGE_SPEC (any pip requirement, e.g. 'nextquill-jax[tpu]==0.1.0' or a git URL), installs
that instead. The venv is REMOTE_DIR/venv on each worker; uv provides Python PYTHON_VERSION.
Then checks the slice with check_hosts.py on every worker at once: it starts JAX's multi-host runtime the way
\`nextquill-jax train\` does and prints, per worker, its local and global device counts and an all-reduce
across the slice (a worker that cannot reach the others fails within CHECK_TIMEOUT=600 s). The check needs
the TPU, so a worker where training runs skips it and says so."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require TPU_NAME ZONE
: "${CHECK_TIMEOUT:=600}"

venv="$REMOTE_DIR/venv"
prepare="set -euo pipefail; mkdir -p $(shell_words "$REMOTE_DIR/dist" "$REMOTE_DIR/logs" "$REMOTE_DIR/bin")"
prepare+="; rm -f $(shell_words "$REMOTE_DIR/dist")/*.whl"
prepare+="; python3 -m pip install --user --quiet --upgrade uv"
prepare+="; ~/.local/bin/uv venv --allow-existing --python $(shell_words "$PYTHON_VERSION" "$venv")"
on_workers all "$prepare"

if [[ -n "${PACKAGE_SPEC:-}" ]]; then
    requirement="$(shell_words "$PACKAGE_SPEC")"
else
    wheel_dir="${TMPDIR:-/tmp}/nextquill-wheel"
    run rm -rf "$wheel_dir"
    run python3 -m pip wheel --no-deps --quiet --wheel-dir "$wheel_dir" "$REPO_ROOT"
    # One wheel after the build; in a dry run the pattern itself is printed.
    wheels=("$wheel_dir"/nextquill_jax-*.whl)
    copy_to_workers "${wheels[0]}" "$REMOTE_DIR/dist/"
    requirement="\"\$(ls $(shell_words "$REMOTE_DIR/dist")/nextquill_jax-*.whl)[tpu]\""
fi
install="set -euo pipefail; ~/.local/bin/uv pip install --python $(shell_words "$venv/bin/python") $requirement"
on_workers all "$install"

copy_to_workers "$SCRIPT_DIR/check_hosts.py" "$REMOTE_DIR/bin/check_hosts.py"
check="set -euo pipefail; cd $(shell_words "$REMOTE_DIR")"
check+="; if $RUN_ALIVE; then"
check+=" echo \"\$(hostname): training runs here (pid \$(cat logs/train.pid)), which holds the TPU: check skipped\"; exit 0; fi"
check+="; timeout $(shell_words "$CHECK_TIMEOUT") venv/bin/python bin/check_hosts.py"
on_workers all "$check"
