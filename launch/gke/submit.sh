#!/usr/bin/env bash
# Render launch/gke/jobset.yaml and apply it with kubectl (or print it with --dry-run).
#
#   launch/gke/submit.sh --name run1 --image IMAGE --accelerator tpu-v5p-slice --topology 2x2x4 \
#       --hosts 4 --chips-per-host 4 [--max-restarts 3] [--dry-run] -- --config configs/x.py --workdir gs://b/run
#
# Exit code 42 (preempted, checkpoint saved) is retried by the JobSet restart policy; the run
# resumes from its last checkpoint in the workdir.
set -euo pipefail
NAME=""; IMAGE=""; ACCELERATOR=""; TOPOLOGY=""; HOSTS=""; CHIPS_PER_HOST=4; MAX_RESTARTS=3
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --topology) TOPOLOGY="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --chips-per-host) CHIPS_PER_HOST="$2"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for v in NAME IMAGE ACCELERATOR TOPOLOGY HOSTS; do
  if [ -z "${!v}" ]; then echo "missing --$(echo "$v" | tr 'A-Z_' 'a-z-')" >&2; exit 2; fi
done
[ $# -gt 0 ] || { echo "missing training arguments after --" >&2; exit 2; }
TRAIN_ARGS=""
for a in "$@"; do TRAIN_ARGS="${TRAIN_ARGS:+$TRAIN_ARGS, }\"${a//\"/\\\"}\""; done
template="$(dirname "$0")/jobset.yaml"
manifest=$(sed -e "s|\${NAME}|$NAME|g" -e "s|\${IMAGE}|$IMAGE|g" \
  -e "s|\${ACCELERATOR}|$ACCELERATOR|g" -e "s|\${TOPOLOGY}|$TOPOLOGY|g" \
  -e "s|\${HOSTS}|$HOSTS|g" -e "s|\${CHIPS_PER_HOST}|$CHIPS_PER_HOST|g" \
  -e "s|\${MAX_RESTARTS}|$MAX_RESTARTS|g" -e "s|\${TRAIN_ARGS}|$TRAIN_ARGS|g" "$template")
if [ "$dry_run" = 1 ]; then
  echo "kubectl apply -f -"
  echo "$manifest"
  exit 0
fi
echo "$manifest" | kubectl apply -f -
