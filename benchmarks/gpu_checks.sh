#!/usr/bin/env bash
# Every GPU measurement of issue 16 in one command, for a short lease of one NVIDIA GPU (H100/H200): the training
# step's MFU at the Qwen2.5-1.5B shape with its breakdown and a jax.profiler trace; with cuDNN's packed mode
# (segment offsets, model.cudnn_max_segments) and whether that mode matches blockwise XLA attention in outputs
# and gradients and is faster (benchmarks/cudnn_mask.py, exit 1 on a mismatch; on a jax with PR #39521 it also
# checks and times grouped k / v passed unrepeated, which training adopts only once it passes here); the best
# configuration measured (packed mode, joint forward, bf16 head operands) at 4 and 8 rows; bf16 operands in the
# fused loss, the joint forward and remat none under the dense mask; three remat policies per part of the layer
# (`save:...`); the fused loss alone in float32 and bf16 operands; generation's prefill; the scanned decoder
# layers unrolled (model.scan_unroll 2, and all 28 layers); and the XLA GPU flags that JAX's and NVIDIA's GPU
# performance guides recommend. Each check has its own time limit, so one failure leaves the others' results,
# and every result lands in OUT_DIR as it is made.
#
#   [WHEELS=.whl] bash benchmarks/gpu_checks.sh OUT_DIR [NAMES]
#
# NAMES (an extended regular expression) runs only the checks whose names match. On an H200 (2026-12-04,
# RESULTS.md) every check but mfu_unroll_full (not yet run on a GPU: the longest compile) took 15-40 s, all of
# them ~7 min, so two 600 s device calls hold the whole script:
#   1. 'cudnn|mfu_breakdown|mfu_best' (~3.5 min): cuDNN's packed mode (Hopper or newer), the dense-mask step
#      every later section compares with, and the best configuration (with grouped k / v unrepeated too);
#   2. 'mfu_profile|bf16|remat_none|mfu_save|loss|prefill|unroll|xla_flags' (~6 min, mfu_unroll_full's compile
#      unknown). The files that come back from a lease are few: pack the logs and the profile first
#      (`tar czf OUT_DIR/logs.tgz OUT_DIR/*.log OUT_DIR/profile`).
#
# Run from the repository root under the machine's own JAX (the package on PYTHONPATH). The lent machines'
# image (Python 3.12) lacks grain and two of its dependencies; download their wheels before the lease, on a
# machine with the registries:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
#     grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
# then carry `.whl` to the machine (ignored by git) and set WHEELS=.whl: the script installs them, offline, into
# a folder of its own on PYTHONPATH. Sections are appended to OUT_DIR/RESULTS_gpu.md in benchmarks/RESULTS.md's
# format, to be copied there.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [NAMES]}
mkdir -p "$out"
results=$out/RESULTS_gpu.md
only=${2:-.}
py=${PYTHON:-python3}
site=
if [[ -n ${WHEELS:-} ]]; then
  wheels=("$WHEELS"/*.whl)
  [[ -f ${wheels[0]} ]] || { echo "gpu_checks.sh: no *.whl in WHEELS=$WHEELS (download them: see above)" >&2; exit 1; }
  site=${TMPDIR:-/tmp}/gpu_checks_site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" || { echo "gpu_checks.sh: could not install the wheels in $WHEELS" >&2; exit 1; }
fi
export PYTHONPATH=.${site:+:$site}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

check() {  # check NAME SECONDS COMMAND...: one check under a time limit, its whole output in OUT_DIR/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  [[ $name =~ $only ]] || return 0
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s"
  grep -E '^\|.*(qwen|tokens|prefill|cuDNN|packed)|^- |ms|PASS|FAIL|error|Error' "$out/$name.log" | tail -n 12
}

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >"$out/gpu.txt" 2>&1
else
  echo "nvidia-smi: not on PATH (no NVIDIA driver here)" >"$out/gpu.txt"
fi
"$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

mfu=("$py" benchmarks/mfu.py --models qwen2.5-1.5b --steps 5 --warmup 2 --append-results "$results")
check mfu_breakdown 150 "${mfu[@]}" --remat dots_with_no_batch_dims_saveable --breakdown
# A jax.profiler trace of 3 steps (host gaps, the backward's kernels), not appended to the results: the
# tracer's overhead is in its times. Open OUT_DIR/profile with XProf or TensorBoard's profile plugin.
check mfu_profile 120 "$py" benchmarks/mfu.py --models qwen2.5-1.5b --steps 3 --warmup 2 \
  --remat dots_with_no_batch_dims_saveable --profile "$out/profile"
check mfu_bf16_head 70 "${mfu[@]}" --remat dots_with_no_batch_dims_saveable --operand-dtype bfloat16
check mfu_bf16_joint 70 "${mfu[@]}" --remat dots_with_no_batch_dims_saveable --operand-dtype bfloat16 \
  --joint-forward
# Remat none needs 106 GiB here, more than JAX takes of the card by default (75%).
check mfu_remat_none 70 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "${mfu[@]}" --remat none --operand-dtype bfloat16
# Remat per part of the layer, against dots_with_no_batch_dims_saveable (mfu_breakdown): every name, the MLP's
# gate/up only, the attention output and the MLP input only (fewest FLOPs, most memory first).
check mfu_save_all 70 "${mfu[@]}" --remat save:qkv,attention,attn_out,mlp_gate_up
check mfu_save_mlp 70 "${mfu[@]}" --remat save:mlp_gate_up
check mfu_save_attn 70 "${mfu[@]}" --remat save:attention,attn_out
loss=("$py" benchmarks/loss_memory.py --tokens 4096 --hidden 1536 --dtype bfloat16 --timing
  --append-results "$results")
check loss_f32_operands 40 "${loss[@]}" --operand-dtype float32
check loss_bf16_operands 40 "${loss[@]}" --operand-dtype bfloat16
check prefill 100 "$py" benchmarks/prefill.py --append-results "$results"
check cudnn_mask 120 "$py" benchmarks/cudnn_mask.py --append-results "$results"
check cudnn_mask_one_segment 120 "$py" benchmarks/cudnn_mask.py --segments 1 --append-results "$results"
check cudnn_mfu_offsets 150 "${mfu[@]}" --remat dots_with_no_batch_dims_saveable --attention cudnn \
  --cudnn-max-segments 2 --breakdown
# The best configuration measured (45.8% MFU at 8 rows on one H200, 44.2% on another, 2026-12-04): the
# packed mode with both streams of a row joined into one attention row (auto: 4 segments), bf16 head operands
# in the fused loss.
best=("${mfu[@]}" --remat dots_with_no_batch_dims_saveable --attention cudnn --cudnn-max-segments auto
  --operand-dtype bfloat16 --joint-forward --breakdown)
check mfu_best 100 "${best[@]}"
check mfu_best_8rows 100 "${best[@]}" --rows 8
# The same with grouped k / v passed to the packed mode unrepeated: only on a jax with PR #39521 (mfu.py
# refuses it otherwise), and worth reading only where cudnn_mask's grouped k/v check passed.
check mfu_best_grouped 100 "${best[@]}" --rows 8 --grouped-kv
# The layers' scan unrolled (model.scan_unroll), against mfu_breakdown's rolled scan at the same remat policy:
# two layers per loop iteration, then the whole stack (28 layers, straight-line code: XLA may fuse and
# overlap across every layer boundary). On CPU the whole stack compiled in 133 s (30 s rolled), and XLA's
# temporary buffers grew from 67 to 352 GiB, about remat none's (RESULTS.md, 2026-12-02): it may need remat
# none's memory here too (108 GB on the H200, more than an 80 GB H100 holds).
check mfu_unroll2 90 "${mfu[@]}" --remat dots_with_no_batch_dims_saveable --scan-unroll 2
check mfu_unroll_full 240 "${mfu[@]}" --remat dots_with_no_batch_dims_saveable --scan-unroll 28
# mfu_breakdown again under XLA GPU flags, for this check only (the section's command records them):
# the latency-hiding scheduler (JAX's GPU performance tips and NVIDIA JAX-Toolbox's default image flag),
# double-buffered while loops (the layers' scan; JAX-Toolbox's GPU performance guide) and cuBLAS for every
# GEMM instead of Triton (MaxText's GPU runs). Each is accepted by jaxlib 0.10.2's flag parser; an unknown
# flag in another version aborts this check alone.
xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_while_loop_double_buffering=true"
xla_flags+=" --xla_gpu_enable_triton_gemm=false"
check mfu_xla_flags 150 env XLA_FLAGS="$xla_flags" "${mfu[@]}" --remat dots_with_no_batch_dims_saveable \
  --breakdown
echo "== done in $SECONDS s"
