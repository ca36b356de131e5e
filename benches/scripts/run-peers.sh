#!/usr/bin/env bash
# run-peers.sh — end-to-end benchmark, one run: evs-target against nbdkit, qemu-nbd and the raw
# disk, same data, same disk, same cache state, interleaved rounds (nbd-compare.sh).
#
#   benches/scripts/run-peers.sh                       # from anywhere in the repository
#   SIZE=8G ROUNDS=5 IO_BACKEND=uring benches/scripts/run-peers.sh
#
# What it does:
#   1. cargo build --release -p evs-target -p evsctl (skipped with NO_BUILD=1)
#   2. starts evs-target on a temporary data dir with its own free ports and unix socket
#      (--io-backend $IO_BACKEND), creates a volume of SIZE with evsctl (tier $TIER) and attaches
#      it (unix socket URI when the CLI offers one)
#   3. writes a seed raw file of SIZE random bytes, nbdcopy's it into the volume, and copies it
#      (cp --sparse=never) to one raw file per peer
#   4. starts the peers, each on its own file:
#        qemu-nbd -f raw --cache=writeback --aio=io_uring -t -k SOCK FILE
#        nbdkit -U SOCK --threads 4 file FILE
#   5. before each comparison (one workload against one peer), puts every export in the same
#      cache state: as root, sync and drop the page cache, then read each export once
#      sequentially (nbdcopy URI null:); not as root, only the read. The output says which
#      state was used.
#   6. nbd-compare.sh: ours vs fio on the raw seed file (io_uring, O_DIRECT: the physical
#      limit; 4K randwrite and randread QD32, on one and on two connections), ours vs nbdkit,
#      ours vs qemu-nbd
#   7. prints the ratios against the goals (4K randread >= 1.5x the best peer, 4K randwrite
#      >= 0.95x raw O_DIRECT, sequential >= 1.0x the best peer) and removes everything it made
#      (servers are stopped, the work directory deleted) on exit, error or Ctrl-C.
#
# Knobs (environment):
#   SIZE=4G          volume and file size (needs about 4 x SIZE free in BENCH_DIR)
#   BENCH_DIR=$TMPDIR or /tmp   where the work directory goes: a directory on the disk under
#                    test (not tmpfs; O_DIRECT must work there)
#   IO_BACKEND=auto  evs-target --io-backend (uring | portable | auto)
#   DIRECT_WRITES=   when set (on | off), passed as evs-target --direct-writes
#   TIER=unlimited   tier of the benchmark volume (unlimited = no QoS; admin only)
#   QEMU_AIO=io_uring  qemu-nbd --aio mode
#   NO_BUILD=1       use the existing target/release binaries
#   KEEP=1           keep the work directory (data, logs) instead of deleting it
#   RUNTIME ROUNDS RAMP JOBS WORKLOADS   passed to nbd-compare.sh (see there)
#   FIO_SIZE=$SIZE   region fio uses in each target (nbd-compare.sh's SIZE)
#
# Needs: cargo, fio (with the nbd engine), nbdcopy, nbdinfo, qemu-nbd, nbdkit, python3,
# coreutils (numfmt). scripts/install-test-deps.sh installs the system ones.
# Only ratios from one run count: this kind of machine is shared and noisy.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
SIZE=${SIZE:-4G}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
IO_BACKEND=${IO_BACKEND:-auto}
DIRECT_WRITES=${DIRECT_WRITES:-}
TIER=${TIER:-unlimited}
QEMU_AIO=${QEMU_AIO:-io_uring}
NO_BUILD=${NO_BUILD:-0}
KEEP=${KEEP:-0}
export RUNTIME=${RUNTIME:-10} RAMP=${RAMP:-2} ROUNDS=${ROUNDS:-3} JOBS=${JOBS:-1}
export WORKLOADS=${WORKLOADS:-randread4k randread4k-2c randwrite4k seqread1m seqwrite1m}
fio_size=${FIO_SIZE:-$SIZE}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'run-peers: %s\n' "$*" >&2; exit 1; }

for tool in fio nbdcopy nbdinfo qemu-nbd nbdkit python3 numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/install-test-deps.sh installs fio, libnbd-bin, qemu-utils, nbdkit)"
done
bytes=$(numfmt --from=iec "${SIZE^^}") || die "SIZE=$SIZE is not a size (e.g. 4G, 512M, bytes)"
((bytes % 4096 == 0)) || die "SIZE must be a multiple of 4 KiB"
[[ $(stat -f -c %T "$BENCH_DIR") != tmpfs ]] || die "BENCH_DIR=$BENCH_DIR is tmpfs: put it on the disk under test"

# ---------------------------------------------------------------- build
# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

# ---------------------------------------------------------------- work dir and cleanup
work=$(mktemp -d "$BENCH_DIR/evs-bench.XXXXXX")
# Unix sockets apart, in a short path (sun_path holds 108 bytes; BENCH_DIR may be deep).
socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
pids=()
cmp_pid=
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  [[ -z $cmp_pid ]] || kill -TERM -- "-$cmp_pid" 2>/dev/null || true
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $KEEP == 1 ]]; then
    echo "run-peers: kept $work"
  else
    rm -rf "$work"
  fi
  rm -rf "$socks"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_export() { evs_wait_export "$@"; }

# ---------------------------------------------------------------- our daemon
data=$work/evs-data
daemon_args=(--io-backend "$IO_BACKEND")
[[ -z $DIRECT_WRITES ]] || daemon_args+=(--direct-writes "$DIRECT_WRITES")
say "starting evs-target ${daemon_args[*]}"
evs_start "$data" "$socks/evs.sock" "$work/evs-target.log" "${daemon_args[@]}"
pids+=("$evs_pid")

say "creating volume bench ($SIZE = $bytes bytes, tier $TIER) and attaching it"
evsctl volume create bench --size "$bytes" --tier "$TIER" >/dev/null
if ! attach=$(evsctl --output json volume attach bench --unix 2>"$work/attach.err"); then
  echo "run-peers: attach --unix failed ($(head -n1 "$work/attach.err")); trying without" >&2
  attach=$(evsctl --output json volume attach bench)
fi
# The unix socket URI when the daemon gives one (same machine: no TCP stack in the way).
ours=$(python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("unix_uri") or d["uri"])' <<<"$attach")
case $ours in nbd+unix:*) how="unix socket" ;; *) how="TCP" ;; esac
wait_export "$ours" evs-target "$work/evs-target.log" "$evs_pid"
backend_line=$(grep -m1 -iE 'backend|io_uring|portable' "$work/evs-target.log" || true)
echo "ours: $ours ($how); --io-backend $IO_BACKEND${backend_line:+; daemon log: $backend_line}"

# ---------------------------------------------------------------- data
say "writing $SIZE of random data: seed file, our volume, one copy per peer"
seed=$work/seed.raw
head -c "$bytes" /dev/urandom >"$seed"
nbdcopy --flush "$seed" "$ours"
cp --sparse=never "$seed" "$work/nbdkit.raw"
cp --sparse=never "$seed" "$work/qemu.raw"

# ---------------------------------------------------------------- peers
qemu-nbd -f raw --cache=writeback --aio="$QEMU_AIO" -t --shared=16 -k "$socks/qemu.sock" "$work/qemu.raw" \
  >"$work/qemu-nbd.log" 2>&1 &
pids+=("$!")
qemu_uri="nbd+unix:///?socket=$socks/qemu.sock"
wait_export "$qemu_uri" qemu-nbd "$work/qemu-nbd.log" "$!"

nbdkit -f -U "$socks/nbdkit.sock" --threads 4 file "$work/nbdkit.raw" >"$work/nbdkit.log" 2>&1 &
pids+=("$!")
nbdkit_uri="nbd+unix:///?socket=$socks/nbdkit.sock"
wait_export "$nbdkit_uri" nbdkit "$work/nbdkit.log" "$!"

# ---------------------------------------------------------------- one cache state for all
drop_caches() { sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; }
if [[ $(id -u) -eq 0 ]] && drop_caches; then
  cache_state="page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches), then each export read once sequentially (nbdcopy URI null:)"
  can_drop=1
else
  cache_state="page cache NOT dropped (needs root), each export read once sequentially (nbdcopy URI null:)"
  can_drop=0
fi
settle() {
  sync
  if ((can_drop)); then drop_caches; fi
  local uri
  for uri in "$ours" "$nbdkit_uri" "$qemu_uri"; do nbdcopy "$uri" null:; done
}

results=$work/results.tsv
: >"$results"
compare() { # LABEL_PEER TARGET [WORKLOADS]
  say "ours vs $1 — cache state: $cache_state"
  settle
  # In its own session, waited for in the background: a signal to this script then stops the
  # comparison (and its fio) at once instead of after the current fio run.
  LABEL_OURS=evs-target LABEL_PEER=$1 RESULTS=$results SIZE=$fio_size WORKLOADS=${3:-$WORKLOADS} \
    setsid "$here/nbd-compare.sh" "$ours" "$2" &
  cmp_pid=$!
  local rc=0
  wait "$cmp_pid" || rc=$?
  cmp_pid=
  ((rc == 0)) || die "nbd-compare.sh failed against $1"
}

say "machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r)," \
  "$(stat -f -c %T "$work") at $BENCH_DIR; $(fio --version), $(qemu-nbd --version | head -n1)," \
  "$(nbdkit --version | head -n1); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# One workload at a time, every comparison from the settled state: our small writes go around
# the page cache (O_DIRECT), which drops the cached copy of the blocks they write, so a read
# workload run right after a write workload would measure how much of the previous one's
# footprint was evicted, not the server. BENCHMARKS.md says what that costs.
for wl in $WORKLOADS; do
  case $wl in randread4k | randread4k-2c | randwrite4k) compare "raw-O_DIRECT" "file:$seed" "$wl" ;; esac
  compare nbdkit "$nbdkit_uri" "$wl"
  compare qemu-nbd "$qemu_uri" "$wl"
done

# ---------------------------------------------------------------- summary
say "summary (ratios = evs-target / other, medians of interleaved rounds; cache state: $cache_state)"
python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}  # workload -> {peer: (ratio, ours_iops, peer_iops)}
client = {}  # workload -> highest median CPU of fio itself against ours (% of one CPU per job)
for _, peer, wl, oi, pi, ratio, *rest in rows:
    by.setdefault(wl, {})[peer] = (float(ratio), float(oi), float(pi))
    if len(rest) >= 6:
        client[wl] = max(client.get(wl, 0.0), float(rest[4]))
goals = {  # workload -> (what, goal)
    "randread4k": ("best peer", 1.5),
    "randread4k-2c": ("best peer", 1.5),
    "randwrite4k": ("raw-O_DIRECT", 0.95),
    "seqread1m": ("best peer", 1.0),
    "seqwrite1m": ("best peer", 1.0),
}
order = list(goals) + [w for w in by if w not in goals]
for wl in [w for w in order if w in by]:
    peers = by[wl]
    parts = ["%s %.2f" % (p, r) for p, (r, _, _) in peers.items()]
    what, goal = goals.get(wl, ("best peer", None))
    if what == "raw-O_DIRECT":
        key = peers.get("raw-O_DIRECT")
        verdict = "ours/raw O_DIRECT %.2f" % key[0] if key else "raw not measured"
        got = key[0] if key else None
    else:
        net = {p: v for p, v in peers.items() if p != "raw-O_DIRECT"}
        got = min(r for r, _, _ in net.values()) if net else None
        verdict = "vs best peer (lowest ratio) %.2f" % got if got is not None else "no peer measured"
    mark = "" if goal is None or got is None else ("  goal >= %.2f: %s" % (goal, "met" if got >= goal else "NOT met"))
    fio = "  (fio's CPU against ours: %.0f%%)" % client[wl] if wl in client else ""
    print("%-14s %-46s %s%s%s" % (wl, ", ".join(parts), verdict, mark, fio))
PY
