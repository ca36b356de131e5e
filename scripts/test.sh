#!/usr/bin/env bash
# test.sh — THE test command: installs what the tests need, then runs every test.
#
#   scripts/test.sh                 # everything (what CI runs through .ci/run)
#   scripts/test.sh --quick         # developers: one I/O backend, no clippy
#   scripts/test.sh [--quick] -- ARGS   # extra ARGS go to `cargo nextest run` (e.g. -E 'test(crash)')
#
# Full run, in order:
#   1. scripts/install-test-deps.sh (qemu-utils, libnbd-bin, fio, nbdkit, qemu-system-x86,
#      busybox-static, e2fsprogs, a guest kernel for the VM tests, cargo-nextest; only
#      what is missing)
#   2. cargo build --workspace --bins --features evs-target/failpoints (the integration tests
#      start the real binaries; the feature gives them the crash matrix's crash points), and a
#      single-node Garage (scripts/garage.sh start; stopped at the end) for the tests that need
#      a real S3 server, unless EVS_TEST_S3_ENDPOINT already names one
#   3. cargo nextest run --workspace --no-fail-fast with EVS_TEST_IO_BACKEND=uring
#      (skipped, with the reason, only when io_uring is unavailable on this machine)
#   4. the same with EVS_TEST_IO_BACKEND=portable
#   5. cargo fmt --all -- --check
#   6. cargo clippy --workspace --all-targets -- -D warnings
#   7. scripts/audit.sh: cargo-deny (deny.toml) licenses, bans, sources, and advisories when
#      the RustSec database can be fetched (skipped with a note otherwise)
# Every step runs even when an earlier test step failed; the last line is the summary. Exit
# status is non-zero when any step failed.
#
# --quick runs the suite once, with EVS_TEST_IO_BACKEND if set, else uring when available, else
# portable; then cargo fmt --check. No clippy, no audit.
set -uo pipefail

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; }

quick=0
nextest_extra=()
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; nextest_extra=("$@"); break ;;
    *) echo "test.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

t0=$SECONDS
summary=() # one line per step, printed at the end
ok_steps=()
failed_steps=()
skipped_steps=()

banner() { printf '\n=== test.sh: %s\n' "$*"; }
elapsed() { local s=$(($1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# step NAME CMD... — runs CMD, records "NAME ok|FAILED (time)".
step() {
  local name=$1 start=$SECONDS rc
  shift
  banner "$name: $*"
  "$@"
  rc=$?
  if ((rc == 0)); then
    summary+=("$name: ok ($(elapsed SECONDS-start))")
    ok_steps+=("$name")
  else
    summary+=("$name: FAILED (exit $rc, $(elapsed SECONDS-start))")
    failed_steps+=("$name")
  fi
  return $rc
}

garage_dir=
finish() {
  local line
  [[ -z $garage_dir ]] || { scripts/garage.sh stop "$garage_dir"; rm -rf "$garage_dir"; }
  printf '\n=== test.sh summary\n'
  printf '  %s\n' "${summary[@]}"
  if ((${#failed_steps[@]})); then
    line="FAILED: ${failed_steps[*]}"
  else
    line="PASSED"
  fi
  ((${#ok_steps[@]} == 0)) || line+="; ok: ${ok_steps[*]}"
  ((${#skipped_steps[@]} == 0)) || line+="; skipped: ${skipped_steps[*]}"
  printf 'test.sh: %s; total %s\n' "$line" "$(elapsed SECONDS-t0)"
  ((${#failed_steps[@]} == 0))
  exit
}

# io_uring_check — 0 when io_uring can be used here; else prints the reason on stdout.
# Honest and simple: the kernel switch (kernel 6.6+), then a real io_uring_setup through fio's
# io_uring engine on a small file (seccomp profiles of container runtimes refuse it even when
# the switch is on).
io_uring_check() {
  local sw=/proc/sys/kernel/io_uring_disabled dir out
  if [[ -r $sw && $(<"$sw") == 2 ]]; then
    echo "kernel.io_uring_disabled=2"
    return 1
  fi
  dir=$(mktemp -d "${TMPDIR:-/tmp}/evs-uring-probe.XXXXXX") || { echo "mktemp failed"; return 1; }
  if out=$(fio --name=uring-probe --ioengine=io_uring --filename="$dir/probe" --size=64k \
      --bs=4k --rw=read --output-format=terse 2>&1); then
    rm -rf "$dir"
    return 0
  fi
  rm -rf "$dir"
  echo "io_uring_setup failed in a probe with fio's io_uring engine: $(grep -m1 -oE 'error=[^,]*' <<<"$out" || echo "exit status non-zero")"
  return 1
}

if ! step deps scripts/install-test-deps.sh; then
  echo "test.sh: cannot install what the tests need (see above)" >&2
  finish
fi
# The binaries under test carry the crash points of the crash-matrix tests (inert unless
# FAILPOINTS names one); every cargo command below uses the same features, so nothing is built
# twice.
features=(--features evs-target/failpoints)
if ! step build cargo build --workspace --bins "${features[@]}"; then
  echo "test.sh: the workspace does not build; not running the tests" >&2
  finish
fi

# The S3 server of the backup tests (they fail, naming garage.sh, without one).
start_garage() {
  local env
  garage_dir=$(mktemp -d "${TMPDIR:-/tmp}/evs-test-garage.XXXXXX")
  env=$(scripts/garage.sh start "$garage_dir") || return 1
  eval "$env"
}
if [[ -z ${EVS_TEST_S3_ENDPOINT:-} ]]; then
  step garage start_garage
fi

uring_why=$(io_uring_check) && uring_ok=1 || uring_ok=0

if ((quick)); then
  backend=${EVS_TEST_IO_BACKEND:-}
  if [[ -z $backend ]]; then
    if ((uring_ok)); then backend=uring; else backend=portable; fi
  fi
  step "nextest[$backend]" env EVS_TEST_IO_BACKEND="$backend" cargo nextest run --workspace "${features[@]}" --no-fail-fast "${nextest_extra[@]}"
  step fmt cargo fmt --all -- --check
  finish
fi

if ((uring_ok)); then
  step "nextest[uring]" env EVS_TEST_IO_BACKEND=uring cargo nextest run --workspace "${features[@]}" --no-fail-fast "${nextest_extra[@]}"
else
  banner "SKIPPING the io_uring run: io_uring is unavailable on this machine ($uring_why)"
  summary+=("nextest[uring]: SKIPPED (io_uring unavailable: $uring_why)")
  skipped_steps+=("nextest[uring]")
fi
step "nextest[portable]" env EVS_TEST_IO_BACKEND=portable cargo nextest run --workspace "${features[@]}" --no-fail-fast "${nextest_extra[@]}"
step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
step audit scripts/audit.sh
finish
