#!/usr/bin/env python3
"""cpu-per-op.py — the daemon's CPU time per request, limiter in place vs bypassed, one volume.

    cpu-per-op.py PID METRICS_ADDR EVSCTL VOLUME URI ROUNDS RUNTIME

Used by qos-bench.sh (phase 1c). For each round and workload (4 KiB random read and write,
QD32), it switches VOLUME's tier online to `essd` (limits out of reach: the limiter charges
every request and never delays) or `unlimited` (bypassed), alternating which side goes first,
runs fio's nbd engine on URI for RUNTIME seconds, and reads, around the run, the daemon's CPU
time (utime + stime of every thread, /proc/PID/stat) and the volume's request counters (the
Prometheus endpoint). CPU per request does not move with the time the machine's other guests
take from our vCPUs (steal), which is what makes IOPS on this kind of machine vary by several
percent between runs; it moves with what the limiter costs. Prints medians and the ratios.
"""
import json
import os
import statistics
import subprocess
import sys
import urllib.request

pid, metrics, evsctl, volume, uri = sys.argv[1:6]
rounds, runtime = int(sys.argv[6]), int(sys.argv[7])
tick = os.sysconf("SC_CLK_TCK")


def cpu_seconds():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / tick


def served(kind):
    name = f"evs_volume_{kind}_ops_total"
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") and f'volume="{volume}"' in line:
                return float(line.rsplit(" ", 1)[1])
    sys.exit(f"cpu-per-op: no {name} for volume {volume} at {metrics}")


def run(rw):
    out = subprocess.run(
        ["fio", "--name=q", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
         "--time_based", f"--runtime={runtime}", "--randrepeat=0", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read" if rw == "randread" else "write"]["iops"]


results = {}
for rw, kind in (("randread", "read"), ("randwrite", "write")):
    sides = {"limiter": ([], []), "bypass": ([], [])}
    # Warm-up, not counted: the first run after a change of workload runs slow on both sides.
    subprocess.run([evsctl, "volume", "set-tier", volume, "--tier", "unlimited"], check=True, capture_output=True)
    run(rw)
    for r in range(rounds):
        order = ["limiter", "bypass"] if r % 2 == 0 else ["bypass", "limiter"]
        for side in order:
            tier = "essd" if side == "limiter" else "unlimited"
            subprocess.run([evsctl, "volume", "set-tier", volume, "--tier", tier], check=True, capture_output=True)
            c0, n0 = cpu_seconds(), served(kind)
            iops = run(rw)
            c1, n1 = cpu_seconds(), served(kind)
            sides[side][0].append(iops)
            sides[side][1].append((c1 - c0) / (n1 - n0) * 1e6)
    results[rw] = sides

print("%-10s %-8s %12s %14s   %s" % ("workload", "side", "median IOPS", "CPU µs/request", "rounds (µs/request)"))
for rw, sides in results.items():
    for side, (iops, cpu) in sides.items():
        print("%-10s %-8s %12.0f %14.3f   %s" % (rw, side, statistics.median(iops), statistics.median(cpu),
                                              " ".join("%.3f" % c for c in cpu)))
    li, lc = statistics.median(sides["limiter"][0]), statistics.median(sides["limiter"][1])
    bi, bc = statistics.median(sides["bypass"][0]), statistics.median(sides["bypass"][1])
    print("%-10s limiter/bypass: IOPS %.3f, CPU per request %.3f (cost of the limiter %+.1f%%)"
          % (rw, li / bi, lc / bc, (lc / bc - 1) * 100))
