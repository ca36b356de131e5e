#!/usr/bin/env bash
# soak.sh — the long soak (CI runs 30 s of it):
#
#   scripts/soak.sh [SECONDS]
#
# 64 NBD connections over 16 volumes verifying every write, with snapshots, backups and a DR
# group replicating every second, for SECONDS (default 1800); then the checks of
# tests/tests/soak.rs (zero verification errors, RSS growth bound, no descriptor leak). Prints
# the measured RSS and descriptor figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
s=${1:-1800}
[[ $s =~ ^[0-9]+$ && $s -gt 0 ]] || { echo "soak.sh: SECONDS must be a positive number, not '$s'" >&2; exit 2; }
features=(--features evs-target/failpoints)
cargo build --workspace --bins "${features[@]}"
EVS_SOAK_SECONDS=$s cargo nextest run -p evs-tests --profile long --no-capture --test soak
