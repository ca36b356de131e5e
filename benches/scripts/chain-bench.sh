#!/usr/bin/env bash
# chain-bench.sh — 4 KiB random read IOPS over NBD on a volume under a chain of 1 snapshot vs
# one under 16, one run, release build (issue goal: loss under 10%).
#
#   benches/scripts/chain-bench.sh
#   NO_BUILD=1 SIZE=2G ROUNDS=5 benches/scripts/chain-bench.sh
#
# Two `unlimited` volumes get the same random data (nbdcopy). Volume `chain1` then gets one
# snapshot; volume `chain16` gets 16, each followed by 64 scattered 4 KiB writes (as a volume
# under a snapshot schedule has), so a read of the base data resolves through every layer.
# nbd-compare.sh runs 4 KiB random reads at QD32 on both, interleaved, and prints the ratio
# chain16 / chain1. The page cache holds both volumes' data (read once each before the runs).
#
# Knobs: SIZE=2G, ROUNDS=3, RUNTIME=10, BENCH_DIR=$TMPDIR or /tmp, IO_BACKEND=auto,
# NO_BUILD=1, KEEP=1. Needs fio, nbdcopy, python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
SIZE=${SIZE:-2G}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
IO_BACKEND=${IO_BACKEND:-auto}
KEEP=${KEEP:-0}
export RUNTIME=${RUNTIME:-10} ROUNDS=${ROUNDS:-3} RAMP=${RAMP:-2}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'chain-bench: %s\n' "$*" >&2; exit 1; }
for tool in fio nbdcopy python3 numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/install-test-deps.sh installs them)"
done
bytes=$(numfmt --from=iec "${SIZE^^}") || die "SIZE=$SIZE is not a size"

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

work=$(mktemp -d "$BENCH_DIR/evs-chain-bench.XXXXXX")
socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
evs_pid=
cleanup() {
  local rc=$?
  if [[ -n $evs_pid ]]; then kill -TERM "$evs_pid" 2>/dev/null || true; wait "$evs_pid" 2>/dev/null || true; fi
  if [[ $KEEP == 1 ]]; then echo "chain-bench: kept $work"; else rm -rf "$work"; fi
  rm -rf "$socks"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "machine: $(nproc) CPUs, kernel $(uname -r), $(fio --version); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
evs_start "$work/data" "$socks/evs.sock" "$work/evs.log" --io-backend "$IO_BACKEND"
evsctl volume create chain1 --size "$bytes" --tier unlimited >/dev/null
evsctl volume create chain16 --size "$bytes" --tier unlimited >/dev/null
one=$(evs_unix_uri chain1)
deep=$(evs_unix_uri chain16)
head -c "$bytes" /dev/urandom >"$work/seed.raw"
nbdcopy --flush "$work/seed.raw" "$one"
nbdcopy --flush "$work/seed.raw" "$deep"
rm -f "$work/seed.raw"
evsctl snapshot create chain1 s0 >/dev/null
for s in $(seq 0 15); do
  evsctl snapshot create chain16 "s$s" >/dev/null
  # 64 scattered 4 KiB writes on top of each snapshot.
  fio --name=scatter --ioengine=nbd --uri="$deep" --rw=randwrite --bs=4k --io_size=256k \
    --randseed="$((s + 1))" --output=/dev/null >/dev/null
done
evsctl --output json snapshot list chain16 | python3 -c 'import json,sys; v=json.load(sys.stdin); print("chain16 snapshots:", len(v if isinstance(v, list) else v.get("snapshots", [])))'
nbdcopy "$one" null:
nbdcopy "$deep" null:
say "4 KiB random reads: chain of 16 snapshots (ours) vs chain of 1 (peer), $SIZE each"
LABEL_OURS=chain16 LABEL_PEER=chain1 SIZE=$bytes WORKLOADS="randread4k" "$here/nbd-compare.sh" "$deep" "$one"
