#!/usr/bin/env bash
# Start one node's training ranks as direct children of this script, one per accelerator, and exit
# with a code the cluster templates act on (cluster/README.md, "Exit codes"):
#   0                    every rank finished
#   75 (PREEMPTED_EXIT)  the ranks stopped for a preemption notice, with a committed checkpoint: requeue
#   4  (LOST_PEER_EXIT)  the ranks stopped because a rank elsewhere was lost; this node is healthy: restart
#   128+n                a rank here was killed by signal n (137: SIGKILL, as by the OOM killer)
#   other                the first failing rank's code (2: a bad config or bad data, 3: a save failed)
# Every argument goes to pretrain/main.py. Used by slurm/train.sbatch and the k8s/ manifests.
#
# Needs bash >= 5.1. Environment: NNODES, NODE_RANK, PROCS_PER_NODE, MASTER_ADDR (required);
# MASTER_PORT (29500); PYTHON (python); PREEMPTED_EXIT and LOST_PEER_EXIT replace 75 and 4 for
# schedulers that read exit codes their own way (Kubeflow's ExitCode policy retries only 128-255);
# STOP_GRACE_S (30): after a rank fails, how long the others have to stop by themselves (naming a
# lost peer) before they are killed; FORWARD_SIGNALS=1 to pass SIGTERM/SIGUSR1 on to the ranks
# where the scheduler signals only this process (Kubernetes signals PID 1). Leave it 0 where every
# process is signalled (Slurm), or the ranks would see each notice twice, and a second notice means
# "stop at once".
set -u
: "${NNODES:?}" "${NODE_RANK:?}" "${PROCS_PER_NODE:?}" "${MASTER_ADDR:?}"
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}"
PREEMPTED=75  # what pretrain/main.py exits with after a preemption notice
LOST_PEER=4   # ... and after a peer was lost
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

running=() failure="" lost_peer=0 preempted=0 deadline=0 stopping=0  # deadline: set when a rank fails
stop_ranks() {  # kill the ranks still running; their deaths are this script's doing, not failures
  stopping=1
  kill -KILL "${running[@]}" 2>/dev/null
}
# A handler for every notice: as a container's PID 1 this script would otherwise never receive them,
# and a trapped signal only interrupts the polling below, never this script.
notice() {  # $1: the signal this script received
  if [ "$deadline" -gt 0 ]; then
    stop_ranks  # a rank has failed, so no checkpoint can come: stop now
  elif [ "${FORWARD_SIGNALS:-0}" = 1 ]; then
    kill -"$1" "${running[@]}" 2>/dev/null
  fi  # else the ranks got the notice themselves; this script waits for their verdict
}
trap 'notice TERM' TERM
trap 'notice USR1' USR1

for ((i = 0; i < PROCS_PER_NODE; i++)); do
  RANK=$((NODE_RANK * PROCS_PER_NODE + i)) LOCAL_RANK=$i WORLD_SIZE=$((NNODES * PROCS_PER_NODE)) \
    LOCAL_WORLD_SIZE=$PROCS_PER_NODE "${PYTHON:-python}" "$here/pretrain/main.py" "$@" &
  running+=($!)
done

record() {  # $1: a rank's pid, $2: its exit code
  local code=$2
  if [ "$code" -eq "$PREEMPTED" ]; then
    preempted=1
    return
  fi
  [ "$code" -eq 0 ] && return
  [ "$stopping" -eq 1 ] && [ "$code" -gt 128 ] && return
  if [ "$code" -eq "$LOST_PEER" ]; then lost_peer=1; elif [ -z "$failure" ]; then failure=$code; fi
  if [ "$deadline" -eq 0 ]; then
    local why="exited $code"
    [ "$code" -gt 128 ] && why="was killed by signal $((code - 128))"
    echo "launch_node.sh: rank pid $1 $why; the others on this node have ${STOP_GRACE_S:-30} s to stop" >&2
    deadline=$((${EPOCHREALTIME/./} + ${STOP_GRACE_S:-30} * 1000000))  # microseconds
  fi
}

# Reap ranks as they exit, by polling: each rank that is no longer alive gives its code to `wait
# PID`. (`wait -n` loses codes: interrupted by a trapped signal, or when bash reaps several ranks
# at once, it answers 127 or -1 for ranks that did exit.)
while [ "${#running[@]}" -gt 0 ]; do
  sleep 0.2
  if [ "$deadline" -gt 0 ] && [ "$stopping" -eq 0 ] && [ "${EPOCHREALTIME/./}" -ge "$deadline" ]; then
    stop_ranks
  fi
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    elif [ "$stopping" -eq 0 ]; then
      wait "$pid"
      record "$pid" $?
    fi
  done
  running=("${still[@]}")
done
if [ -n "$failure" ]; then exit "$failure"; fi
if [ "$lost_peer" -eq 1 ]; then exit "${LOST_PEER_EXIT:-$LOST_PEER}"; fi
if [ "$preempted" -eq 1 ]; then exit "${PREEMPTED_EXIT:-$PREEMPTED}"; fi
exit 0
