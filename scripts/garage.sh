#!/usr/bin/env bash
# garage.sh — a single-node Garage (a real S3-compatible store) on 127.0.0.1 for the tests.
#
#   eval "$(scripts/garage.sh start [DIR])"   # starts it, prints `export ...` lines
#   scripts/garage.sh stop DIR                  # stops the one started in DIR
#
# `start` makes DIR (default: a new temporary directory), writes garage.toml there, starts
# `garage server --single-node --default-bucket` on free loopback ports with generated keys,
# waits until the S3 API answers, and prints the environment the tests read:
#   EVS_TEST_S3_ENDPOINT=http://127.0.0.1:PORT  EVS_TEST_S3_REGION=garage
#   EVS_TEST_S3_BUCKET=evs-test  AWS_ACCESS_KEY_ID=GK...  AWS_SECRET_ACCESS_KEY=...
#   EVS_TEST_GARAGE_DIR=DIR  AWS_EC2_METADATA_DISABLED=true
# Data is kept in DIR across a stop/start on the same DIR. Needs `garage` on PATH
# (scripts/install-test-deps.sh installs it: cargo install --locked garage --version 2.5.0).
set -euo pipefail

die() { printf 'garage.sh: %s\n' "$*" >&2; exit 1; }
command -v garage >/dev/null || die "garage not found (scripts/install-test-deps.sh installs it)"
command -v python3 >/dev/null || die "python3 not found"

hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

start() {
  local dir=${1:-}
  if [[ -z $dir ]]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/evs-garage.XXXXXX"); fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [[ ! -f $dir/env ]]; then
    local s3 rpc admin
    read -r s3 rpc admin < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
    cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
# Our chunks are compressed already.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(hex 32)"

[s3_api]
api_bind_addr = "127.0.0.1:$s3"
s3_region = "garage"

[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
    cat >"$dir/env" <<ENV
export EVS_TEST_S3_ENDPOINT=http://127.0.0.1:$s3
export EVS_TEST_S3_REGION=garage
export EVS_TEST_S3_BUCKET=evs-test
export AWS_ACCESS_KEY_ID=GK$(hex 12)
export AWS_SECRET_ACCESS_KEY=$(hex 32)
export AWS_EC2_METADATA_DISABLED=true
export EVS_TEST_GARAGE_DIR=$dir
export EVS_TEST_GARAGE_ADMIN=http://127.0.0.1:$admin
ENV
  fi
  # shellcheck disable=SC1091
  source "$dir/env"
  GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
    GARAGE_DEFAULT_BUCKET=$EVS_TEST_S3_BUCKET \
    nohup garage -c "$dir/garage.toml" server --single-node --default-bucket >"$dir/garage.log" 2>&1 </dev/null &
  echo $! >"$dir/garage.pid"
  local i
  for i in $(seq 300); do
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=1)' \
        "$EVS_TEST_GARAGE_ADMIN" 2>/dev/null; then
      cat "$dir/env"
      return 0
    fi
    kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null || { tail -n 20 "$dir/garage.log" >&2; die "garage exited at start-up"; }
    sleep 0.1
  done
  tail -n 20 "$dir/garage.log" >&2
  die "garage does not answer on $EVS_TEST_GARAGE_ADMIN/health"
}

stop() {
  local dir=${1:?usage: garage.sh stop DIR} pid
  [[ -f $dir/garage.pid ]] || return 0
  pid=$(cat "$dir/garage.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/garage.pid"
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2 ;;
esac
