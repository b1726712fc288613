#!/usr/bin/env bash
#SBATCH --job-name=medjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Pretraining on N nodes x G GPUs under SLURM: one process per GPU, all started by srun.
#
#   sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G launch/slurm.sh CONFIG WORKDIR [--config.key=value ...]
#   sbatch --nodes=4 launch/slurm.sh configs/dinov2_reg.py:vitl14 /shared/runs/vitl14 --config.mesh.fsdp=8
#
# The #SBATCH lines above are defaults (2 nodes x 8 GPUs); options given to sbatch override them.
# Keep --ntasks-per-node equal to --gpus-per-node, and do not bind GPUs to tasks (no --gpus-per-task):
# every task must see all GPUs of its node, and JAX gives task SLURM_LOCALID the GPU of that number.
# WORKDIR must be on a filesystem every node sees (checkpoints, logs, the demo data).
# Resubmitting the same command resumes from the latest checkpoint. See launch/README.md.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: sbatch [options] $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2

# Share of each GPU's memory JAX reserves up front (JAX's default is 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# Progress lines appear as they are printed, not when a buffer fills.
export PYTHONUNBUFFERED=1
# JAX_COORDINATOR_PORT, if set when you call sbatch, is the port process 0 listens on (on the
# first node); unset, JAX derives one from the job id.

echo "medjax: job ${SLURM_JOB_ID:-?}, ${SLURM_JOB_NUM_NODES:-?} nodes (${SLURM_JOB_NODELIST:-?})," \
     "${SLURM_NTASKS:-?} processes, one per GPU"
# --kill-on-bad-exit: if one process fails, stop the others instead of letting them wait.
srun --kill-on-bad-exit=1 python -m medjax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
