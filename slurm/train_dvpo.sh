#!/bin/bash
# DVPO policy training on Slurm. Submit from the repository root:
#   sbatch --nodes=2 --gpus-per-node=8 slurm/train_dvpo.sh --config CONFIG.yaml [key=value ...]
# Five minutes before the time limit Slurm sends SIGUSR1: the trainers finish their step, save,
# requeue the job and exit; the requeued job resumes from that checkpoint (--requeue).
#SBATCH --job-name=dvpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
launch megatron_dvpo.rl.dvpo "$@"
