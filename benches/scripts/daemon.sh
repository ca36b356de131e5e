# daemon.sh — sourced by the benchmark scripts: start a release evs-target on free ports in a
# work directory and point evsctl at it.
#
#   source "$here/daemon.sh"
#   evs_build                                # unless NO_BUILD=1
#   evs_start DATA_DIR SOCKET LOG [evs-target args...]   # sets evs_pid, EVS_ENDPOINT, EVS_TOKEN
#   evs_wait_export URI NAME LOG PID         # until nbdinfo answers (30 s)
#   evsctl ...                               # the release evsctl
#   evs_unix_uri VOLUME                      # attach VOLUME, print its unix-socket NBD URI
#
# Expects `root` (the repository) and `die`; uses CARGO_TARGET_DIR when set.

evs_target_dir=${CARGO_TARGET_DIR:-$root/target}
evs_target=$evs_target_dir/release/evs-target
evsctl_bin=$evs_target_dir/release/evsctl

evs_build() {
  if [[ ${NO_BUILD:-0} != 1 ]]; then
    printf '\n== building release binaries\n'
    (cd "$root" && cargo build --release -p evs-target -p evsctl)
  fi
  [[ -x $evs_target && -x $evsctl_bin ]] || die "no release binaries in $evs_target_dir/release (run without NO_BUILD=1)"
}

evsctl() { "$evsctl_bin" "$@"; }

evs_unix_uri() { evsctl --output json volume attach "$1" --unix | python3 -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])'; }

evs_start() { # DATA_DIR SOCKET LOG [args...]
  local data=$1 sock=$2 log=$3 i nbd_port api_port metrics_port
  shift 3
  read -r nbd_port api_port metrics_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
  "$evs_target" --data-dir "$data" --nbd-listen "127.0.0.1:$nbd_port" --nbd-socket "$sock" \
    --api-listen "127.0.0.1:$api_port" --metrics-listen "127.0.0.1:$metrics_port" "$@" >"$log" 2>&1 &
  evs_pid=$!
  evs_metrics=127.0.0.1:$metrics_port
  export EVS_ENDPOINT=http://127.0.0.1:$api_port
  for i in $(seq 300); do
    kill -0 "$evs_pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "evs-target exited at start-up"; }
    if [[ -r $data/admin.token ]]; then
      EVS_TOKEN=$(<"$data/admin.token")
      export EVS_TOKEN
      evsctl volume list >/dev/null 2>&1 && return 0
    fi
    sleep 0.1
  done
  die "evs-target API does not answer on $EVS_ENDPOINT"
}

evs_wait_export() { # URI NAME LOG PID
  for _ in $(seq 300); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    kill -0 "$4" 2>/dev/null || { tail -n 20 "$3" >&2; die "$2 exited at start-up (log above)"; }
    sleep 0.1
  done
  tail -n 20 "$3" >&2
  die "$2 does not answer on $1"
}
