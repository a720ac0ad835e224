#!/usr/bin/env bash
# Training on a Cloud TPU VM, one host or a pod slice: create the VM or reuse it, stop training processes
# that still hold the TPU (a previous run), copy this checkout (or clone REPO_URL) to every worker,
# install it with the [tpu] extra, and start the same ganjax.main command on all workers (--worker=all).
# --distributed=on: JAX finds the other workers from the TPU metadata (one worker is fine too).
#
#   TPU_NAME=ganjax-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu_vm.sh -- \
#       --config configs/pix2pix_cityscapes.py --workdir /mnt/gcs/runs/cityscapes \
#       --config.data.data_dir=/mnt/gcs/tensorflow_datasets
#
# Required: TPU_NAME, ZONE, and ACCELERATOR_TYPE (e.g. v4-8, v4-32, v5litepod-16) unless --skip-create.
# Optional: PROJECT (gcloud's default project), RUNTIME_VERSION (tpu-ubuntu2204-base), SPOT=1 (a spot VM),
#   REPO_URL [+ REPO_REF] (git clone on the workers instead of copying this checkout), REMOTE_DIR (ganjax,
#   under the remote home), PYTHON_VERSION (3.11, what pyproject.toml requires), GCS_BUCKET [+ MOUNT_POINT,
#   default /mnt/gcs] (gcsfuse-mount a bucket on every worker: the workdir and the TFDS data_dir must be on
#   storage all workers see).
# Steps: --skip-create (the VM exists), --skip-setup (code and venv are in place: relaunch only),
#   --stop (only stop the training on all workers), --follow (tail worker 0's log after the start).
# Each worker logs to ~/ganjax_train.log; its process group id is in ~/ganjax_train.pid.
# --dry-run prints the gcloud commands (gcloud need not be installed).
set -euo pipefail

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

DRY_RUN=0 SKIP_CREATE=0 SKIP_SETUP=0 STOP_ONLY=0 FOLLOW=0
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --stop) STOP_ONLY=1 ;;
    --follow) FOLLOW=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (ganjax.main flags go after --)" ;;
  esac
  shift
done
ARGS=("$@")

# ---- Validate everything before touching the cloud -----------------------------------------------
[[ -n "${TPU_NAME:-}" ]] || die "TPU_NAME is not set (the TPU VM to create or reuse)"
[[ -n "${ZONE:-}" ]] || die "ZONE is not set (e.g. us-central2-b)"
if ((!SKIP_CREATE && !STOP_ONLY)); then
  [[ -n "${ACCELERATOR_TYPE:-}" ]] || die "ACCELERATOR_TYPE is not set (e.g. v4-32), or pass --skip-create"
fi
if ((!STOP_ONLY)); then
  printf '%s\n' "${ARGS[@]}" | grep -q -- '^--config' || die "pass --config ... after -- (the ganjax.main flags)"
  printf '%s\n' "${ARGS[@]}" | grep -q -- '^--workdir' || die "pass --workdir ... after -- (the ganjax.main flags)"
fi
[[ "${REPO_REF:-}" && -z "${REPO_URL:-}" ]] && die "REPO_REF needs REPO_URL"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
REMOTE_DIR="${REMOTE_DIR:-ganjax}"
MOUNT_POINT="${MOUNT_POINT:-/mnt/gcs}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/ganjax-src-$TPU_NAME.tgz"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project="$PROJECT")

quote() {  # one word as one would type it: bare, or single-quoted (after a --flag= prefix)
  local word="$1" prefix=""
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$word"
    return
  fi
  if [[ "$word" =~ ^(--[a-z-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
}
run() {  # prints the command (--dry-run) or runs it
  if ((DRY_RUN)); then
    local word line=""
    for word in "$@"; do line+="$(quote "$word") "; done
    echo "${line% }"
  else
    "$@"
  fi
}
on_workers() {  # one shell command on every worker, in parallel
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI and run gcloud auth login"
fi

# ---- 1. The VM: reuse it if it exists --------------------------------------------------------------
if ((!SKIP_CREATE && !STOP_ONLY)); then
  if ((DRY_RUN)); then
    echo "# if \`$(run "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}")\` fails:"
  fi
  if ((DRY_RUN)) || ! "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" >/dev/null 2>&1; then
    CREATE=("${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
      --version="$RUNTIME_VERSION")
    [[ "${SPOT:-0}" == 1 ]] && CREATE+=(--spot)
    run "${CREATE[@]}"
  else
    echo "Reusing TPU VM $TPU_NAME in $ZONE."
  fi
fi

# ---- 2. Stop what holds the TPU: our last run's process group, then any process with the device open ---
STOP='if [ -f ~/ganjax_train.pid ]; then kill -- -"$(cat ~/ganjax_train.pid)" 2>/dev/null; sleep 5; fi; '
STOP+='pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u); '
STOP+='if [ -n "$pids" ]; then sudo kill -9 $pids; fi; sudo rm -f /tmp/libtpu_lockfile ~/ganjax_train.pid'
on_workers "$STOP"
((STOP_ONLY)) && exit 0

# ---- 3. Code and environment on every worker -------------------------------------------------------
if ((!SKIP_SETUP)); then
  if [[ -n "${REPO_URL:-}" ]]; then
    FETCH="rm -rf ~/$REMOTE_DIR && git clone -q $(printf '%q' "$REPO_URL") ~/$REMOTE_DIR"
    [[ -n "${REPO_REF:-}" ]] && FETCH+=" && git -C ~/$REMOTE_DIR checkout -q $(printf '%q' "$REPO_REF")"
  else
    # Tracked and untracked-but-not-ignored files of this checkout: what `git status` shows.
    if ((DRY_RUN)); then
      echo "# (cd $ROOT && git ls-files -z -co --exclude-standard | tar --null -T - -czf $TARBALL)"
    else
      (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$TARBALL")
    fi
    run "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:/tmp/ganjax-src.tgz" "${WHERE[@]}" --worker=all
    FETCH="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/ganjax-src.tgz -C ~/$REMOTE_DIR"
  fi
  PY="python$PYTHON_VERSION"
  SETUP="set -e; $FETCH; "
  SETUP+="if ! command -v $PY >/dev/null; then sudo apt-get update -qq && "
  SETUP+="sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PY $PY-venv; fi; "
  SETUP+="$PY -m venv ~/ganjax-venv && ~/ganjax-venv/bin/pip install -q -U pip && "
  SETUP+="~/ganjax-venv/bin/pip install -q -e ~/$REMOTE_DIR'[tpu]'"
  if [[ -n "${GCS_BUCKET:-}" ]]; then
    # gcsfuse from Google's apt repository (https://cloud.google.com/storage/docs/gcsfuse-install).
    SETUP+="; if ! command -v gcsfuse >/dev/null; then "
    SETUP+='echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
    SETUP+='gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && '
    SETUP+='curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee '
    SETUP+='/usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -qq && '
    SETUP+='sudo apt-get install -y -qq gcsfuse; fi; '
    SETUP+="sudo mkdir -p $MOUNT_POINT && sudo chown \$USER $MOUNT_POINT && "
    # Orbax finishes a checkpoint by renaming its temporary folder: gcsfuse needs --rename-dir-limit for it.
    SETUP+="(mountpoint -q $MOUNT_POINT || gcsfuse --implicit-dirs --rename-dir-limit=200000 "
    SETUP+="$(printf '%q' "$GCS_BUCKET") $MOUNT_POINT)"
  fi
  on_workers "$SETUP"
fi

# ---- 4. The same command on every worker, detached, in its own process group ----------------------
TRAIN="cd ~/$REMOTE_DIR && setsid nohup ~/ganjax-venv/bin/python -m ganjax.main"
TRAIN+=" $(printf '%q ' "${ARGS[@]}")--distributed=on > ~/ganjax_train.log 2>&1 < /dev/null &"
TRAIN+=" echo \$! > ~/ganjax_train.pid"
on_workers "$TRAIN"
note() { if ((DRY_RUN)); then echo "# $*"; else echo "$*"; fi; }
note "Started on all workers of $TPU_NAME. Follow worker 0 with:"
note "  $(DRY_RUN=1 run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command='tail -f ~/ganjax_train.log')"
if ((FOLLOW)); then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command='tail -f ~/ganjax_train.log'
fi
