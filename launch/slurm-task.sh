#!/usr/bin/env bash
# One Slurm task of a dni-async pipeline: the task's rank names its process.
# SLURM_PROCID 0 is the coordinator; SLURM_PROCID K+1 is stage K. If the process dies of a
# signal, the task says which process it was, so the job's output names it beside srun's
# "task N: Killed".
set -uo pipefail
config=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
dni=${DNI_ASYNC:-$repo/.venv/bin/dni-async}
rank=${SLURM_PROCID:?run this under srun (or set SLURM_PROCID)}
if [[ "$rank" -eq 0 ]]; then
  who=coordinator; "$dni" coordinator "$config" & child=$!
else
  who="stage $((rank - 1))"; "$dni" stage "$config" --rank $((rank - 1)) & child=$!
fi
# pass Slurm's signals on (scancel, the time limit); wait again after a trapped signal
trap 'kill -TERM $child 2>/dev/null' TERM
trap 'kill -INT $child 2>/dev/null' INT
while true; do
  wait "$child" 2>/dev/null; rc=$?   # (bash's own "Killed" line: the one below says more)
  kill -0 "$child" 2>/dev/null || break
done
if [[ $rc -gt 128 && $rc -ne 130 ]]; then   # 130: dni-async's own "interrupted, stopped in order"
  echo "slurm-task: $who (task $rank on $(hostname -s)) was killed by SIG$(kill -l $((rc - 128)))" >&2
fi
exit $rc
