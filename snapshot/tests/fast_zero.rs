//! `write_zeroes_fast` (NBD FAST_ZERO): zeroes where that is quick, and where it would mean
//! writing the zeros (keeping the range allocated on a filesystem without ZERO_RANGE, such as
//! tmpfs) refuses with `SlowZeroes` — errno ENOTSUP — and changes nothing.

use std::path::Path;

use evs_snapshot::{BlockStore, StoreError, StoreOptions};
use rustix::fs::FallocateFlags;

const SIZE: u64 = 1 << 20;

/// Whether the filesystem of `dir` zeroes a range in place.
fn zero_range_supported(dir: &Path) -> bool {
    let f = std::fs::File::create(dir.join("probe")).unwrap();
    f.set_len(1 << 16).unwrap();
    let r = rustix::fs::fallocate(&f, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, 0, 4096);
    std::fs::remove_file(dir.join("probe")).unwrap();
    r.is_ok()
}

fn check(dir: &Path) {
    // Buffered: tmpfs refuses O_DIRECT on older kernels, and this is not about the write path.
    let opts = StoreOptions { direct_writes: false, ..Default::default() };
    let store = BlockStore::open(dir, opts).unwrap();
    let vol = store.open_volume(store.create_volume("t", "v", SIZE).unwrap().id).unwrap();
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 + 1).collect();
    vol.write_at(0, &pattern).unwrap();
    vol.flush().unwrap();
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        vol.read_at(off, &mut b).unwrap();
        b
    };

    // Unaligned edges and a block-aligned body, kept allocated.
    let (off, len) = (1000u64, 3 * 4096 + 500);
    let r = vol.write_zeroes_fast(off, len, true);
    if zero_range_supported(dir) {
        r.unwrap();
        assert_eq!(read(off, len as usize), vec![0u8; len as usize]);
    } else {
        let e = r.unwrap_err();
        assert!(matches!(e, StoreError::SlowZeroes), "{e}");
        assert_eq!(e.errno(), libc::ENOTSUP);
        assert_eq!(read(0, SIZE as usize), pattern, "a refused fast zero changed the volume");
        // Without the fast-only condition it writes them.
        vol.write_zeroes(off, len, true).unwrap();
        assert_eq!(read(off, len as usize), vec![0u8; len as usize]);
    }
    assert_eq!(read(0, off as usize), pattern[..off as usize], "before the range");
    let end = (off + len) as usize;
    assert_eq!(read(off + len, SIZE as usize - end), pattern[end..], "after the range");

    // Holes allowed: a discard, always quick.
    vol.write_zeroes_fast(64 << 10, 256 << 10, false).unwrap();
    assert_eq!(read(64 << 10, 256 << 10), vec![0u8; 256 << 10]);
    vol.flush().unwrap();
}

#[test]
fn on_the_test_filesystem() {
    check(tempfile::tempdir().unwrap().path());
}

#[test]
fn on_tmpfs_which_cannot_zero_a_range_in_place() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm (tmpfs) on this machine");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    check(dir.path());
}
