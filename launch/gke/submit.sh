#!/usr/bin/env bash
# Render launch/gke/jobset.yaml and apply it with kubectl (or print it with --dry-run).
#
#   launch/gke/submit.sh --name run1 --image IMAGE --accelerator tpu-v5p-slice --topology 2x2x4 \
#       --hosts 4 --chips-per-host 4 --pvc sft-workdir [--mount-path /workdir] [--gcsfuse] \
#       [--hf-token-secret hf-token[:KEY]] [--max-restarts 3] [--dry-run] \
#       -- --config configs/x.py --workdir /workdir/run1
#
# --pvc: a ReadWriteMany PersistentVolumeClaim every pod mounts at --mount-path (default
# /workdir): Filestore, or a Cloud Storage FUSE PersistentVolume (then add --gcsfuse, which
# asks GKE for the FUSE sidecar). --workdir must lie under --mount-path, or be a gs:// URL that
# every pod writes through Cloud Storage itself (the volume is mounted all the same).
# --hf-token-secret: a Secret whose key KEY (default "token") becomes HF_TOKEN in every pod
# (gated Hub models); the token itself never appears in the manifest. Exit code 42 (preempted,
# checkpoint saved) is retried by the JobSet restart policy; the run resumes from its last
# checkpoint in the workdir. The policy retries any failure up to --max-restarts: after 44 (a
# checkpoint could not be written: disk full or read-only) fix the volume first, or each retry
# fails again at its first save.
set -euo pipefail
NAME=""; IMAGE=""; ACCELERATOR=""; TOPOLOGY=""; HOSTS=""; CHIPS_PER_HOST=4; MAX_RESTARTS=3
PVC=""; MOUNT_PATH="/workdir"; gcsfuse=0; hf_secret=""; dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --topology) TOPOLOGY="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --chips-per-host) CHIPS_PER_HOST="$2"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --pvc) PVC="$2"; shift 2 ;;
    --mount-path) MOUNT_PATH="${2%/}"; shift 2 ;;
    --gcsfuse) gcsfuse=1; shift ;;
    --hf-token-secret) hf_secret="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for v in NAME IMAGE ACCELERATOR TOPOLOGY HOSTS PVC; do
  if [ -z "${!v}" ]; then echo "missing --$(echo "$v" | tr 'A-Z_' 'a-z-')" >&2; exit 2; fi
done
[ $# -gt 0 ] || { echo "missing training arguments after --" >&2; exit 2; }
case "$MOUNT_PATH" in
  /?*) ;;
  *) echo "--mount-path must be an absolute path, not '$MOUNT_PATH'" >&2; exit 2 ;;
esac

# The workdir: every pod must see the same files, so it is on the mounted volume or in a bucket.
workdir=""
prev=""
for a in "$@"; do
  case "$a" in --workdir=*) workdir="${a#--workdir=}" ;; esac
  [ "$prev" = "--workdir" ] && workdir="$a"
  prev="$a"
done
case "$workdir" in
  "") echo "missing --workdir in the training arguments" >&2; exit 2 ;;
  gs://?*) ;;
  "$MOUNT_PATH"/?*) ;;
  *)
    echo "--workdir $workdir is not under --mount-path $MOUNT_PATH: the pods would each write" \
      "their own local copy; use e.g. --workdir $MOUNT_PATH/$NAME" >&2
    exit 2 ;;
esac

TRAIN_ARGS=""
bs='\'; dq='"'
for a in "$@"; do  # YAML double-quoted strings: escape backslashes, then double quotes
  a="${a//"$bs"/"$bs$bs"}"; a="${a//"$dq"/"$bs$dq"}"
  TRAIN_ARGS="${TRAIN_ARGS:+$TRAIN_ARGS, }\"$a\""
done
# Multi-line blocks, one YAML line each, indented where their placeholder line stands.
POD_ANNOTATIONS=("annotations: {}")
[ "$gcsfuse" = 1 ] && POD_ANNOTATIONS=("annotations:" "  gke-gcsfuse/volumes: \"true\"")
ENV=("- name: PYTHONUNBUFFERED" "  value: \"1\"")
if [ -n "$hf_secret" ]; then
  secret_name="${hf_secret%%:*}"; secret_key="token"
  [ "$secret_name" != "$hf_secret" ] && secret_key="${hf_secret#*:}"
  ENV+=("- name: HF_TOKEN" "  valueFrom:" "    secretKeyRef:" "      name: $secret_name"
    "      key: $secret_key")
fi

# Render: drop the template's comment lines, expand block placeholders, then scalar ones.
render() {
  local line indent name value
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in \#*) continue ;; esac
    if [[ "$line" =~ ^([[:space:]]*)\$\{(POD_ANNOTATIONS|ENV)\}$ ]]; then
      indent="${BASH_REMATCH[1]}"; name="${BASH_REMATCH[2]}[@]"
      for value in "${!name}"; do printf '%s%s\n' "$indent" "$value"; done
      continue
    fi
    # TRAIN_ARGS last: text inside the training arguments is never taken for a placeholder.
    for name in NAME IMAGE ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST MAX_RESTARTS PVC \
      MOUNT_PATH TRAIN_ARGS; do
      line="${line//"\${$name}"/"${!name}"}"  # quoted: the value is inserted literally
    done
    printf '%s\n' "$line"
  done <"$(dirname "$0")/jobset.yaml"
}
manifest=$(render)
if [ "$dry_run" = 1 ]; then
  echo "kubectl apply -f -"
  echo "$manifest"
  exit 0
fi
echo "$manifest" | kubectl apply -f -
