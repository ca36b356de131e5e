#!/usr/bin/env bash
# qos-bench.sh — the QoS limiter's cost and accuracy, one run, release build.
#
#   benches/scripts/qos-bench.sh
#   NO_BUILD=1 SIZE=2G ROUNDS=5 benches/scripts/qos-bench.sh
#
# 1. Overhead: two volumes with the same data, one on a tier whose limits are far out of reach
#    (the limiter runs for every request but never delays), one on `unlimited` (the limiter is
#    bypassed); nbd-compare.sh runs 4 KiB random read and write at QD32 on both, interleaved,
#    and prints the ratio limited / bypassed (goal: loss under 2%, ratio >= 0.98). Then the same
#    on ONE volume whose tier is switched online before each run (the files, their place on
#    disk and their cache state are the same for both sides: only the limiter differs). Then,
#    on that volume, the daemon's CPU time per request on each side (cpu-per-op.py): a figure
#    that the machine's steal time does not move, unlike IOPS.
# 2. Accuracy: for every tier of the default table (SPEC.md), a 100 GiB volume, fio at QD32 for
#    RUNTIME seconds: 4 KiB random reads (IOPS) and 256 KiB reads (bandwidth), first with the
#    default burst buckets (1,800 s: the window sees the burst rate), then with
#    `burst_seconds = 0` (the window sees the sustained limit). Prints measured / expected.
#
# Knobs: SIZE=2G (phase 1 volumes), ROUNDS=3, RUNTIME=10, PHASES="1 2", PHASE1=abc (which parts
# of phase 1: a two volumes, b one volume, c CPU per request), BENCH_DIR=$TMPDIR or /tmp,
# IO_BACKEND=auto, NO_BUILD=1, KEEP=1. Needs fio, nbdcopy, nbdinfo, python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
SIZE=${SIZE:-2G}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
IO_BACKEND=${IO_BACKEND:-auto}
KEEP=${KEEP:-0}
PHASES=${PHASES:-1 2}
PHASE1=${PHASE1:-abc}
export RUNTIME=${RUNTIME:-10} ROUNDS=${ROUNDS:-3} RAMP=${RAMP:-2}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'qos-bench: %s\n' "$*" >&2; exit 1; }
for tool in fio nbdcopy nbdinfo python3 numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/install-test-deps.sh installs them)"
done
bytes=$(numfmt --from=iec "${SIZE^^}") || die "SIZE=$SIZE is not a size"

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

work=$(mktemp -d "$BENCH_DIR/evs-qos-bench.XXXXXX")
socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
evs_pid=
stop_daemon() {
  [[ -n $evs_pid ]] || return 0
  kill -TERM "$evs_pid" 2>/dev/null || true
  wait "$evs_pid" 2>/dev/null || true
  evs_pid=
}
cleanup() {
  local rc=$?
  stop_daemon
  if [[ $KEEP == 1 ]]; then echo "qos-bench: kept $work"; else rm -rf "$work"; fi
  rm -rf "$socks"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "machine: $(nproc) CPUs, kernel $(uname -r), $(fio --version); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---------------------------------------------------------------- 1. overhead
if [[ " $PHASES " == *" 1 "* ]]; then
  cat >"$work/unreachable.toml" <<'TOML'
[tiers.essd]
iops_baseline = 1e9
iops_max = 1e9
mbps_baseline = 1e6
mbps_max = 1e6
TOML
  evs_start "$work/data1" "$socks/evs.sock" "$work/evs1.log" --io-backend "$IO_BACKEND" --config "$work/unreachable.toml"
  say "phase 1: limiter in place (tier essd, limits out of reach) vs bypassed (tier unlimited), $SIZE each"
  evsctl volume create limited --size "$bytes" --tier essd >/dev/null
  evsctl volume create bypassed --size "$bytes" --tier unlimited >/dev/null
  limited=$(evs_unix_uri limited)
  bypassed=$(evs_unix_uri bypassed)
  head -c "$bytes" /dev/urandom >"$work/seed.raw"
  nbdcopy --flush "$work/seed.raw" "$limited"
  nbdcopy --flush "$work/seed.raw" "$bypassed"
  rm -f "$work/seed.raw"
  nbdcopy "$limited" null:
  nbdcopy "$bypassed" null:
  if [[ $PHASE1 == *a* ]]; then
    say "phase 1a: two volumes with the same data, limiter vs bypassed"
    LABEL_OURS=limiter LABEL_PEER=bypass SIZE=$bytes WORKLOADS="randread4k randwrite4k" \
      "$here/nbd-compare.sh" "$limited" "$bypassed"
  fi
  # Two volumes differ by where their files lie and what of them is cached: the same volume,
  # its tier switched online before each run, compares the limiter alone.
  if [[ $PHASE1 == *b* ]]; then
    say "phase 1b: one volume, tier switched online between runs (essd out of reach vs unlimited)"
    BEFORE_OURS="'$evsctl_bin' volume set-tier bypassed --tier essd >/dev/null" BEFORE_PEER="'$evsctl_bin' volume set-tier bypassed --tier unlimited >/dev/null" \
      LABEL_OURS=limiter LABEL_PEER=bypass SIZE=$bytes WORKLOADS="randread4k randwrite4k" \
      "$here/nbd-compare.sh" "$bypassed" "$bypassed"
  fi
  # IOPS on a shared machine moves with the CPU time other guests take (steal); the daemon's
  # own CPU time per request does not, and it is what the limiter adds to.
  if [[ $PHASE1 == *c* ]]; then
    say "phase 1c: one volume, CPU time of the daemon per request, limiter vs bypassed ($ROUNDS rounds of ${RUNTIME}s)"
    python3 "$here/cpu-per-op.py" "$evs_pid" "$evs_metrics" "$evsctl_bin" bypassed "$bypassed" "$ROUNDS" "$RUNTIME"
  fi
  stop_daemon
fi

# ---------------------------------------------------------------- 2. accuracy
accuracy() { # LABEL CONFIG_FILE_OR_EMPTY
  local label=$1 config=$2 data=$work/data-$1 args=(--io-backend "$IO_BACKEND") tier uri
  [[ -z $config ]] || args+=(--config "$config")
  evs_start "$data" "$socks/evs.sock" "$work/evs-$label.log" "${args[@]}"
  for tier in common high gpssd ultra-high essd; do
    for kind in iops bw; do
      evsctl volume create "$tier-$kind" --size 100G --tier "$tier" >/dev/null
      evsctl --output json volume show "$tier-$kind" >"$work/$label-$tier-$kind.vol.json"
      uri=$(evs_unix_uri "$tier-$kind")
      if [[ $kind == iops ]]; then shape=(--rw=randread --bs=4k); else shape=(--rw=read --bs=256k); fi
      fio --name=q --ioengine=nbd --uri="$uri" "${shape[@]}" --iodepth=32 --time_based --runtime="$RUNTIME" \
        --norandommap --randrepeat=0 --output-format=json --output="$work/$label-$tier-$kind.fio.json" >/dev/null
    done
  done
  stop_daemon
}
if [[ " $PHASES " == *" 2 "* ]]; then
  say "phase 2: accuracy per tier (100 GiB volumes, QD32, ${RUNTIME}s each)"
  accuracy burst ""
  printf '[tiers.%s]\nburst_seconds = 0\n' common high gpssd ultra-high essd >"$work/no-burst.toml"
  accuracy sustained "$work/no-burst.toml"

  python3 - "$work" <<'PY'
import json, sys, os
work = sys.argv[1]
def load(p):
    t = open(p).read()
    return json.loads(t[t.index("{"):])
print("%-10s %-9s %-9s %12s %12s %7s" % ("tier", "window", "measure", "expected", "measured", "ratio"))
for label in ("burst", "sustained"):
    for tier in ("common", "high", "gpssd", "ultra-high", "essd"):
        for kind in ("iops", "bw"):
            vol = load(os.path.join(work, f"{label}-{tier}-{kind}.vol.json"))
            q = vol["qos"]
            job = load(os.path.join(work, f"{label}-{tier}-{kind}.fio.json"))["jobs"][0]["read"]
            secs = job["runtime"] / 1000.0
            # Each bucket pair runs at its peak while its credits last, then at its limit;
            # the average rate over the window of the dimension measured, and of the other
            # one (4 KiB reads may meet the bandwidth limit, 256 KiB reads the IOPS one).
            def window(peak, limit, credits):
                burst_secs = credits / (peak - limit) if peak > limit else 0.0
                t = min(secs, burst_secs)
                return (peak * t + limit * (secs - t)) / secs
            iops = window(q["iops_peak"], q["iops_limit"], q["iops_burst_capacity"])
            bw = window(q["bandwidth_peak"], q["bandwidth_limit"], q["bandwidth_burst_capacity"])
            if kind == "iops":
                got = job["iops"]
                want = min(iops, bw / 4096)
            else:
                got = job["bw_bytes"]
                want = min(bw, iops * 262144)
            unit = "IOPS" if kind == "iops" else "MB/s"
            scale = 1.0 if kind == "iops" else 1e-6
            print("%-10s %-9s %-9s %12.1f %12.1f %7.3f" % (tier, label, unit, want * scale, got * scale, got / want))
PY
fi
