#!/usr/bin/env bash
# dr-bench.sh — disaster recovery figures, one run, two release daemons on this machine.
#
#   benches/scripts/dr-bench.sh
#   NO_BUILD=1 SIZE=4G LOAD_SECONDS=60 INTERVAL=2 benches/scripts/dr-bench.sh
#
# 1. Initial sync: a SIZE volume of random data on AZ1, `dr protect --wait`; its throughput
#    against nbdcopy copying the same data between two volumes over loopback NBD in the same
#    run (goal: >= 80% of it).
# 2. Steady state: fio (nbd engine) random 64 KiB writes at RATE (default 50 MB/s) for
#    LOAD_SECONDS on the source; `dr status` sampled every 0.5 s: RPO p50 and p99 (goal p99 <
#    2 x INTERVAL), and bytes sent to the target per byte written.
# 3. Failover time: kill -9 of the source, then `dr failover --wait` on the target until a
#    write to the promoted volume over NBD succeeds (goal < 5 s).
#
# Knobs: SIZE=4G, INTERVAL=2, RATE=50m, LOAD_SECONDS=60, BENCH_DIR, IO_BACKEND=auto,
# NO_BUILD=1, KEEP=1. Needs fio, nbdcopy, nbdinfo, qemu-io, python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
SIZE=${SIZE:-4G}
INTERVAL=${INTERVAL:-2}
RATE=${RATE:-50m}
LOAD_SECONDS=${LOAD_SECONDS:-60}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
IO_BACKEND=${IO_BACKEND:-auto}
KEEP=${KEEP:-0}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'dr-bench: %s\n' "$*" >&2; exit 1; }
for tool in fio nbdcopy nbdinfo qemu-io python3 numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/install-test-deps.sh installs them)"
done
bytes=$(numfmt --from=iec "${SIZE^^}") || die "SIZE=$SIZE is not a size"

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

work=$(mktemp -d "$BENCH_DIR/evs-dr-bench.XXXXXX")
socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
pids=()
cleanup() {
  local rc=$? p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $KEEP == 1 ]]; then echo "dr-bench: kept $work"; else rm -rf "$work"; fi
  rm -rf "$socks"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Two daemons; `as_a` / `as_b` run evsctl against one of them.
evs_start "$work/a" "$socks/a.sock" "$work/a.log" --io-backend "$IO_BACKEND" --az az1
a_pid=$evs_pid; pids+=("$a_pid"); a_ep=$EVS_ENDPOINT; a_tok=$EVS_TOKEN
evs_start "$work/b" "$socks/b.sock" "$work/b.log" --io-backend "$IO_BACKEND" --az az2
b_pid=$evs_pid; pids+=("$b_pid"); b_ep=$EVS_ENDPOINT; b_tok=$EVS_TOKEN
as_a() { EVS_ENDPOINT=$a_ep EVS_TOKEN=$a_tok evsctl "$@"; }
as_b() { EVS_ENDPOINT=$b_ep EVS_TOKEN=$b_tok evsctl "$@"; }
uri_of() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("unix_uri") or d["uri"])'; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }

say "machine: $(nproc) CPUs, kernel $(uname -r), $(fio --version); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---------------------------------------------------------------- 1. initial sync
say "data: $SIZE of random data in volume v on az1"
as_a volume create v --size "$bytes" --tier unlimited >/dev/null
as_a volume create copy --size "$bytes" --tier unlimited >/dev/null
v_uri=$(as_a --output json volume attach v --unix | uri_of)
copy_uri=$(as_a --output json volume attach copy --unix | uri_of)
head -c "$bytes" /dev/urandom >"$work/seed.raw"
nbdcopy --flush "$work/seed.raw" "$v_uri"
rm -f "$work/seed.raw"
say "loopback copy: nbdcopy between two volumes"
t0=$(date +%s.%N)
nbdcopy --flush "$v_uri" "$copy_uri"
t1=$(date +%s.%N)
copy_mbps=$(python3 -c "print('%.1f' % ($bytes / 1e6 / ($t1 - $t0)))")
as_a volume detach copy >/dev/null
echo "nbdcopy: $copy_mbps MB/s"

as_a server create vm --volumes v >/dev/null
as_a dr group create g --target "$b_ep" --target-token "$b_tok" --target-az az2 --interval "$INTERVAL" >/dev/null
say "initial sync: dr protect g --server vm --wait"
t0=$(date +%s.%N)
as_a dr protect g --server vm --wait >/dev/null
t1=$(date +%s.%N)
sync_mbps=$(python3 -c "print('%.1f' % ($bytes / 1e6 / ($t1 - $t0)))")
echo "initial sync: $sync_mbps MB/s ($(python3 -c "print('%.2f' % ($sync_mbps / $copy_mbps))") x nbdcopy)"

# ---------------------------------------------------------------- 2. steady state
say "steady state: fio randwrite 64k at $RATE for ${LOAD_SECONDS}s; dr status every 0.5 s"
sent0=$(as_a --output json dr status g | field '["bytes_transferred"]')
fio --name=load --ioengine=nbd --uri="$v_uri" --rw=randwrite --bs=64k --iodepth=8 --rate="$RATE" \
  --time_based --runtime="$LOAD_SECONDS" --output-format=json --output="$work/fio.json" >/dev/null &
fio_pid=$!
: >"$work/samples"
# Steady state starts when the first cycle that began under the load has committed (before
# it the point is the initial sync's, as old as that sync took).
cycles0=$(as_a --output json dr status g | field '.get("cycles", 0)')
while kill -0 "$fio_pid" 2>/dev/null; do
  as_a --output json dr status g | field '.get("cycles", 0), d["rpo_seconds"]' | tr -d '(),' >>"$work/samples"
  sleep 0.5
done
awk -v c0="$cycles0" '$1 >= c0 + 2 { print $2 }' "$work/samples" >"$work/rpo"
echo "RPO samples taken: $(wc -l <"$work/samples"), in the steady state: $(wc -l <"$work/rpo")"
wait "$fio_pid"
# One more interval so the last writes are in a point before counting bytes.
sleep $((INTERVAL * 2 + 1))
sent1=$(as_a --output json dr status g | field '["bytes_transferred"]')
written=$(python3 -c "import json; d=json.load(open('$work/fio.json'))['jobs'][0]['write']; print(d['io_bytes'])")
python3 - "$work/rpo" "$INTERVAL" "$sent0" "$sent1" "$written" <<'PY'
import sys, statistics
rpo = sorted(float(x) for x in open(sys.argv[1]) if x.strip())
interval, s0, s1, written = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
p = lambda q: rpo[min(len(rpo) - 1, int(q * len(rpo)))]
print("RPO samples %d: p50 %.2f s, p99 %.2f s, max %.2f s (interval %.0f s; goal p99 < %.0f s: %s)" % (
    len(rpo), p(0.5), p(0.99), rpo[-1], interval, 2 * interval, "met" if p(0.99) < 2 * interval else "NOT met"))
print("written %.1f MB, sent %.1f MB: %.3f bytes sent per byte written" % (written / 1e6, (s1 - s0) / 1e6, (s1 - s0) / written))
PY

# ---------------------------------------------------------------- 3. failover
say "failover: kill -9 of az1, then dr failover on az2 until a write succeeds"
kill -KILL "$a_pid"
t0=$(date +%s.%N)
as_b dr failover g --wait >/dev/null
b_uri=$(as_b --output json volume attach v --unix | uri_of)
qemu-io -f raw -c 'write -P 0x5a 0 4k' "$b_uri" >/dev/null
t1=$(date +%s.%N)
echo "failover: $(python3 -c "print('%.2f' % ($t1 - $t0))") s from the command to a completed write (goal < 5 s)"
