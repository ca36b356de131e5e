#!/usr/bin/env bash
# backup-bench.sh — backups against restic, one run, same data, same disk.
#
#   benches/scripts/backup-bench.sh
#   NO_BUILD=1 SIZE=4G BENCH_DIR=/mnt/disk benches/scripts/backup-bench.sh
#
# Data: a SIZE volume (default 4 GiB), its first half incompressible (random), its second half
# compressible (every 4 KiB block: 1 KiB of random hex text, then zeros; ~3x with zstd) and
# nothing repeated (no two chunks alike: dedup does not help either side). The same bytes are a
# raw image file for restic.
#
# Steps, each timed, page cache dropped before each (as root):
#   1. full backup: ours (`backup create --wait`, local directory store, no key) vs `restic
#      backup IMAGE` into a new local repository (format 2, zstd compression auto, restic's
#      AES always on); at the end, ours again with a tenant key (encrypted, keyed chunk ids);
#   2. 1% change: 1% of the 1 MiB chunks rewritten with random data, in the volume and in the
#      image; incremental backup: ours vs restic's second `backup` of the image;
#   3. restore: ours (`backup restore --to NEW --wait`, the full backup) vs `restic restore`.
# Prints MB/s (of the volume's size) and ours / restic; the goals of issue 5: incremental >= 20x
# faster than full; full backup and restore >= 1.5x restic.
#
# Knobs: SIZE=4G, BENCH_DIR (needs ~4 x SIZE free), IO_BACKEND=auto, NO_BUILD=1, KEEP=1.
# Needs restic (Debian package restic), nbdcopy, qemu-io, python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
SIZE=${SIZE:-4G}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
IO_BACKEND=${IO_BACKEND:-auto}
KEEP=${KEEP:-0}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'backup-bench: %s\n' "$*" >&2; exit 1; }
for tool in restic nbdcopy qemu-io python3 numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install restic; scripts/install-test-deps.sh for the rest)"
done
bytes=$(numfmt --from=iec "${SIZE^^}") || die "SIZE=$SIZE is not a size"
((bytes % (2 << 20) == 0)) || die "SIZE must be a multiple of 2 MiB"

# shellcheck source=daemon.sh
source "$here/daemon.sh"
evs_build

work=$(mktemp -d "$BENCH_DIR/evs-backup-bench.XXXXXX")
socks=$(mktemp -d "${TMPDIR:-/tmp}/evs-sock.XXXXXX")
pids=()
cleanup() {
  local rc=$? p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $KEEP == 1 ]]; then echo "backup-bench: kept $work"; else rm -rf "$work"; fi
  rm -rf "$socks"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() {
  sync
  if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
}
now() { date +%s.%N; }
mbps() { python3 -c "print('%.1f' % ($bytes / 1e6 / ($2 - $1)))"; }
secs() { python3 -c "print('%.2f' % ($2 - $1))"; }

evs_start "$work/data" "$socks/evs.sock" "$work/evs.log" --io-backend "$IO_BACKEND"
pids+=("$evs_pid")
uri_of() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("unix_uri") or d["uri"])'; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
say "machine: $(nproc) CPUs, kernel $(uname -r), $(restic version | head -1); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown); work dir on $(df --output=fstype "$work" | tail -1)"

say "data: $SIZE, half random, half compressible text"
image=$work/image.raw
python3 - "$image" "$bytes" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    half = size // 2
    left = half
    while left:
        n = min(left, 8 << 20)
        f.write(os.urandom(n))
        left -= n
    block = bytearray(4096)
    for _ in range(half // 4096):
        block[:1024] = os.urandom(512).hex().encode()
        f.write(block)
PY
evsctl volume create v --size "$bytes" --tier unlimited >/dev/null
v_uri=$(evsctl --output json volume attach v --unix | uri_of)
nbdcopy --flush "$image" "$v_uri"
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$work/restic
restic init --repository-version 2 >/dev/null

# ---------------------------------------------------------------- 1. full backup
say "full backup: ours (no key)"
drop_caches
t0=$(now)
full=$(evsctl --output json backup create v --full --wait)
t1=$(now)
full_id=$(field '["backup_id"]' <<<"$full")
ours_full=$(mbps "$t0" "$t1"); ours_full_s=$(secs "$t0" "$t1")
stored=$(du -sb "$work/data/obs" | cut -f1)
echo "ours: $ours_full_s s, $ours_full MB/s, store $((stored >> 20)) MiB"

say "full backup: restic"
drop_caches
t0=$(now)
restic backup --quiet "$image" >/dev/null
t1=$(now)
restic_full=$(mbps "$t0" "$t1"); restic_full_s=$(secs "$t0" "$t1")
echo "restic: $restic_full_s s, $restic_full MB/s, repository $(($(du -sb "$work/restic" | cut -f1) >> 20)) MiB"

# ---------------------------------------------------------------- 2. 1% change, incremental
chunks=$((bytes >> 20))
changed=$(((chunks + 99) / 100))
say "change: $changed of $chunks 1 MiB chunks rewritten, in the volume and the image"
python3 - "$image" "$chunks" "$changed" >"$work/offsets" <<'PY'
import os, random, sys
path, chunks, changed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(5)
with open(path, "r+b") as f:
    for c in sorted(random.sample(range(chunks), changed)):
        f.seek(c << 20)
        f.write(os.urandom(1 << 20))
        print(c)
PY
# The same bytes into the volume, chunk by chunk (qemu-io, one connection, then a flush).
qargs=()
while read -r c; do
  dd if="$image" of="$work/chunk-$c.bin" bs=1M skip="$c" count=1 status=none
  qargs+=(-c "write -s $work/chunk-$c.bin $((c << 20)) 1M")
done <"$work/offsets"
qemu-io -f raw "${qargs[@]}" -c flush "$v_uri" >/dev/null
rm -f "$work"/chunk-*.bin

say "incremental backup: ours"
drop_caches
t0=$(now)
inc=$(evsctl --output json backup create v --wait)
t1=$(now)
ours_inc_s=$(secs "$t0" "$t1")
inc_id=$(field '["backup_id"]' <<<"$inc")
inc_show=$(evsctl --output json backup show "$inc_id")
echo "ours: $ours_inc_s s; $(field '["mode"]' <<<"$inc_show"), chunks read $(field '["stats"]["chunks_read"]' <<<"$inc_show"), uploaded $(field '["stats"]["chunks_uploaded"]' <<<"$inc_show")"

say "incremental backup: restic"
drop_caches
t0=$(now)
restic backup --quiet "$image" >/dev/null
t1=$(now)
restic_inc_s=$(secs "$t0" "$t1")
echo "restic: $restic_inc_s s"

# ---------------------------------------------------------------- 3. restore
say "restore: ours (the full backup into a new volume)"
drop_caches
t0=$(now)
evsctl --output json backup restore "$full_id" --to r --wait >/dev/null
t1=$(now)
ours_restore=$(mbps "$t0" "$t1"); ours_restore_s=$(secs "$t0" "$t1")
echo "ours: $ours_restore_s s, $ours_restore MB/s"

say "restore: restic (the first snapshot into a directory)"
first=$(restic snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["short_id"])')
drop_caches
t0=$(now)
restic restore --quiet "$first" --target "$work/restored"
sync
t1=$(now)
restic_restore=$(mbps "$t0" "$t1"); restic_restore_s=$(secs "$t0" "$t1")
echo "restic: $restic_restore_s s, $restic_restore MB/s"

# A restore that is not the data is not a restore: check ours byte for byte.
r_uri=$(evsctl --output json volume attach r --unix | uri_of)
nbdcopy "$r_uri" "$work/ours-restored.raw"
python3 - "$work/ours-restored.raw" "$work/restored" "$bytes" <<'PY'
import sys, os, hashlib
ours, rdir, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
found = [os.path.join(d, f) for d, _, fs in os.walk(rdir) for f in fs]
assert len(found) == 1, found
def h(p):
    x = hashlib.blake2b()
    with open(p, "rb") as f:
        while b := f.read(8 << 20):
            x.update(b)
    return x.hexdigest()
assert os.path.getsize(ours) == size and os.path.getsize(found[0]) == size
assert h(ours) == h(found[0]), "our restore and restic's restore of the same full backup differ"
print("both restores hold the same bytes")
PY

say "full backup: ours (tenant key set: AES-GCM, keyed chunk ids; last, as a key change makes the next backup full)"
evsctl backup set-key --key-hex "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
drop_caches
t0=$(now)
evsctl --output json backup create v --full --wait >/dev/null
t1=$(now)
ours_enc=$(mbps "$t0" "$t1"); ours_enc_s=$(secs "$t0" "$t1")
echo "ours (encrypted): $ours_enc_s s, $ours_enc MB/s"
evsctl backup set-key --clear >/dev/null

say "results ($SIZE; MB/s of the volume size; ours / restic)"
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
printf '%-22s %12s %12s %10s %s\n' step ours restic ratio goal
printf '%-22s %12s %12s %10s %s\n' "full backup MB/s" "$ours_full" "$restic_full" "$(ratio "$ours_full" "$restic_full")" ">= 1.5"
printf '%-22s %12s %12s %10s %s\n' "full, encrypted MB/s" "$ours_enc" "$restic_full" "$(ratio "$ours_enc" "$restic_full")" "(restic always encrypts)"
printf '%-22s %12s %12s %10s %s\n' "incremental 1% s" "$ours_inc_s" "$restic_inc_s" "$(ratio "$restic_inc_s" "$ours_inc_s")" "(restic s / ours s)"
printf '%-22s %12s %12s %10s %s\n' "full / incremental" "$(ratio "$ours_full_s" "$ours_inc_s")" "$(ratio "$restic_full_s" "$restic_inc_s")" "" ">= 20 (ours)"
printf '%-22s %12s %12s %10s %s\n' "restore MB/s" "$ours_restore" "$restic_restore" "$(ratio "$ours_restore" "$restic_restore")" ">= 1.5"
