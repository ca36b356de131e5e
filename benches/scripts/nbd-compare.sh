#!/usr/bin/env bash
# nbd-compare.sh — one set of fio workloads against two targets, interleaved, medians, ratios.
#
#   benches/scripts/nbd-compare.sh TARGET_OURS TARGET_PEER
#
# A target is an NBD URI (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH), run with
# fio's nbd engine, or `file:PATH`, run with fio's io_uring engine and O_DIRECT on that file
# (the physical limit of the disk). Both targets must be up, hold data (prefill with nbdcopy,
# or random reads only measure holes) and be at least SIZE bytes.
#
# Workloads (WORKLOADS, in this order):
#   randread4k   4 KiB random read,  queue depth 32
#   randread4k-2c  4 KiB random read, two connections (fio jobs) at queue depth 16 each: the
#                same 32 requests in flight, spread the way a multi-conn client (QEMU's NBD
#                client with multi-conn, nbdcopy) spreads them
#   randwrite4k  4 KiB random write, queue depth 32
#   seqread1m    1 MiB sequential read,  queue depth 8
#   seqwrite1m   1 MiB sequential write, queue depth 8
# Each workload runs ROUNDS times on each target, alternating ours, peer, ours, peer, ...; the
# medians are compared, so the slow drift of a shared machine falls on both sides alike. Only
# ratios from one run mean something; absolute figures from different runs do not.
#
# Output: one line per workload: median IOPS and MB/s of each side, ratio ours/peer (IOPS), the
# median p99 total latency (µs) of each side, and the median CPU of fio itself on each side
# (user + system, % of one CPU per job; near 100 = the client is the bottleneck).
#
# Knobs (environment):
#   RUNTIME=10   seconds measured per fio run       RAMP=2     seconds of warm-up per run
#   ROUNDS=3     runs per target and workload       SIZE=2g    region of the target fio uses
#   JOBS=1       fio jobs (= NBD connections) per run (randread4k-2c always runs 2)
#   WORKLOADS="randread4k randread4k-2c randwrite4k seqread1m seqwrite1m"
#   LABEL_OURS=ours LABEL_PEER=peer                 names in the output
#   BEFORE_OURS=CMD BEFORE_PEER=CMD                 shell commands run before each run of a side
#                (e.g. switching one volume's QoS tier, so both sides are the same volume)
#   RESULTS=FILE append one tab-separated line per workload:
#                label_ours label_peer workload ours_iops peer_iops ratio ours_MBps peer_MBps ours_p99_us
#                peer_p99_us ours_fio_cpu peer_fio_cpu
#
# Needs: fio with the nbd engine (Debian's fio), python3.
set -euo pipefail

if (($# != 2)); then
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
fi
OURS=$1
PEER=$2
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-2g}
JOBS=${JOBS:-1}
WORKLOADS=${WORKLOADS:-randread4k randread4k-2c randwrite4k seqread1m seqwrite1m}
LABEL_OURS=${LABEL_OURS:-ours}
LABEL_PEER=${LABEL_PEER:-peer}
RESULTS=${RESULTS:-}

for tool in fio python3; do
  command -v "$tool" >/dev/null || { echo "nbd-compare: $tool not found" >&2; exit 1; }
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/nbd-compare.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
trap 'exit 143' TERM INT

# fio arguments that select a target, in the array `target`.
set_target() {
  case $1 in
    file:*) target=(--ioengine=io_uring --direct=1 --filename="${1#file:}") ;;
    nbd:* | nbds:* | nbd+unix:* | nbds+unix:* | nbd+vsock:*) target=(--ioengine=nbd --uri="$1") ;;
    *) echo "nbd-compare: $1 is neither an NBD URI nor file:PATH" >&2; exit 2 ;;
  esac
}

# Workload parameters, in the array `shape`; sets `dir` to the fio result section and `jobs`
# to the number of fio jobs (connections).
set_workload() {
  jobs=$JOBS
  case $1 in
    randread4k) shape=(--rw=randread --bs=4k --iodepth=32); dir=read ;;
    randread4k-2c) shape=(--rw=randread --bs=4k --iodepth=16); dir=read; jobs=2 ;;
    randwrite4k) shape=(--rw=randwrite --bs=4k --iodepth=32); dir=write ;;
    seqread1m) shape=(--rw=read --bs=1M --iodepth=8); dir=read ;;
    seqwrite1m) shape=(--rw=write --bs=1M --iodepth=8); dir=write ;;
    *) echo "nbd-compare: unknown workload $1 (randread4k randread4k-2c randwrite4k seqread1m seqwrite1m)" >&2; exit 2 ;;
  esac
}

# Reads fio JSON results. `one JSON DIR` prints "iops bw_bytes p99_us";
# `med WORKLOAD FILE_OURS FILE_PEER` prints the summary line (and the RESULTS line).
py_helper='
import json, statistics, sys

def load(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):])  # fio may print notes before the JSON

if sys.argv[1] == "one":
    job = load(sys.argv[2])["jobs"][0]
    if job.get("error"):
        sys.exit("fio reported error %s" % job["error"])
    d = job[sys.argv[3]]
    p99 = d["lat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
    # The CPU fio itself used (user + system, % of one CPU per job): near 100 means the client, not
    # the server, sets the pace.
    print("%.0f %.0f %.0f %.0f" % (d["iops"], d["bw_bytes"], p99, job["usr_cpu"] + job["sys_cpu"]))
else:
    wl, fa, fb, la, lb, results = sys.argv[2:8]
    rows = lambda f: [list(map(float, l.split())) for l in open(f) if l.strip()]
    a, b = rows(fa), rows(fb)
    med = lambda r, i: statistics.median(x[i] for x in r)
    ia, ib = med(a, 0), med(b, 0)
    ratio = ia / ib if ib else float("nan")
    cols = [wl, "%.0f" % ia, "%.0f" % ib, "%.2f" % ratio, "%.1f" % (med(a, 1) / 1e6),
            "%.1f" % (med(b, 1) / 1e6), "%.0f" % med(a, 2), "%.0f" % med(b, 2),
            "%.0f" % med(a, 3), "%.0f" % med(b, 3)]
    print("%-14s %11s %11s %7s %10s %10s %9s %9s %8s %8s" % tuple(cols))
    if results:
        with open(results, "a") as f:
            f.write("\t".join([la, lb] + cols) + "\n")
'

# run_fio TARGET WORKLOAD -> "iops bw p99" on stdout
run_fio() {
  local out=$scratch/fio.json
  set_target "$1"
  set_workload "$2"
  rm -f "$out"
  if ! fio --name="$2" "${target[@]}" "${shape[@]}" --numjobs="$jobs" --size="$SIZE" \
      --group_reporting --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0 \
      --lat_percentiles=1 --output-format=json --output="$out" >"$scratch/fio.log" 2>&1; then
    echo "nbd-compare: fio failed on $1 ($2):" >&2
    tail -n 5 "$scratch/fio.log" >&2 || true
    exit 1
  fi
  python3 -c "$py_helper" one "$out" "$dir"
}

echo "# ours = $LABEL_OURS: $OURS"
echo "# peer = $LABEL_PEER: $PEER"
echo "# fio ${RUNTIME}s (+${RAMP}s ramp) x $ROUNDS rounds each, interleaved; size $SIZE; jobs $JOBS (randread4k-2c: 2);" \
  "medians; ratio = ours/peer IOPS; p99 = total latency in µs; fio% = the client's own CPU"
printf '%-14s %11s %11s %7s %10s %10s %9s %9s %8s %8s\n' workload ours_IOPS peer_IOPS ratio ours_MB/s peer_MB/s ours_p99 peer_p99 ours_fio% peer_fio%
for wl in $WORKLOADS; do
  set_workload "$wl" # validate before spending time
  : >"$scratch/ours"
  : >"$scratch/peer"
  for ((r = 1; r <= ROUNDS; r++)); do
    [[ -z ${BEFORE_OURS:-} ]] || eval "$BEFORE_OURS"
    run_fio "$OURS" "$wl" >>"$scratch/ours"
    [[ -z ${BEFORE_PEER:-} ]] || eval "$BEFORE_PEER"
    run_fio "$PEER" "$wl" >>"$scratch/peer"
  done
  python3 -c "$py_helper" med "$wl" "$scratch/ours" "$scratch/peer" "$LABEL_OURS" "$LABEL_PEER" "$RESULTS"
done
