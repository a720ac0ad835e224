#!/usr/bin/env bash
# N training processes on this machine's CPU, joined like the hosts of a pod (what tests/test_multihost.py
# runs). Each process gets DEVICES_PER_PROCESS fake CPU devices; cross-process collectives use gloo.
#
#   launch/local.sh [--dry-run] [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] \
#       -- --config configs/pix2pix_cityscapes.py:smoke --workdir /tmp/pix2pix_2proc [more ganjax.main flags]
#
# Variables (flags win): NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), COORDINATOR_PORT (free port from
# 12000 + PID % 20000), LOG_DIR (WORKDIR/logs), PYTHON (python3). Process i logs to LOG_DIR/process_<i>.log;
# process 0 is also echoed here. If one process fails the others are stopped (by PID) and its status is
# returned. --dry-run prints the commands and starts nothing.
set -euo pipefail

die() { echo "local.sh: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

DRY_RUN=0
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
COORDINATOR_PORT="${COORDINATOR_PORT:-$((12000 + $$ % 20000))}"
LOG_DIR="${LOG_DIR:-}"
PYTHON="${PYTHON:-python3}"

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -n) NUM_PROCESSES="${2:?-n needs a value}"; shift ;;
    -d) DEVICES_PER_PROCESS="${2:?-d needs a value}"; shift ;;
    -p) COORDINATOR_PORT="${2:?-p needs a value}"; shift ;;
    -l) LOG_DIR="${2:?-l needs a value}"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (ganjax.main flags go after --)" ;;
  esac
  shift
done
ARGS=("$@")

# ---- Validate everything before starting anything ------------------------------------------------
is_uint "$NUM_PROCESSES" && ((NUM_PROCESSES >= 1)) || die "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'"
is_uint "$DEVICES_PER_PROCESS" && ((DEVICES_PER_PROCESS >= 1)) ||
  die "DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'"
is_uint "$COORDINATOR_PORT" && ((COORDINATOR_PORT >= 1024 && COORDINATOR_PORT <= 65535)) ||
  die "COORDINATOR_PORT must be in [1024, 65535], got '$COORDINATOR_PORT'"
WORKDIR=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --workdir=*) WORKDIR="${ARGS[i]#--workdir=}" ;;
    --workdir) WORKDIR="${ARGS[i + 1]:-}" ;;
  esac
done
printf '%s\n' "${ARGS[@]}" | grep -q -- '^--config' || die "pass --config ... after -- (the ganjax.main flags)"
[[ -n "$WORKDIR" ]] || die "pass --workdir ... after -- (the ganjax.main flags)"
LOG_DIR="${LOG_DIR:-$WORKDIR/logs}"

# The device count is set here, whatever the caller's XLA_FLAGS said.
PROCESS_XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
read -r -a _xla <<<"${XLA_FLAGS:-}"
for flag in "${_xla[@]}"; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || PROCESS_XLA_FLAGS="$flag $PROCESS_XLA_FLAGS"
done

command_for() {  # the environment and command of process $1, one shell-quoted line
  printf 'JAX_PLATFORMS=cpu XLA_FLAGS=%q JAX_COORDINATOR_ADDRESS=localhost:%s JAX_NUM_PROCESSES=%s JAX_PROCESS_ID=%s ' \
    "$PROCESS_XLA_FLAGS" "$COORDINATOR_PORT" \
    "$NUM_PROCESSES" "$1"
  printf '%q ' "$PYTHON" -m ganjax.main "${ARGS[@]}" --distributed=on
  printf '> %q 2>&1\n' "$LOG_DIR/process_$1.log"
}

if ((DRY_RUN)); then
  echo "mkdir -p $(printf '%q' "$LOG_DIR")"
  for ((i = 0; i < NUM_PROCESSES; i++)); do command_for "$i"; done
  exit 0
fi

# ---- Run: start all, stop the rest when one fails ------------------------------------------------
mkdir -p "$LOG_DIR"
PIDS=()
stop_all() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  : >"$LOG_DIR/process_$i.log"
  env JAX_PLATFORMS=cpu XLA_FLAGS="$PROCESS_XLA_FLAGS" \
    JAX_COORDINATOR_ADDRESS="localhost:$COORDINATOR_PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES" \
    JAX_PROCESS_ID="$i" "$PYTHON" -m ganjax.main "${ARGS[@]}" --distributed=on >"$LOG_DIR/process_$i.log" 2>&1 &
  PIDS+=("$!")
done
tail -n +1 -f "$LOG_DIR/process_0.log" --pid="${PIDS[0]}" 2>/dev/null &
TAIL_PID=$!

# Poll rather than `wait -n`: portable across bash versions, and every exit status is read.
status=0
running=("${PIDS[@]}")
while ((${#running[@]})) && ((status == 0)); do
  sleep 1
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      wait "$pid" || status=$?
    fi
  done
  running=("${still[@]}")
done
if ((status != 0)); then
  echo "local.sh: a process failed (status $status); stopping the others. Logs: $LOG_DIR" >&2
  stop_all
fi
wait "${PIDS[@]}" 2>/dev/null || true
kill "$TAIL_PID" 2>/dev/null || true
exit "$status"
