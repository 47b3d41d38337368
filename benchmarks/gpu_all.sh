#!/usr/bin/env bash
# All GPU benchmark workloads in one call (one H100/H200): first the cuDNN attention check
# against the reference (benchmarks/gpu_checks.py), then Llama-3.2-1B shapes full fine-tuning
# and LoRA, Llama-3-8B shapes LoRA; sequence 2048 packed, bf16 compute (configs/bench/gpu_*.py),
# then both again at the best settings measured on one H200 (1B full FT: batch 16 with unchunked
# loss; 8B LoRA: batch 4, no remat, unchunked loss), then the 1B full-FT run with XLA attention
# and with unchunked loss (the levers' GPU A/B).
#
#   bash benchmarks/gpu_all.sh [--config.a.b=v ...]      # overrides go to every run
#
# Prints each run's summary, then, last, one JSON line per run (a failed run, e.g. out of
# memory, gets {"workload", "mode", "error"} instead). Needs jax (with its CUDA plugin), flax,
# optax, orbax-checkpoint, transformers, absl-py, numpy, tqdm (all on the GPU image) plus grain,
# array-record, portpicker and ml-collections, carried as wheels in .whl/ (docs/benchmarks.md
# gives the exact download and carry commands); when .whl/ exists they are installed first.
# Environment: PYTHON (default python3), STEPS (10), WARMUP (2), RUN_TIMEOUT seconds per run
# (100), TOTAL_S (560: every run's limit is cut to what is left of this, and a run with under 30 s
# left is skipped with an error line, so the JSON summary prints inside one 600 s device call),
# AB (1; 0 skips the two A/B runs), OUT (directory for the per-run logs, default /tmp), WHEELS
# (directory of the wheels to install, default .whl; tests/test_bench.py runs this script on the
# CPU at tiny shapes with a WHEELS that does not exist).
set -u
cd "$(dirname "$0")/.."
DEADLINE=$((SECONDS + ${TOTAL_S:-560}))
limit() {  # limit WANTED: WANTED seconds, or what is left before the deadline if less
  local left=$((DEADLINE - SECONDS))
  echo $((left < $1 ? left : $1))
}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
LOGS=${OUT:-/tmp}
"$PY" -c "import jax; print('devices:', jax.devices())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

bench() {  # bench NAME CONFIG [flags...]
  local name=$1 config=$2 mode=full
  shift 2
  case " $* " in *lora.enabled=True*) mode=lora ;; esac
  case "$config" in *llama8b*) case " $* " in *lora.enabled=False*) ;; *) mode=lora ;; esac ;; esac
  local seconds rc why
  seconds=$(limit "${RUN_TIMEOUT:-100}")
  echo "=== $name ($seconds s): $PY -m sft_jax.bench --config $config $*"
  if [ "$seconds" -lt 30 ]; then
    why="skipped: under 30 s of TOTAL_S=${TOTAL_S:-560} left"
    echo "$why" >"$LOGS/bench_$name.log"
    rc=124
  else
    timeout "$seconds" "$PY" -m sft_jax.bench --config "$config" \
      --steps "${STEPS:-10}" --warmup "${WARMUP:-2}" "$@" 2>&1 | tee "$LOGS/bench_$name.log"
    rc=${PIPESTATUS[0]}
    why="exit $rc"
  fi
  if [ "$rc" -ne 0 ] || ! tail -n 1 "$LOGS/bench_$name.log" | grep -q '^{"workload"'; then
    local workload
    workload=$(basename "$config" .py)
    echo "{\"workload\": \"$workload\", \"mode\": \"$mode\", \"error\": \"$why\"}" \
      >>"$LOGS/bench_$name.log"
  fi
}

echo "=== cuDNN attention check: $PY benchmarks/gpu_checks.py"
timeout "$(limit 120)" "$PY" benchmarks/gpu_checks.py 2>&1 | tee "$LOGS/gpu_checks.log"

bench llama1b_full configs/bench/gpu_llama1b.py "$@"
bench llama1b_lora configs/bench/gpu_llama1b.py --config.lora.enabled=True "$@"
bench llama8b_lora configs/bench/gpu_llama8b.py "$@"
# The configs' settings are conservative (they fit an 80 GB H100); these two are the fastest
# settings measured on a 139 GB H200 (docs/benchmarks.md): four times the 1B tokens per step with
# the loss unchunked (69 GiB peak), and the 8B LoRA at twice the tokens without remat and with
# the loss unchunked (83 GiB peak).
bench llama1b_full_b16_nochunk configs/bench/gpu_llama1b.py \
  --config.train.global_batch_size=16 --config.model.loss_chunk=0 "$@"
bench llama8b_lora_b4_noremat_nochunk configs/bench/gpu_llama8b.py \
  --config.train.global_batch_size=4 --config.model.remat=none --config.model.loss_chunk=0 "$@"
if [ -n "${AB:-1}" ] && [ "${AB:-1}" != 0 ]; then  # AB=0 skips the lever A/B runs
  bench llama1b_full_xla configs/bench/gpu_llama1b.py --config.model.attention=xla "$@"
  bench llama1b_full_nochunk configs/bench/gpu_llama1b.py --config.model.loss_chunk=0 "$@"
fi

echo "=== JSON lines"
tail -n 1 "$LOGS/gpu_checks.log"
for name in llama1b_full llama1b_lora llama8b_lora llama1b_full_b16_nochunk \
  llama8b_lora_b4_noremat_nochunk llama1b_full_xla llama1b_full_nochunk; do
  [ -f "$LOGS/bench_$name.log" ] && tail -n 1 "$LOGS/bench_$name.log"
done
