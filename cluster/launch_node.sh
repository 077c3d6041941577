#!/usr/bin/env bash
# Start one node's training ranks as direct children of this script, one per accelerator, and exit
# with a code the cluster templates act on: 75 when the ranks stopped for a preemption notice
# (requeue), 4 when a rank was lost (killed by a signal, as by the OOM killer, or stopped because a
# peer was), the first failing rank's code when one failed otherwise, else 0. Used by
# slurm/train.sbatch and k8s/job.yaml; every argument goes to pretrain/main.py.
#
# Needs bash >= 5.1. Environment: NNODES, NODE_RANK, PROCS_PER_NODE, MASTER_ADDR (required); MASTER_PORT (29500);
# FORWARD_SIGNALS=1 to pass SIGTERM/SIGUSR1 on to the ranks, where the scheduler signals only this
# process (Kubernetes signals PID 1); leave it 0 where every process is signalled (Slurm), or the
# ranks would see each notice twice, and a second notice means "stop at once".
set -u
: "${NNODES:?}" "${NODE_RANK:?}" "${PROCS_PER_NODE:?}" "${MASTER_ADDR:?}"
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}"
PREEMPTED=75
LOST_RANK=4
STOP_GRACE_S=${STOP_GRACE_S:-30}  # after a rank fails, the others get this long to say why they stop, then SIGKILL
here=$(cd "$(dirname "$0")/.." && pwd)

pids=()
for ((i = 0; i < PROCS_PER_NODE; i++)); do
  RANK=$((NODE_RANK * PROCS_PER_NODE + i)) LOCAL_RANK=$i WORLD_SIZE=$((NNODES * PROCS_PER_NODE)) \
    LOCAL_WORLD_SIZE=$PROCS_PER_NODE python "$here/pretrain/main.py" "$@" &
  pids+=($!)
done
if [ "${FORWARD_SIGNALS:-0}" = 1 ]; then
  trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
  trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
else
  trap '' TERM USR1  # the ranks got the notice themselves; this script waits for their verdict
fi

# Reap ranks as they exit (bash >= 5.1 for wait -p). A failed rank leaves the others blocked in a
# collective: they notice the lost peer themselves (exit 4, naming it and the step), and are
# killed if they have not within STOP_GRACE_S; preempted ranks all exit by themselves.
status=0 preempted=0 running=("${pids[@]}") killer=""
while [ "${#running[@]}" -gt 0 ]; do
  finished=""
  wait -n -p finished "${running[@]}"
  code=$?
  [ -z "${finished:-}" ] && continue  # a trapped signal interrupted the wait (and unset finished)
  still=()
  for pid in "${running[@]}"; do [ "$pid" = "$finished" ] || still+=("$pid"); done
  running=("${still[@]}")
  if [ "$code" -eq "$PREEMPTED" ]; then
    preempted=1
  elif [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    if [ "$code" -gt 128 ]; then
      echo "launch_node.sh: rank pid $finished was killed by signal $((code - 128)); stopping this node's ranks" >&2
      status=$LOST_RANK
    fi
    (sleep "$STOP_GRACE_S" && kill -KILL "${pids[@]}") >/dev/null 2>&1 &
    killer=$!
  fi
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null
if [ "$status" -ne 0 ]; then exit "$status"; fi
if [ "$preempted" -eq 1 ]; then exit "$PREEMPTED"; fi
exit 0
