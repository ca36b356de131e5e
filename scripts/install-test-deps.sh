#!/usr/bin/env bash
# install-test-deps.sh — install what the test suite needs, only what is missing.
#
#   scripts/install-test-deps.sh
#
# * Debian/Ubuntu packages: qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin (nbdinfo,
#   nbdcopy), fio (with its nbd engine), nbdkit, bsdutils (`script`: a pty for the progress-bar
#   test; essential on Debian, so normally present), and for the VM tests qemu-system-x86
#   (qemu-system-x86_64; from the distribution's backports when apt offers it there, as
#   qemu-utils may be), busybox-static (the guest's userland) and e2fsprogs (debugfs reads the
#   guest's files on the host). `apt-get update` runs once, and only when something is missing.
# * The VM tests' guest kernel: scripts/vm-guest-kernel.sh fetches Debian's cloud kernel with
#   `apt-get download` into target/vm-guest/kernel (unpacked there; nothing is installed). Runs as root, or through sudo when not root (non-interactive when
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
  [qemu-system-x86_64]=qemu-system-x86
  [debugfs]=e2fsprogs
)

missing_pkgs=()
for cmd in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy fio nbdkit script qemu-system-x86_64 debugfs; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    p=${pkg_of[$cmd]}
    [[ " ${missing_pkgs[*]-} " == *" $p "* ]] || missing_pkgs+=("$p")
  fi
done

# The guest's userland must be the static busybox (the initramfs has no libraries for it).
static_busybox=false
for b in /usr/bin/busybox /bin/busybox; do
  if [[ -x $b ]] && ! grep -q "/lib64/ld-linux" "$b" 2>/dev/null; then static_busybox=true; fi
done
$static_busybox || missing_pkgs+=(busybox-static)

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
  # QEMU (qemu-utils, qemu-system-x86) from Debian backports when there is one for this
  # release: the two must come from the same version (installing one from another release
  # removes the other), and the newer vhost-user-blk is the better test peer. A private
  # sources list (the system's, plus backports) keeps the system's apt configuration as it is.
  qemu_pkgs=() other_pkgs=()
  for p in "${missing_pkgs[@]}"; do
    case $p in qemu-utils | qemu-system-x86) qemu_pkgs+=("$p") ;; *) other_pkgs+=("$p") ;; esac
  done
  if ((${#other_pkgs[@]})); then
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${other_pkgs[@]}" </dev/null
  fi
  if ((${#qemu_pkgs[@]})); then
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    bpo_ok=false
    if [[ -r /etc/debian_version && -n $codename ]]; then
      bpo=$(mktemp -d)
      mkdir -p "$bpo/lists/partial" "$bpo/archives/partial"
      {
        echo "deb http://deb.debian.org/debian $codename main"
        echo "deb http://deb.debian.org/debian $codename-updates main"
        echo "deb http://deb.debian.org/debian-security $codename-security main"
        echo "deb http://deb.debian.org/debian $codename-backports main"
      } >"$bpo/sources.list"
      apt_bpo=(-o "Dir::Etc::sourcelist=$bpo/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::lists=$bpo/lists" -o "Dir::Cache::archives=$bpo/archives")
      # Both packages, so they stay at one version.
      if "${as_root[@]}" apt-get "${apt_bpo[@]}" update -q </dev/null >/dev/null 2>&1 &&
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_bpo[@]}" install -y -q \
          --no-install-recommends -t "$codename-backports" qemu-utils qemu-system-x86 </dev/null; then
        bpo_ok=true
      fi
      "${as_root[@]}" rm -rf "$bpo"
    fi
    if ! $bpo_ok; then
      log "no backports here; installing ${qemu_pkgs[*]} from the release"
      "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends qemu-utils qemu-system-x86 </dev/null
    fi
  fi
  installed+=("${missing_pkgs[@]}")
fi

# The VM tests' guest kernel (once; cached in the target directory).
root=$(cd "$(dirname "$0")/.." && pwd)
kernel_dir=${EVS_VM_CACHE:-${CARGO_TARGET_DIR:-$root/target}/vm-guest}/kernel
if [[ ! -s $kernel_dir/vmlinuz ]]; then
  log "fetching the VM tests' guest kernel into $kernel_dir"
  "$root/scripts/vm-guest-kernel.sh" "$kernel_dir"
  installed+=(guest-kernel)
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
  log "nothing to install (qemu-utils, libnbd-bin, fio, nbdkit, qemu-system-x86, busybox-static, e2fsprogs, guest kernel, cargo-nextest, garage present)"
fi
