#!/usr/bin/env bash
# Start a dni-async pipeline across hosts over ssh, one process per host line.
#
#   launch/ssh-launch.sh HOSTS_FILE RUN_DIR [dni-async train flags...]
#   e.g. CURVE_KEYS=/etc/dni-async/keys launch/ssh-launch.sh launch/hosts.example /shared/runs/r1 \
#            --config launch/seed-cdni.toml
#
# Every host needs this repository and its .venv at the same path (or DNI_ASYNC=/path/to/dni-async,
# the same on every host). RUN_DIR need not be shared: the script writes config.json on every
# host; the coordinator's host gets summary.json and metrics.csv, each stage's host its own
# stage-K.npz. With CURVE_KEYS=DIR set, the run is encrypted and authenticated: make the keys
# first with `dni-async keys DIR --stages N`; each host gets DIR/public/ and its own private key
# only, copied to the same path. Relative paths are made absolute here, on the launching host.
#
#   SSH_OPTS="-F FILE ..."  extra options for every ssh (e.g. a config with keys and known hosts)
#   BASE_PORT=47000         the first tcp port; each process binds ports from there
#   DRY_RUN=1               print the commands instead of running them
#
# ssh never prompts (BatchMode): set up key-based login and known host keys first. The exit
# status is the coordinator's if it failed, else the first failing process's; each failure is
# named. Ctrl-C or SIGTERM stops every remote process (by the pid each wrote at start).
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,4p' "$0" >&2; exit 2; }
hosts_file=$1; run_dir=$(realpath -m -- "$2"); shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
dni=${DNI_ASYNC:-$repo/.venv/bin/dni-async}
base_port=${BASE_PORT:-47000}
read -r -a ssh_opts <<<"${SSH_OPTS:-}"
ssh_=(ssh -o BatchMode=yes "${ssh_opts[@]}")
q() { printf '%q' "$1"; }
say() { echo "ssh-launch: $*" >&2; }

# NAME ADDRESS per line; comments and blank lines ignored; stages ordered by rank, not by line
declare -A addr_of=()
names=()
while read -r name addr _; do
  [[ -z "${name:-}" || "$name" == \#* ]] && continue
  [[ "$name" == coordinator || "$name" =~ ^stage-[0-9]+$ ]] \
    || { say "$hosts_file: unknown process name '$name' (coordinator or stage-K)"; exit 2; }
  [[ -n "${addr:-}" ]] || { say "$hosts_file: no address for $name"; exit 2; }
  [[ -z "${addr_of[$name]:-}" ]] || { say "$hosts_file: $name is listed twice"; exit 2; }
  addr_of[$name]=$addr; names+=("$name")
done < "$hosts_file"
n_stages=$(( ${#names[@]} - 1 ))
[[ -n "${addr_of[coordinator]:-}" && $n_stages -ge 2 ]] \
  || { say "need a coordinator and >= 2 stages in $hosts_file"; exit 2; }
stage_addrs=()
for ((k = 0; k < n_stages; k++)); do
  [[ -n "${addr_of[stage-$k]:-}" ]] || { say "$hosts_file: stage-$k is missing (stages are 0..$((n_stages - 1)))"; exit 2; }
  stage_addrs+=("${addr_of[stage-$k]}")
done

extra=()
if [[ -n "${CURVE_KEYS:-}" ]]; then
  CURVE_KEYS=$(realpath -m -- "$CURVE_KEYS")
  for name in "${names[@]}"; do
    [[ -r "$CURVE_KEYS/private/$name.key_secret" ]] \
      || { say "no key $CURVE_KEYS/private/$name.key_secret (dni-async keys $CURVE_KEYS --stages $n_stages)"; exit 2; }
  done
  extra+=(--set "curve_keys=$CURVE_KEYS")
fi
config="$run_dir/config.json"
plan=("$dni" plan --run-dir "$run_dir" --transport tcp "$@" "${extra[@]}"
      --set "coordinator_host=${addr_of[coordinator]}"
      --set "stage_hosts=$(IFS=,; echo "${stage_addrs[*]}")" --set "base_port=$base_port")
if [[ -n "${DRY_RUN:-}" ]]; then echo "${plan[*]}"; else "${plan[@]}" >&2; fi

pid_dir="$run_dir/.ssh-launch"   # each remote process writes its pid here, on its own host
remote_cmd() {   # the command line one process runs on its host
  local name=$1 what
  if [[ "$name" == coordinator ]]; then what="coordinator $(q "$config")"
  else what="stage $(q "$config") --rank ${name#stage-}"; fi
  echo "mkdir -p $(q "$pid_dir") && echo \$\$ > $(q "$pid_dir/$name.pid") && exec $(q "$dni") $what"
}

# every host, all at once, one ssh each: the run folder, config.json (owner-only: it holds the
# run id) and, with CURVE_KEYS, public/ and the host's own secret key. Files arrive in a
# temporary folder and are then moved or copied into place, so hosts may share these folders.
copy_to() {
  local name=$1 t='"$t"' files=(-C "$run_dir" config.json) put
  put="umask 077 && mkdir -p $(q "$run_dir") && t=\$(mktemp -d $(q "$run_dir/.incoming-$name").XXXXXX)"
  put+=" && tar -C $t -xf - && mv -f $t/config.json $(q "$config")"
  if [[ -n "${CURVE_KEYS:-}" ]]; then
    files+=(-C "$CURVE_KEYS" public "private/$name.key_secret")
    put+=" && mkdir -p $(q "$CURVE_KEYS/public") $(q "$CURVE_KEYS/private")"
    put+=" && cp -p $t/public/*.key $(q "$CURVE_KEYS/public/")"
    put+=" && cp -p $t/private/$(q "$name").key_secret $(q "$CURVE_KEYS/private/")"
  fi
  put+=" && rm -rf $t"
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "tar -cf - ${files[*]} | ${ssh_[*]} ${addr_of[$name]} '$put'"
  else
    tar -cf - "${files[@]}" | "${ssh_[@]}" "${addr_of[$name]}" "$put"
  fi
}
copies=()
for name in "${names[@]}"; do
  if [[ -n "${DRY_RUN:-}" ]]; then copy_to "$name"; else copy_to "$name" & copies+=($!); fi
done
for i in "${!copies[@]}"; do
  wait "${copies[$i]}" || { say "cannot copy the run's files to ${names[$i]} (${addr_of[${names[$i]}]})"; exit 1; }
done

pids=(); who=()
signal_remote() {   # signal_remote SIG NAME...: signal those processes through their pid files
  local sig=$1 name sent=(); shift
  for name in "$@"; do
    "${ssh_[@]}" -n "${addr_of[$name]}" \
      "kill -$sig \$(cat $(q "$pid_dir/$name.pid") 2>/dev/null) 2>/dev/null || true" &
    sent+=($!)
  done
  wait "${sent[@]}" 2>/dev/null || true
}
any_alive() { local p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
stop_all() {   # as Ctrl-C in a terminal: the coordinator drains, checkpoints, stops the stages
  trap '' INT TERM
  say "stopping every process"
  local stages=("${names[@]/#coordinator/}")
  signal_remote INT coordinator ${stages[@]}   # a stage on SIGINT waits 1.5 s for that stop
  for _ in $(seq 100); do any_alive || break; sleep 0.1; done
  if any_alive; then signal_remote KILL "${names[@]}"; sleep 1; fi
  kill "${pids[@]}" 2>/dev/null || true
  exit 130
}
trap stop_all INT TERM

# stages first, then the coordinator (any order works; this one gives the fewest retries)
for name in "${names[@]/#coordinator/}" coordinator; do
  [[ -n "$name" ]] || continue
  cmd=$(remote_cmd "$name")
  if [[ -n "${DRY_RUN:-}" ]]; then echo "${ssh_[*]} -n ${addr_of[$name]} '$cmd'"; continue; fi
  "${ssh_[@]}" -n "${addr_of[$name]}" "$cmd" &
  pids+=($!); who+=("$name")
done
[[ -n "${DRY_RUN:-}" ]] && exit 0

status=0; coord_status=0
for i in "${!pids[@]}"; do
  rc=0; wait "${pids[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    say "${who[$i]} on ${addr_of[${who[$i]}]} exited with status $rc"
    [[ $status -eq 0 ]] && status=$rc
    [[ "${who[$i]}" == coordinator ]] && coord_status=$rc
  fi
done
[[ $coord_status -ne 0 ]] && status=$coord_status
exit $status
