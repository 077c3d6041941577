#!/usr/bin/env bash
# A stand-in for pretrain/main.py that cluster/launch_node.sh starts through PYTHON=, so that every
# exit path of the launcher can be driven with 8 ranks in a second. FAKE_PLAN:
#   ok        exit 0
#   one_fails rank FAKE_RANK exits FAKE_CODE (or, with FAKE_CODE=kill, is killed by SIGKILL); the others hang in a "collective" until killed, or,
#             with FAKE_PEERS=notice, exit 4 half a second later (they noticed the lost peer)
#   all_fail  every rank exits FAKE_CODE at the same moment
#   preempt   wait for SIGTERM or SIGUSR1, then exit 75 (a checkpoint was committed)
# Each rank writes its pid to $FAKE_DIR/rank-<RANK>.pid, so a test can check none is left running.
echo $$ >"$FAKE_DIR/rank-$RANK.pid"
case "$FAKE_PLAN" in
  ok) sleep 0.3; exit 0 ;;
  one_fails)
    if [ "$RANK" = "$FAKE_RANK" ]; then
      sleep 0.3
      [ "$FAKE_CODE" = kill ] && kill -KILL $$
      exit "$FAKE_CODE"
    fi
    if [ "${FAKE_PEERS:-hang}" = notice ]; then sleep 0.8; exit 4; fi ;;
  all_fail) sleep 0.3; exit "$FAKE_CODE" ;;
  preempt) trap 'exit 75' TERM USR1 ;;
esac
while true; do sleep 0.05; done
