#!/usr/bin/env bash
# vhost-bench.sh — vhost-user-blk vs NBD vs QEMU's own file-backed virtio-blk, one guest, one run.
#
#   benches/scripts/vhost-bench.sh
#   NO_BUILD=1 ROUNDS=5 RUNTIME=10 benches/scripts/vhost-bench.sh
#
# A release evs-target serves one 1 GiB `unlimited` volume both over vhost-user (the guest's
# vda) and over NBD (vdb, QEMU's NBD client, cache=none); vdc is a 1 GiB raw file next to the
# daemon's data (same file system) as QEMU's virtio-blk with cache=none, aio=io_uring. The
# guest (the VM tests' Debian kernel and busybox initramfs, plus the host's fio and its
# libraries) writes the first 256 MiB of each disk, then runs fio 4 KiB randread and randwrite
# at QD32 (libaio, O_DIRECT) on each, ROUNDS interleaved rounds of RUNTIME seconds (the disk
# order rotates every round), and the host prints the median IOPS and the ratios
# vhost-user/NBD (goal >= 1.5) and vhost-user/file (goal >= 0.8).
#
# KVM when it runs guests on this host, else TCG (then the guest's CPU, not the disks, bounds
# the figures: the ratios shrink towards 1). EVS_VM_ACCEL=kvm|tcg forces one.
#
# Knobs: ROUNDS=3, RUNTIME=8, NO_BUILD=1, OUT=FILE (the report, also printed),
# EVS_TEST_IO_BACKEND=uring|portable|auto (the daemon's I/O backend). Needs what
# scripts/install-test-deps.sh installs (qemu-system-x86, busybox-static, fio, libnbd-bin).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { printf 'vhost-bench: %s\n' "$*" >&2; exit 1; }

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

# The scenario lives in the VM test harness (tests/tests/vm.rs, an ignored test): it is run
# with the release daemon binaries.
export EVS_BIN_DIR=$evs_target_dir/release
export EVS_BENCH_ROUNDS=${ROUNDS:-3} EVS_BENCH_RUNTIME=${RUNTIME:-8}
export EVS_TEST_IO_BACKEND=${EVS_TEST_IO_BACKEND:-auto}
out=${OUT:-$(mktemp "${TMPDIR:-/tmp}/vhost-bench.XXXXXX")}
export EVS_BENCH_OUT=$out
cd "$root"
cargo nextest run -p evs-tests --run-ignored only --no-capture -E 'test(vm_bench_vhost_user_vs_nbd_vs_file)'
printf '\n== report (%s)\n' "$out"
cat "$out"
