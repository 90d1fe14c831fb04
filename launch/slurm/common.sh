# Sourced by the sbatch scripts: run the training job step and requeue the job when it is preempted.

# Where the repository is: sbatch runs a copy of the script from Slurm's spool, so not dirname $0.
ADEPT_DS_REPO=${ADEPT_DS_REPO:-$SLURM_SUBMIT_DIR}

# node_cpus: the CPUs the allocation grants on each node, for `srun --cpus-per-task`: srun >= 22.05 does not
# take sbatch's --cpus-per-task, and without one a task bound to its cores (TaskPluginParam=Cores, common) gets
# a single CPU, which would then hold the launcher, every rank and the tokeniser pool.
# SLURM_JOB_CPUS_PER_NODE reads like `72(x2),64`: take the smallest count, so that the step fits every node.
node_cpus() {
    local counts=${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}} count least=
    for count in ${counts//,/ }; do
        count=${count%%(*}
        if [ -z "$least" ] || [ "$count" -lt "$least" ]; then least=$count; fi
    done
    echo "$least"
}

# run_requeueable CMD...: run CMD (an srun job step) and wait for it. On SIGTERM (sent ahead of the
# time limit by `#SBATCH --signal=B:TERM@...`, or by `scancel --batch --signal=TERM`) pass the signal
# to every process of the job's steps as SIGUSR1 (the ranks then save a checkpoint at the next step
# boundary and exit; DeepSpeed's launcher would SIGKILL them 30 s after a SIGTERM), wait for them,
# and put the job back in the queue; the rerun continues with --auto-resume.
run_requeueable() {
    local preempted=0 status=0 pid
    trap 'preempted=1; echo "adept_ds: SIGTERM: checkpointing, then requeueing job $SLURM_JOB_ID"; scancel --signal=USR1 "$SLURM_JOB_ID"' TERM
    "$@" &
    pid=$!
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the step itself
        status=0
        wait "$pid" || status=$?
    done
    trap - TERM
    if [ "$preempted" = 1 ]; then
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}
