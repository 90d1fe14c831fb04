#!/usr/bin/env bash
# Container entrypoint: `docker run ... IMAGE --config RUN.yaml [key=value ...] [--auto-resume]`.
# With NODE_RANK and MASTER_ADDR set (one container per node, host networking) it starts this node's
# share of a multi-node run (launch/multinode.sh, no ssh between containers); otherwise one node,
# one rank per visible GPU (`deepspeed launch/train.py`), or GPUS_PER_NODE ranks if set, with the
# rendezvous on MASTER_PORT if set (host networking: two jobs on one host must not share 29500).
# `adept-ds ...` or `bash` run as given.
set -euo pipefail
cd /opt/adept_ds
if [ "${1:-}" = "adept-ds" ] || [ "${1:-}" = "bash" ]; then
    exec "$@"  # other commands: adept-ds check/export/eval, a shell
fi
if [ -n "${NODE_RANK:-}" ]; then
    exec launch/run_session.sh launch/multinode.sh "${HOSTFILE:-/runs/hostfile}" "$NODE_RANK" "$MASTER_ADDR" "${MASTER_PORT:-29500}" "$@"
fi
runner=(deepspeed)
[ -n "${GPUS_PER_NODE:-}" ] && runner+=(--num_gpus "$GPUS_PER_NODE")
[ -n "${MASTER_PORT:-}" ] && runner+=(--master_port "$MASTER_PORT")
# run_session.sh: `docker stop`'s SIGTERM reaches every rank (the runner alone would die without
# passing it on), and the container lives until they have saved their checkpoint.
exec launch/run_session.sh "${runner[@]}" launch/train.py "$@"
