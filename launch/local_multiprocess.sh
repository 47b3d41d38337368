#!/usr/bin/env bash
# Start N local processes of `python -m sft_jax.train` joined by jax.distributed (CPU collectives
# on CPU). Used by the tests to prove that several processes train exactly like one: each process
# reads only its data shard (data.shards, default one per process), and one process run with
# --config.data.shards=N sees the same global batches as N processes (docs/data.md).
#
#   launch/local_multiprocess.sh [--dry-run] [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] \
#       -- --config configs/tiny.py --workdir /tmp/mp
#
# Logs go to $LOG_DIR/process_<i>.log (default: a fresh temp dir). Exit code: the first non-zero
# exit code among the processes, else 0.
set -euo pipefail
n=2; devices=2; port=${PORT:-12355}; dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n) n="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument: $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
python_bin=${PYTHON:-python}
log_dir=${LOG_DIR:-$(mktemp -d)}
commands=()
for ((i = 0; i < n; i++)); do
  commands+=("XLA_FLAGS=--xla_force_host_platform_device_count=${devices} JAX_PLATFORMS=cpu \
${python_bin} -m sft_jax.train $* --config.distributed.coordinator_address=localhost:${port} \
--config.distributed.num_processes=${n} --config.distributed.process_id=${i}")
done
if [ "$dry_run" = 1 ]; then
  for c in "${commands[@]}"; do echo "$c"; done
  exit 0
fi
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  bash -c "${commands[$i]}" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  # `if ! wait` would leave $? as the negation (0); take the process's own exit code.
  code=0
  wait "$pid" || code=$?
  if [ "$code" != 0 ] && [ "$status" = 0 ]; then status=$code; fi
done
echo "logs: $log_dir" >&2
exit "$status"
