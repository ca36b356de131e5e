#!/usr/bin/env bash
# fuzz.sh — the long run of the cargo-fuzz targets (fuzz/README.md). Not part of
# scripts/test.sh: the CI suite stays short; this is the command for a longer soak.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each TARGET (default: every target of `cargo fuzz list`) for SECONDS of fuzzing
# (default 60), one after the other, after one build of all of them. Installs cargo-fuzz when
# it is missing (`cargo install cargo-fuzz --locked`); needs the nightly toolchain
# (`rustup toolchain install nightly`).
#
# Each target keeps its corpus in fuzz/corpus/<target>/ (grown run after run), writes crashes,
# timeouts and out-of-memory inputs to fuzz/artifacts/<target>/, and its libFuzzer log to
# fuzz/artifacts/<target>/last-run.log. libFuzzer's limits: -timeout=10 (an input taking
# longer is a hang), -rss_limit_mb=2048 (more is an OOM). The NBD targets get fuzz/nbd.dict,
# the backup targets fuzz/backup.dict.
#
# Environment: FUZZ_SANITIZER (cargo fuzz --sanitizer: none [default], address, ...),
# FUZZ_ARGS (extra libFuzzer arguments, e.g. "-jobs=2 -workers=2").
#
# Exit status: 0 when no target crashed; 1 when one did (each crash is named with its
# artifact and the command that replays it); 2 for a usage or setup error.
set -uo pipefail

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; }

case ${1:-} in -h | --help) usage; exit 0 ;; esac
seconds=60
if (($#)) && [[ $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
elif (($#)) && [[ $1 =~ ^[0-9] ]]; then
  echo "fuzz.sh: SECONDS must be a whole number, got $1 (see --help)" >&2
  exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: the nightly toolchain is missing: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked || { echo "fuzz.sh: cannot install cargo-fuzz" >&2; exit 2; }
fi

sanitizer=${FUZZ_SANITIZER:-none}
mapfile -t all < <(cargo +nightly fuzz list)
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")
for t in "${targets[@]}"; do
  if [[ " ${all[*]} " != *" $t "* ]]; then
    echo "fuzz.sh: unknown target $t (targets: ${all[*]})" >&2
    exit 2
  fi
done

echo "=== fuzz.sh: building ${#targets[@]} target(s) (sanitizer $sanitizer)"
if ((${#targets[@]} == ${#all[@]})); then
  cargo +nightly fuzz build --sanitizer "$sanitizer" || exit 2
else
  for t in "${targets[@]}"; do cargo +nightly fuzz build --sanitizer "$sanitizer" "$t" || exit 2; done
fi

crashed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log=fuzz/artifacts/$t/last-run.log
  dict=()
  [[ $t == nbd_* ]] && dict=(-dict=fuzz/nbd.dict)
  [[ $t == backup_* ]] && dict=(-dict=fuzz/backup.dict)
  echo "=== fuzz.sh: $t for ${seconds}s (log: $log)"
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments
  cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
    ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1)
  if ((rc == 0)); then
    summary+=("$t: ok, ${done_line:-${runs:-?} runs}")
  else
    artifact=$(grep -oE '(Test unit|artifact_prefix.*Test unit) written to [^ ]+' "$log" | grep -oE '[^ ]+$' | tail -1)
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -5 >&2
    summary+=("$t: CRASHED (exit $rc) after ${runs:-?} runs: ${artifact:-no artifact named, see $log}")
    crashed+=("$t")
    if [[ -n $artifact ]]; then
      echo "fuzz.sh: replay with: cargo +nightly fuzz run --sanitizer $sanitizer $t $artifact" >&2
    fi
  fi
done

echo
echo "=== fuzz.sh: summary (${seconds}s per target)"
printf '  %s\n' "${summary[@]}"
if ((${#crashed[@]})); then
  echo "fuzz.sh: ${#crashed[@]} target(s) crashed: ${crashed[*]}" >&2
  exit 1
fi
