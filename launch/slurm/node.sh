#!/usr/bin/env bash
# One Slurm node's launcher (started once per node by `srun --ntasks-per-node=1` in the sbatch scripts).
# Derives from Slurm's environment what every node must agree on without talking to the others:
# the hostfile (the job's nodes, GPUS_PER_NODE slots each), this node's rank (SLURM_NODEID), the
# master (the job's first node, or MASTER_ADDR) and the port (MASTER_PORT, else one from the job id).
#
#   launch/slurm/node.sh --config RUN.yaml [key=value ...] [--auto-resume]
set -euo pipefail
repo=${ADEPT_DS_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# Ranks per node: GPUS_PER_NODE, else the GPUs Slurm gives the job (--gpus-per-node), else all nvidia-smi lists.
if [ -n "${GPUS_PER_NODE:-}" ]; then
    gpus_per_node=$GPUS_PER_NODE gpus_from=GPUS_PER_NODE
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    gpus_per_node=$SLURM_GPUS_ON_NODE gpus_from=SLURM_GPUS_ON_NODE
else
    gpus_per_node=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true) gpus_from=nvidia-smi
fi
if [ -z "$gpus_per_node" ] || [ "$gpus_per_node" = 0 ]; then
    echo "node.sh: no GPUs found on $(hostname); set GPUS_PER_NODE (ranks per node)" >&2
    exit 2
fi
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
master_addr=${MASTER_ADDR:-${hosts[0]}}
master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # same on every node, differs between jobs
hostfile=${TMPDIR:-/tmp}/adept_ds.$SLURM_JOB_ID.$SLURM_NODEID.hostfile
: >"$hostfile"
for host in "${hosts[@]}"; do
    echo "$host slots=$gpus_per_node" >>"$hostfile"
done
echo "node.sh: node $SLURM_NODEID of ${#hosts[@]} on $(hostname), master $master_addr:$master_port"
# nproc: the CPUs this step may use (its affinity), which the ranks share
echo "node.sh: $gpus_per_node GPUs (ranks) from $gpus_from (SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-unset}), $(nproc) CPUs"

# run_session.sh: this script stays the step's task until every rank has exited (a rank may still be
# writing its final checkpoint after the runner has gone), and SIGTERM reaches all of them.
exec "$repo/launch/run_session.sh" "$repo/launch/multinode.sh" "$hostfile" "$SLURM_NODEID" "$master_addr" "$master_port" "$@"
