#!/usr/bin/env bash
# crash-matrix.sh — the long run of the crash tests (CI runs a sample of each):
#
#   scripts/crash-matrix.sh [ITERATIONS]
#
# Builds the binaries with their crash points (--features evs-target/failpoints), then runs
# tests/tests/crash_matrix.rs with EVS_CRASH_MATRIX_ITERATIONS=ITERATIONS (default 50: every
# crash point of every row 50 times, ~700 aborts in all) and tests/tests/crash.rs (kill -9 at
# random points of writes, snapshots and merges) with EVS_CRASH_ITERATIONS=4×ITERATIONS.
# Needs what scripts/test.sh installs (qemu-utils, libnbd-bin, cargo-nextest). Prints each
# test's summary line (iterations, operations, crashes); exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-50}
[[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || { echo "crash-matrix.sh: ITERATIONS must be a positive number, not '$n'" >&2; exit 2; }
features=(--features evs-target/failpoints)
cargo build --workspace --bins "${features[@]}"
EVS_CRASH_MATRIX_ITERATIONS=$n EVS_CRASH_ITERATIONS=$((4 * n)) \
  cargo nextest run -p evs-tests --profile long --no-fail-fast --no-capture \
  --test crash_matrix --test crash
