#!/usr/bin/env bash
# vhost-bench.sh — vhost-user-blk vs NBD vs a file, natively and in a guest, one run each.
#
#   benches/scripts/vhost-bench.sh
#   NO_BUILD=1 ROUNDS=5 RUNTIME=10 benches/scripts/vhost-bench.sh
#
# Part 1 (native, PART=native): the same comparison without a guest: a host process is the
# vhost-user frontend (benches/src/bin/vhost-frontend-bench.rs, one queue, QD32), against fio's
# nbd engine on the same volume and fio io_uring O_DIRECT on a raw file on the same file
# system. It measures the back end itself, where a software-emulated guest measures the
# emulator. Part 2 (PART=guest):
# a release evs-target serves one 1 GiB `unlimited` volume both over vhost-user (the guest's
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
# Knobs: PART=both|native|guest, ROUNDS=3, RUNTIME=8, NO_BUILD=1, OUT=FILE (the report, also
# printed), BENCH_DIR (part 1's work directory: a disk, not tmpfs; default $TMPDIR or /tmp),
# EVS_TEST_IO_BACKEND=uring|portable|auto (the daemon's I/O backend). Needs what
# scripts/install-test-deps.sh installs (qemu-system-x86, busybox-static, fio, libnbd-bin).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { printf 'vhost-bench: %s\n' "$*" >&2; exit 1; }

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

PART=${PART:-both}
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-8}
IO_BACKEND=${EVS_TEST_IO_BACKEND:-auto}
out=${OUT:-$(mktemp "${TMPDIR:-/tmp}/vhost-bench.XXXXXX")}
: >"$out"

if [[ $PART == native || $PART == both ]]; then
  # Part 1, native: no guest. vhost-frontend-bench (benches/src/bin) drives one virtqueue of
  # the socket from a host process; fio's nbd engine drives NBD on the same volume (unix
  # socket); fio's io_uring engine with O_DIRECT on a raw file beside the daemon's data is the
  # disk itself (what QEMU's cache=none file disk reads and writes through).
  for tool in fio nbdcopy nbdinfo python3; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/install-test-deps.sh installs them)"
  done
  if [[ ${NO_BUILD:-0} != 1 ]]; then
    (cd "$root" && cargo build --release -p evs-benches --bin vhost-frontend-bench)
  fi
  frontend=$evs_target_dir/release/vhost-frontend-bench
  [[ -x $frontend ]] || die "no $frontend (run without NO_BUILD=1)"
  work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/evs-vhost-bench.XXXXXX")
  socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
  cleanup() {
    [[ -n ${evs_pid:-} ]] && kill "$evs_pid" 2>/dev/null && wait "$evs_pid" 2>/dev/null
    rm -rf "$work" "$socks"
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  evs_start "$work/data" "$socks/nbd.sock" "$work/evs.log" --io-backend "$IO_BACKEND"
  evsctl volume create bench --size 1G --tier unlimited >/dev/null
  sock=$(evsctl volume attach bench --protocol vhost-user)
  uri=$(evsctl volume attach bench --unix)
  span=$((256 << 20))
  head -c "$span" /dev/urandom >"$work/native.raw"
  nbdcopy "$work/native.raw" "$uri"
  truncate -s 1G "$work/native.raw"
  sync
  [[ $(id -u) -eq 0 ]] && echo 3 >/proc/sys/vm/drop_caches
  fio_iops() { # fio args... -> IOPS of the read or write side
    fio --name=b --rw="$rw" --bs=4k --iodepth=32 --size="$span" --runtime="$RUNTIME" --time_based \
      --output-format=terse --terse-version=3 "$@" 2>/dev/null | grep ';' |
      awk -F';' -v rw="$rw" '{print (rw == "randread") ? $8 : $49}'
  }
  declare -A got
  sides=(vhost-user nbd file)
  for ((r = 0; r < ROUNDS; r++)); do
    for rw in randread randwrite; do
      for ((i = 0; i < 3; i++)); do
        side=${sides[$(((i + r) % 3))]}
        case $side in
          vhost-user) v=$("$frontend" "$sock" "$rw" "$RUNTIME" 32 "$span" | awk '{print $2}') ;;
          nbd) v=$(fio_iops --ioengine=nbd --uri="$uri") ;;
          file) v=$(fio_iops --ioengine=io_uring --direct=1 --filename="$work/native.raw") ;;
        esac
        got[$side.$rw]+="$v "
        printf 'round %d %-9s %-10s %s IOPS\n' "$((r + 1))" "$rw" "$side" "$v"
      done
    done
  done
  median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  {
    echo "native: vhost-frontend-bench (1 queue) vs fio nbd engine (same volume, unix socket) vs fio io_uring O_DIRECT on a raw file; 4 KiB random, QD32, $ROUNDS interleaved rounds of $RUNTIME s, median IOPS, io backend $IO_BACKEND"
    for rw in randread randwrite; do
      vu=$(median "${got[vhost-user.$rw]}") nbd=$(median "${got[nbd.$rw]}") file=$(median "${got[file.$rw]}")
      python3 -c "import sys; vu,nbd,f=map(float,sys.argv[1:4]); print(f'{sys.argv[4]:9}  vhost-user {vu:>9.0f}  nbd {nbd:>9.0f}  file-odirect {f:>9.0f}  vhost/nbd {vu/max(nbd,1):.2f}x  vhost/file {vu/max(f,1):.2f}x')" "$vu" "$nbd" "$file" "$rw"
      echo "           rounds: vhost-user [${got[vhost-user.$rw]% }]  nbd [${got[nbd.$rw]% }]  file [${got[file.$rw]% }]"
    done
  } | tee -a "$out"
  kill "$evs_pid"
  wait "$evs_pid" 2>/dev/null || true
  evs_pid=
fi

if [[ $PART == guest || $PART == both ]]; then
  # Part 2, in a guest. The scenario lives in the VM test harness (tests/tests/vm.rs, an
  # ignored test), run with the release daemon binaries.
  export EVS_BIN_DIR=$evs_target_dir/release
  export EVS_BENCH_ROUNDS=$ROUNDS EVS_BENCH_RUNTIME=$RUNTIME EVS_TEST_IO_BACKEND=$IO_BACKEND
  guest_out=$(mktemp "${TMPDIR:-/tmp}/vhost-bench-guest.XXXXXX")
  export EVS_BENCH_OUT=$guest_out
  (cd "$root" && cargo nextest run -p evs-tests --run-ignored only --no-capture \
    -E 'test(vm_bench_vhost_user_vs_nbd_vs_file)')
  cat "$guest_out" >>"$out"
  rm -f "$guest_out"
fi
printf '\n== report (%s)\n' "$out"
cat "$out"
