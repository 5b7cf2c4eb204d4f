#!/usr/bin/env bash
# Start a dni-async pipeline across hosts over ssh, one process per host line.
#
#   launch/ssh-launch.sh HOSTS_FILE RUN_DIR [dni-async train flags...]
#   e.g. launch/ssh-launch.sh launch/hosts.example /shared/runs/r1 --config launch/seed-cdni.toml
#
# Every host needs this repository and its .venv at the same path, and RUN_DIR reachable at
# the same path (a shared file system, or the script copies config.json there). With
# CURVE_KEYS=DIR set, the run is encrypted and authenticated: make the keys first with
# `dni-async keys DIR --stages N`; each host gets public/ and its own private key only.
# Ctrl-C stops every remote process. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
hosts_file=$1; run_dir=$2; shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
dni="$repo/.venv/bin/dni-async"
base_port=${BASE_PORT:-47000}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "$*"; else "$@"; fi; }

mapfile -t lines < <(grep -v '^\s*#' "$hosts_file" | grep -v '^\s*$')
coord_addr=$(awk '$1=="coordinator"{print $2}' "$hosts_file")
stage_addrs=$(awk '$1 ~ /^stage-/{print $2}' "$hosts_file" | paste -sd, -)
n_stages=$(awk '$1 ~ /^stage-/' "$hosts_file" | wc -l)
[[ -n "$coord_addr" && "$n_stages" -ge 2 ]] || { echo "need a coordinator and >= 2 stages in $hosts_file" >&2; exit 2; }

extra=()
[[ -n "${CURVE_KEYS:-}" ]] && extra+=(--set "curve_keys=$CURVE_KEYS")
run "$dni" plan --run-dir "$run_dir" --transport tcp "$@" "${extra[@]}" \
    --set "coordinator_host=$coord_addr" --set "stage_hosts=$stage_addrs" --set "base_port=$base_port"
config="$run_dir/config.json"

pids=()
cleanup() {
  for line in "${lines[@]}"; do
    addr=$(awk '{print $2}' <<<"$line")
    run ssh "$addr" "pkill -f 'dni_async.* $config' || true" || true
  done
  kill "${pids[@]}" 2>/dev/null || true
}
trap cleanup INT TERM

for line in "${lines[@]}"; do
  name=$(awk '{print $1}' <<<"$line"); addr=$(awk '{print $2}' <<<"$line")
  run ssh "$addr" mkdir -p "$run_dir"
  run scp -q "$config" "$addr:$config"
  if [[ "$name" == coordinator ]]; then
    cmd="$dni coordinator $config"
  else
    cmd="$dni stage $config --rank ${name#stage-}"
  fi
  if [[ -n "${DRY_RUN:-}" ]]; then echo "ssh $addr $cmd"; else ssh "$addr" "$cmd" & pids+=($!); fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
