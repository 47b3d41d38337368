#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (directly or as a queued resource), copy this checkout
# to every worker, install, run the same command on all workers (logs stream back), delete.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --type v5p-32 [--version VERSION] [--queued] \
#       [--spot] [--keep] [--dry-run] -- --config configs/x.py --workdir /mnt/shared/run
#
# --dry-run prints the gcloud commands instead of running them. --keep leaves the TPU running.
# The workdir must be one directory every worker sees at the same path: a gs:// URL (the trainer
# writes it through Cloud Storage itself), a Filestore share, or a Cloud Storage FUSE mount on
# each worker (launch/README.md shows each).
set -euo pipefail
name=""; zone=""; type=""; version="v2-alpha-tpuv5"; queued=0; spot=0; keep=0; dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ -z "$name" ] || [ -z "$zone" ] || [ -z "$type" ] || [ $# -eq 0 ]; then
  echo "usage: $0 --name NAME --zone ZONE --type TYPE [...] -- TRAIN_ARGS" >&2
  exit 2
fi
# In dry-run mode print each command shell-quoted, so it can be pasted as is.
run() { if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
spot_flag=""; [ "$spot" = 1 ] && spot_flag="--spot"
if [ "$queued" = 1 ]; then
  run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
    --accelerator-type "$type" --runtime-version "$version" ${spot_flag:+"$spot_flag"}
  run gcloud compute tpus queued-resources describe "$name" --zone "$zone"
else
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" \
    --version "$version" ${spot_flag:+"$spot_flag"}
fi
root=$(cd "$(dirname "$0")/.." && pwd)
run gcloud compute tpus tpu-vm scp --recurse "$root" "$name":~/sft_jax --zone "$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/sft_jax && pip install -q -e . 'jax[tpu]'"
# Every worker runs the same module; jax.distributed detects the slice's hosts by itself.
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/sft_jax && python -m sft_jax.train $(printf '%q ' "$@")--config.distributed.expected_platform=tpu"
if [ "$keep" = 0 ]; then
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$name" --zone "$zone" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
  fi
fi
