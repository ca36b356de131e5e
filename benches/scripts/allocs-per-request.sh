#!/usr/bin/env bash
# allocs-per-request.sh — heap allocations the daemon makes per NBD request, counted, not timed.
#
#   benches/scripts/allocs-per-request.sh
#   NO_BUILD=1 SIZE=1G RUNTIME=3 benches/scripts/allocs-per-request.sh
#
# Starts a release evs-target on a temporary data dir, fills one volume of SIZE with random
# data (every read then hits a layer file), and for 4 KiB random reads and random writes at
# QD32 (fio's nbd engine, one connection) counts the daemon's calls to malloc, calloc and
# realloc with uprobes on the C library (`perf probe`), for RUNTIME seconds of a running fio.
# Then the same over vhost-user (`vhost-frontend-bench`, one queue, QD32, on the same volume).
# Prints calls per request. A count does not drift with the machine's load the way a time
# does, so this shows a change in the hot path's allocations on any machine.
#
# Knobs: SIZE=1G, RUNTIME=3, NO_BUILD=1, BENCH_DIR ($TMPDIR or /tmp), IO_BACKEND=auto.
# Needs: root (uprobes), perf (Debian's linux-perf), fio, nbdcopy, python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { printf 'allocs-per-request: %s\n' "$*" >&2; exit 1; }
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-3}
IO_BACKEND=${IO_BACKEND:-auto}

for tool in perf fio nbdcopy python3; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
[[ $(id -u) -eq 0 ]] || die "needs root (perf probe adds uprobes)"

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build
frontend=$evs_target_dir/release/vhost-frontend-bench
if [[ ${NO_BUILD:-0} != 1 ]]; then
  (cd "$root" && cargo build --release -p evs-benches --bin vhost-frontend-bench)
fi
[[ -x $frontend ]] || die "no $frontend (run without NO_BUILD=1)"
libc=$(ldd "$evs_target" | awk '/libc\.so\.6/{print $3; exit}')
[[ -n $libc && -e $libc ]] || die "cannot find the C library evs-target links"

work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/evs-allocs.XXXXXX")
socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
probes=()
cleanup() {
  [[ -z ${evs_pid:-} ]] || { kill "$evs_pid" 2>/dev/null; wait "$evs_pid" 2>/dev/null || true; }
  for p in "${probes[@]}"; do perf probe -q -d "$p" 2>/dev/null || true; done
  rm -rf "$work" "$socks"
}
trap cleanup EXIT

for fn in malloc calloc realloc; do
  perf probe -q -x "$libc" -a "evs_alloc_$fn=$fn" >/dev/null 2>&1 || die "perf probe on $fn in $libc failed"
  probes+=("probe_libc:evs_alloc_$fn")
done

evs_start "$work/data" "$socks/evs.sock" "$work/evs-target.log" --io-backend "$IO_BACKEND"
evsctl volume create allocs --size "$SIZE" --tier unlimited >/dev/null
uri=$(evs_unix_uri allocs)
head -c "$(numfmt --from=iec "${SIZE^^}")" /dev/urandom >"$work/seed"
nbdcopy "$work/seed" "$uri"
rm -f "$work/seed"

events=$(IFS=,; echo "${probes[*]}")
printf '%-16s %9s %10s %10s %10s\n' workload IOPS malloc/req calloc/req realloc/req
# Calls per request: $1 workload, $2 IOPS (the client's average over its run).
per_request() {
  python3 - "$1" "$2" "$RUNTIME" "$work/stat" <<'PY'
import sys
name, iops, secs, stat = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
counts = {}
for line in open(stat):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        counts[f[2].rsplit("_", 1)[-1]] = float(f[0])
reqs = iops * secs  # requests in the counted window, at the client's average rate
print("%-16s %9.0f %10.2f %10.2f %10.2f" % (name, iops, *(counts.get(k, 0) / reqs for k in ("malloc", "calloc", "realloc"))))
PY
}
for rw in randread randwrite; do
  fio --name=allocs --ioengine=nbd --uri="$uri" --rw=$rw --bs=4k --iodepth=32 --time_based \
    --runtime=$((RUNTIME + 4)) --size="$SIZE" --output-format=json --output="$work/fio.json" >/dev/null 2>&1 &
  fio_pid=$!
  sleep 2
  perf stat -x, -e "$events" -p "$evs_pid" -o "$work/stat" -- sleep "$RUNTIME" 2>/dev/null
  wait "$fio_pid" || die "fio failed ($rw)"
  iops=$(python3 - "$rw" "$work/fio.json" <<'PY'
import json, sys
text = open(sys.argv[2]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
print(job["write" if "write" in sys.argv[1] else "read"]["iops"])
PY
)
  per_request "nbd-$rw" "$iops"
done
sock=$(evsctl --output json volume attach allocs --protocol vhost-user | python3 -c 'import json,sys; print(json.load(sys.stdin)["vhost_user_socket"])')
for rw in randread randwrite; do
  "$frontend" "$sock" "$rw" $((RUNTIME + 4)) 32 "$(numfmt --from=iec "${SIZE^^}")" >"$work/fe.out" 2>&1 &
  fe_pid=$!
  sleep 2
  perf stat -x, -e "$events" -p "$evs_pid" -o "$work/stat" -- sleep "$RUNTIME" 2>/dev/null
  wait "$fe_pid" || die "vhost-frontend-bench failed ($rw): $(cat "$work/fe.out")"
  per_request "vhost-$rw" "$(awk '/^IOPS/{print $2}' "$work/fe.out")"
done
