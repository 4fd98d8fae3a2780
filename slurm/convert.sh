#!/bin/bash
# HF -> megatron conversion as a Slurm job (one process; it streams, so a CPU node will do):
#   sbatch slurm/convert.sh --hf /models/Llama-3.2-1B --out ckpt/llama1b [--target gvm ...]
#SBATCH --job-name=convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
CONTAINER_ARGS=()
if [ -n "${CONTAINER:-}" ]; then
    CONTAINER_ARGS=(--container-image="$CONTAINER"
                    --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
                    --container-workdir="$PWD")
fi
srun "${CONTAINER_ARGS[@]}" "${PYTHON:-python}" tools/convert_hf_to_megatron.py "$@"
