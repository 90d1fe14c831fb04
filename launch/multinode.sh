#!/usr/bin/env bash
# One node's share of a multi-node run without ssh between nodes (DeepSpeed's --no_ssh mode).
# Start it on every node of the hostfile, each with its own node rank, all with the same master:
#
#   launch/multinode.sh HOSTFILE NODE_RANK MASTER_ADDR MASTER_PORT --config RUN.yaml [key=value ...] [--auto-resume]
#
# Node 0 serves the rendezvous at MASTER_ADDR:MASTER_PORT; a node waits there for the others.
set -euo pipefail
if [ $# -lt 5 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
hostfile=$1 node_rank=$2 master_addr=$3 master_port=$4
shift 4
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
num_nodes=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$hostfile")

# Fail on a bad config, path or batch arithmetic here, before any rank waits on its peers.
check_args=()
for arg in "$@"; do
    case $arg in --resume | --auto-resume) ;; *) check_args+=("$arg") ;; esac
done
dry=${ADEPT_DS_DRY_RUN:+echo}  # ADEPT_DS_DRY_RUN=1 prints the commands instead of running them
$dry adept-ds check --hostfile "$hostfile" "${check_args[@]}"

exec $dry deepspeed --hostfile "$hostfile" --no_ssh --num_nodes "$num_nodes" --node_rank "$node_rank" \
    --master_addr "$master_addr" --master_port "$master_port" "$repo/launch/train.py" "$@"
