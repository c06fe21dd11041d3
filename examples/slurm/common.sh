# shellcheck shell=bash
# Shared by the examples/slurm/*.sbatch scripts (sourced, never run on its own): the environment of
# every step, and a preemption-safe `mgrpo launch`. The planning, host assignment and command lines
# all live in `mgrpo launch`; this file only sets the environment and handles signals.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

# One log directory per job; a requeued job keeps its id and appends to the same files.
export LOG_DIR="${LOG_DIR:-logs/${SLURM_JOB_NAME:-mgrpo}-${SLURM_JOB_ID:-local}}"
mkdir -p "$LOG_DIR"

# NCCL over InfiniBand; override any of these from the submitting shell for another fabric.
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# megatron-core's tensor-parallel communication overlap expects a single hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1

# Container (pyxis/enroot): CONTAINER_IMAGE runs every srun step, servers and trainer, inside that
# image. By default the submit directory is mounted at the same path and is the working directory,
# so the relative paths of the run (config, data, runs/, logs/) mean the same inside and outside;
# CONTAINER_MOUNTS and CONTAINER_WORKDIR replace those defaults.
container_overrides=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    container_overrides=("launch.container_image=$CONTAINER_IMAGE"
        "launch.container_mounts=${CONTAINER_MOUNTS:-$PWD:$PWD}"
        "launch.container_workdir=${CONTAINER_WORKDIR:-$PWD}")
fi

# run_mgrpo CONFIG MODEL_CONFIG [KEY=VALUE ...]
# Runs `mgrpo launch` in the background so that the USR1 Slurm sends before the time limit
# (#SBATCH --signal=B:USR1@...) reaches this shell; the trap forwards it to the launcher, which
# forwards it to every trainer rank: they save a checkpoint and exit. The job is then requeued,
# and the same command continues from the newest complete checkpoint (checkpoint.resume=true).
# MGRPO_DRY_RUN=1 prints the plan and the commands instead of running them.
run_mgrpo() {
    local config=$1 model_config=$2
    shift 2
    local launch_pid status=0 preempted=0
    mgrpo launch --config "$config" --model-config "$model_config" --log-dir "$LOG_DIR" \
        ${MGRPO_DRY_RUN:+--dry-run} "log.out_dir=runs/${SLURM_JOB_ID:-local}" checkpoint.resume=true \
        "launch.engine_python=${ENGINE_PYTHON:-python3}" "${container_overrides[@]}" "$@" &
    launch_pid=$!
    trap 'preempted=1; kill -USR1 "$launch_pid" 2>/dev/null || true' USR1
    # `wait` returns early when a trapped signal arrives: keep waiting until the launcher is gone.
    while true; do
        wait "$launch_pid" && status=0 || status=$?
        kill -0 "$launch_pid" 2>/dev/null || break
    done
    trap - USR1
    if [[ $preempted == 1 ]]; then
        echo "preempted: checkpoint written (launcher exit $status), requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}
