#!/usr/bin/env bash
# One Slurm task of a dni-async pipeline: the task's rank names its process.
# SLURM_PROCID 0 is the coordinator; SLURM_PROCID K+1 is stage K.
set -euo pipefail
config=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
rank=${SLURM_PROCID:?run this under srun (or set SLURM_PROCID)}
if [[ "$rank" -eq 0 ]]; then
  exec "$repo/.venv/bin/dni-async" coordinator "$config"
fi
exec "$repo/.venv/bin/dni-async" stage "$config" --rank $((rank - 1))
