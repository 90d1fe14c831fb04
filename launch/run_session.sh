#!/usr/bin/env bash
# run_session.sh CMD...: run CMD in a session of its own, pass SIGTERM/SIGINT on to every process of
# that session, and return only once all of them have exited, with CMD's exit status.
# Why: on SIGTERM DeepSpeed's runner (`deepspeed`) exits at once without telling its launcher, while
# the ranks still write their final checkpoint; Slurm (after a step's task exits) and Docker (after
# the container's main process exits) kill whatever is left. Used by launch/slurm/node.sh and
# docker/entrypoint.sh.
set -uo pipefail
setsid "$@" &
leader=$!
signalled=0
trap 'signalled=1; kill -TERM -- "-$leader" 2>/dev/null || true' TERM INT
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
exit "$status"
