#!/usr/bin/env bash
# run_session.sh CMD...: run CMD in a session of its own; on SIGTERM/SIGINT/SIGUSR1 send SIGUSR1 to
# every process of that session, and return only once all of them have exited.
# Why: the ranks save a checkpoint and exit on SIGUSR1 (as on SIGTERM), but DeepSpeed's processes
# handle SIGTERM badly: its runner (`deepspeed`) exits at once without passing it on, and its
# launcher SIGKILLs every rank 30 s after its own SIGTERM, checkpoint written or not. SIGUSR1 just
# ends those two, and nothing limits the ranks' time to save. Slurm (after a step's task exits)
# and Docker (after the main process exits) kill whatever is left: hence the wait for the session.
# Used by launch/slurm/node.sh and docker/entrypoint.sh.
set -uo pipefail
setsid "$@" &
leader=$!
signalled=0
stopped=0
trap 'signalled=1; stopped=1; kill -USR1 -- "-$leader" 2>/dev/null || true' TERM INT USR1
wait "$leader"
status=$?
while [ "$signalled" = 1 ]; do  # a trapped signal ends `wait` early: wait again for CMD's own status
    signalled=0
    wait "$leader"
    status=$?
done
while pgrep -s "$leader" >/dev/null; do  # the ranks may outlive the runner by a checkpoint's time
    sleep 1
done
[ "$stopped" = 1 ] && exit 143  # stopped as asked (the runner itself died of SIGUSR1)
exit "$status"
