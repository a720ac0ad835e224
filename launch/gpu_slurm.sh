#!/usr/bin/env bash
# Multi-GPU training under SLURM: one process per node (default; it drives all of the node's GPUs) or one
# process per GPU (--per-gpu), joined by jax.distributed with the coordinator on the job's first node.
#
#   sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=32 launch/gpu_slurm.sh -- \
#       --config configs/pix2pix_cityscapes.py --workdir /shared/runs/cityscapes \
#       --config.data.data_dir=/shared/tensorflow_datasets
#   (or inside `salloc --nodes=2 --gpus-per-node=8`: launch/gpu_slurm.sh [--per-gpu] -- ...)
#
# Required (set by the allocation): SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES; with --per-gpu
# also the GPUs per node: GPUS_PER_NODE or SLURM_GPUS_ON_NODE. Optional: COORDINATOR_PORT (default
# 20000 + job id % 20000), PYTHON (python3; e.g. the venv's python on the shared file system),
# SRUN_ARGS (extra srun options). Every process gets JAX_COORDINATOR_ADDRESS=<first node>:<port>,
# JAX_NUM_PROCESSES=$SLURM_NTASKS, JAX_PROCESS_ID=$SLURM_PROCID (and JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID
# per GPU). The workdir and the TFDS data_dir must be on storage every node sees.
# --dry-run prints the srun command (nothing of SLURM needs to be installed).
set -euo pipefail

die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

DRY_RUN=0
PER_GPU=0
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --per-gpu) PER_GPU=1 ;;
    --per-node) PER_GPU=0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (ganjax.main flags go after --)" ;;
  esac
  shift
done
ARGS=("$@")

# ---- Validate everything before starting anything ------------------------------------------------
for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES; do
  [[ -n "${!var:-}" ]] || die "$var is not set: run inside a SLURM allocation (sbatch or salloc)"
done
is_uint "$SLURM_JOB_NUM_NODES" && ((SLURM_JOB_NUM_NODES >= 1)) || die "SLURM_JOB_NUM_NODES='$SLURM_JOB_NUM_NODES'"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
if ((PER_GPU)); then
  [[ -n "$GPUS_PER_NODE" ]] || die "--per-gpu needs GPUS_PER_NODE (or SLURM_GPUS_ON_NODE from --gpus-per-node)"
  is_uint "$GPUS_PER_NODE" && ((GPUS_PER_NODE >= 1)) || die "GPUS_PER_NODE must be a positive integer"
fi
is_uint "$SLURM_JOB_ID" || die "SLURM_JOB_ID='$SLURM_JOB_ID' is not a number"
COORDINATOR_PORT="${COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
is_uint "$COORDINATOR_PORT" && ((COORDINATOR_PORT >= 1024 && COORDINATOR_PORT <= 65535)) ||
  die "COORDINATOR_PORT must be in [1024, 65535], got '$COORDINATOR_PORT'"
printf '%s\n' "${ARGS[@]}" | grep -q -- '^--config' || die "pass --config ... after -- (the ganjax.main flags)"
printf '%s\n' "${ARGS[@]}" | grep -q -- '^--workdir' || die "pass --workdir ... after -- (the ganjax.main flags)"
PYTHON="${PYTHON:-python3}"

first_host() {  # the first host of a SLURM node list: "a01", "a[01-04],b7", "a[01,03]" -> a01
  local list="$1" prefix rest
  prefix="${list%%[\[,]*}"
  rest="${list:${#prefix}}"
  if [[ "$rest" == \[* ]]; then
    rest="${rest:1}"
    echo "${prefix}${rest%%[],-]*}"
  else
    echo "$prefix"
  fi
}
COORDINATOR="$(first_host "$SLURM_JOB_NODELIST"):$COORDINATOR_PORT"

if ((PER_GPU)); then
  NTASKS=$((SLURM_JOB_NUM_NODES * GPUS_PER_NODE))
  PER_NODE="$GPUS_PER_NODE"
  LOCAL_IDS=' JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID'  # each process drives one of the node's GPUs
else
  NTASKS="$SLURM_JOB_NUM_NODES"
  PER_NODE=1
  LOCAL_IDS=''
fi

# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID exist only inside each task: single quotes keep them there.
TASK="export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=\$SLURM_NTASKS JAX_PROCESS_ID=\$SLURM_PROCID"
TASK+="$LOCAL_IDS; exec $(printf '%q ' "$PYTHON" -m ganjax.main "${ARGS[@]}")--distributed=on"
read -r -a EXTRA <<<"${SRUN_ARGS:-}"
COMMAND=(srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$NTASKS" --ntasks-per-node="$PER_NODE"
  --kill-on-bad-exit=1 "${EXTRA[@]}" bash -c "$TASK")

if ((DRY_RUN)); then  # the task script single-quoted, as one would type it
  printf '%q ' "${COMMAND[@]:0:${#COMMAND[@]}-1}"
  printf "'%s'\n" "${TASK//\'/\'\\\'\'}"
  exit 0
fi
command -v srun >/dev/null || die "srun not found: run on a SLURM cluster"
exec "${COMMAND[@]}"
