#!/usr/bin/env bash
# Pretraining on one machine with all of its GPUs: a single process drives every visible GPU.
#
#   launch/single_node.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/single_node.sh configs/dinov2_reg.py:vits14 runs/vits14 --config.mesh.fsdp=4
#
# The global batch is config.train.batch_size_per_device x the number of GPUs. Pick the GPUs
# with CUDA_VISIBLE_DEVICES=0,1,... See launch/README.md.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2

# Share of each GPU's memory JAX reserves up front (JAX's default is 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# Progress lines appear as they are printed, also when the output goes to a file.
export PYTHONUNBUFFERED=1

exec python -m medjax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
