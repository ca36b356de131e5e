#!/usr/bin/env bash
# install-test-deps.sh — install what the test suite needs, only what is missing.
#
#   scripts/install-test-deps.sh
#
# * Debian/Ubuntu packages: qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin (nbdinfo,
#   nbdcopy), fio (with its nbd engine), nbdkit, bsdutils (`script`: a pty for the progress-bar
#   test; essential on Debian, so normally present). `apt-get update` runs once, and only when
#   something is missing. Runs as root, or through sudo when not root (non-interactive when
#   there is no terminal).
# * Rust tools: cargo-nextest (`cargo install cargo-nextest --locked`), rustfmt and clippy
#   (`rustup component add`, when rustup manages the toolchain), and Garage, the S3 server the
#   backup tests run against (`cargo install --locked garage --version 2.5.0`: ~20 minutes on
#   2 cores, so only when missing).
#
# Idempotent: a second run installs nothing. Prints what it installed. Exits non-zero when
# something is missing and cannot be installed here.
set -euo pipefail

log() { printf 'install-test-deps: %s\n' "$*"; }
installed=()

# command -> Debian package that provides it
declare -A pkg_of=(
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [fio]=fio
  [nbdkit]=nbdkit
  [script]=bsdutils
)

missing_pkgs=()
for cmd in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy fio nbdkit script; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    p=${pkg_of[$cmd]}
    [[ " ${missing_pkgs[*]-} " == *" $p "* ]] || missing_pkgs+=("$p")
  fi
done

if ((${#missing_pkgs[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing packages: ${missing_pkgs[*]} — no apt-get here; install them with your package manager" >&2
    exit 1
  fi
  if [[ $(id -u) -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    if [[ -t 0 ]]; then as_root=(sudo); else as_root=(sudo -n); fi
  else
    log "missing packages: ${missing_pkgs[*]} — not root and no sudo; run as root: apt-get install ${missing_pkgs[*]}" >&2
    exit 1
  fi
  log "installing ${missing_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}" </dev/null
  installed+=("${missing_pkgs[@]}")
fi

# fio must have its nbd engine (Debian's fio links libnbd).
if ! fio --enghelp=nbd >/dev/null 2>&1; then
  log "this fio has no nbd engine; install Debian's fio (built with libnbd)" >&2
  exit 1
fi

# rustfmt and clippy: scripts/test.sh runs them.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    log "installing rustfmt and clippy (rustup component add)"
    rustup component add rustfmt clippy </dev/null
    installed+=(rustfmt clippy)
  else
    log "cargo fmt / cargo clippy missing and no rustup to add them" >&2
    exit 1
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest (cargo install cargo-nextest --locked; takes a few minutes)"
  cargo install cargo-nextest --locked </dev/null
  installed+=(cargo-nextest)
fi

# Garage, the S3-compatible server the backup tests run against (a real one, not a mock).
# Built from crates.io: about 17-20 minutes on 2 cores the first time, so only when missing.
GARAGE_VERSION=2.5.0
if ! garage --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
  log "installing garage $GARAGE_VERSION (cargo install --locked garage; takes a while the first time)"
  cargo install --locked garage --version "$GARAGE_VERSION" </dev/null
  installed+=(garage)
fi

if ((${#installed[@]})); then
  log "installed: ${installed[*]}"
else
  log "nothing to install (qemu-utils, libnbd-bin, fio, nbdkit, cargo-nextest, garage present)"
fi
