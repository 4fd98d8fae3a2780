# Shared by the sbatch launchers: one task per node, each running torchrun over its devices.
# Environment knobs:
#   GPUS_PER_NODE   processes per node (default: the GPUs nvidia-smi lists, else 1)
#   PYTHON          the interpreter (default: python)
#   RUN_DIR         where logs go (default: runs/<job name>-<job id>); configs may also set it
#   CONTAINER       a container image: runs through pyxis (--container-image/--container-mounts)
#   CONTAINER_MOUNTS  pyxis mounts (default: the submit directory)
#   MASTER_PORT     rendezvous port (default: derived from the job id, so that two jobs on one
#                   node do not collide)

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-python}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 40000))}
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null || GPUS_PER_NODE=1
fi
# Hopper: megatron's TP communication overlap needs one CUDA connection per device.
if command -v nvidia-smi >/dev/null 2>&1; then export CUDA_DEVICE_MAX_CONNECTIONS=1; fi
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}}
mkdir -p "$RUN_DIR/logs"
CONTAINER_ARGS=()
if [ -n "${CONTAINER:-}" ]; then
    CONTAINER_ARGS=(--container-image="$CONTAINER"
                    --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
                    --container-workdir="$PWD")
fi

# launch MODULE ARGS...: the module under torchrun on every node; stdout/stderr to RUN_DIR/logs.
# A SIGUSR1 that reaches only this shell (sbatch --signal=B:USR1@T, scancel --batch) is passed on
# to the job step, whose trainers save and requeue the job; untrapped, it would kill the shell
# and fail the job. The shell exits with the step's status.
launch() {
    local module=$1
    shift
    echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x" \
         "$GPUS_PER_NODE process(es), master $MASTER_ADDR:$MASTER_PORT, logs in $RUN_DIR/logs"
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
        --output="$RUN_DIR/logs/%x-%j-node%n.log" \
        bash -c "exec $PYTHON -m megatron_dvpo.launch --nnodes=$SLURM_NNODES \
            --node-rank=\$SLURM_NODEID --nproc-per-node=$GPUS_PER_NODE \
            --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT -m $module $(printf '%q ' "$@")" &
    local step=$! status=0
    trap 'kill -USR1 "$step" 2>/dev/null || true' USR1
    while kill -0 "$step" 2>/dev/null; do
        wait "$step" || true  # a trapped signal ends a wait early; the step runs on
    done
    wait "$step" || status=$?  # bash keeps the finished step's status
    trap - USR1
    return "$status"
}
