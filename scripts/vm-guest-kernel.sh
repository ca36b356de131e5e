#!/usr/bin/env bash
# vm-guest-kernel.sh — fetch a Debian kernel for the test VMs, without installing it.
#
#   scripts/vm-guest-kernel.sh DIR
#
# Leaves DIR/vmlinuz and DIR/modules/*.ko (the virtio modules the guest loads: virtio,
# virtio_ring, virtio_pci and its helpers, virtio_blk; ext4 is built into Debian's kernels).
# The package is linux-image-cloud-amd64's current kernel (small, virtio drivers, no firmware),
# fetched with `apt-get download` and unpacked with `dpkg-deb -x`: the host's kernel and boot
# loader are not touched. Does nothing when DIR already holds them. Needs apt (Debian/Ubuntu)
# and network access to the archive the first time.
set -euo pipefail

dir=${1:?usage: vm-guest-kernel.sh DIR}
mods=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

have_all() {
  [[ -s $dir/vmlinuz ]] || return 1
  for m in "${mods[@]}"; do [[ -s $dir/modules/$m.ko ]] || return 1; done
}
have_all && exit 0

command -v apt-get >/dev/null 2>&1 || { echo "vm-guest-kernel: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
meta=linux-image-cloud-amd64
# The metapackage depends on the versioned image package; that one holds the kernel.
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $pkg ]]; then
  # The package lists may be missing (a fresh container): refresh once.
  if [[ $(id -u) -eq 0 ]]; then apt-get update -q >/dev/null; else sudo -n apt-get update -q >/dev/null; fi
  pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[[ -n $pkg ]] || { echo "vm-guest-kernel: apt knows no $meta" >&2; exit 1; }

mkdir -p "$dir"
work=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) || { echo "vm-guest-kernel: apt-get download $pkg failed" >&2; exit 1; }
dpkg-deb -x "$work"/*.deb "$work/x"
mkdir -p "$dir/modules"
cp "$work"/x/boot/vmlinuz-* "$dir/vmlinuz.new"
for m in "${mods[@]}"; do
  f=$(find "$work/x/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
  [[ -n $f ]] || { echo "vm-guest-kernel: $pkg has no module $m" >&2; exit 1; }
  case $f in
    *.xz) xz -dc "$f" >"$dir/modules/$m.ko" ;;
    *) cp "$f" "$dir/modules/$m.ko" ;;
  esac
done
mv "$dir/vmlinuz.new" "$dir/vmlinuz"
echo "$pkg" >"$dir/package"
echo "vm-guest-kernel: $pkg in $dir"
