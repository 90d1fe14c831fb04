#!/usr/bin/env bash
# Container entrypoint: `docker run ... IMAGE --config RUN.yaml [key=value ...] [--auto-resume]`.
# With NODE_RANK and MASTER_ADDR set (one container per node, host networking) it starts this node's
# share of a multi-node run (launch/multinode.sh, no ssh between containers); otherwise one node,
# one rank per visible GPU (`deepspeed launch/train.py`), or GPUS_PER_NODE ranks if set, with the
# rendezvous on MASTER_PORT if set (host networking: two jobs on one host must not share 29500).
# `adept-ds ...` or `bash` run as given.
set -euo pipefail
# HOME and the caches must be writable for any uid: `--user` with a uid the image does not know gets
# HOME=/, where DeepSpeed's ops JIT-built at run time would fail writing /.cache/torch_extensions.
if [ ! -d "${HOME:-}" ] || [ ! -w "$HOME" ]; then
    export HOME="/tmp/home-$(id -u)"
    mkdir -p "$HOME"
fi
# The volume's cache when writable, so that a JIT-built op outlives the container; else one under HOME.
if ! { mkdir -p "${ADEPT_DS_CACHE:-}" && [ -w "$ADEPT_DS_CACHE" ]; } 2>/dev/null; then
    echo "entrypoint: ADEPT_DS_CACHE=${ADEPT_DS_CACHE:-} is not writable for uid $(id -u); using $HOME/.cache/adept_ds (mount a volume there to keep it)" >&2
    export ADEPT_DS_CACHE="$HOME/.cache/adept_ds"
fi
# Ops per Python and torch build: a volume shared with an image of another torch must not load its ops.
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
    torch_build=$(python -c 'import importlib.metadata as m, sys; print("py%d%d_torch%s" % (*sys.version_info[:2], m.version("torch")))')
    export TORCH_EXTENSIONS_DIR="$ADEPT_DS_CACHE/torch_extensions/$torch_build"
fi
# Other caches that would go under HOME (lost with the container), unless set: Triton, matplotlib, Hugging Face.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ADEPT_DS_CACHE/triton}" MPLCONFIGDIR="${MPLCONFIGDIR:-$ADEPT_DS_CACHE/matplotlib}"
export HF_HOME="${HF_HOME:-$ADEPT_DS_CACHE/huggingface}"
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
