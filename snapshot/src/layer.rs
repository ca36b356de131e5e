//! One layer: a sparse data file and its allocation map.
//!
//! Files, in the store's `layers/` directory:
//! * `<id as 16 hex digits>.data`: the layer's blocks at their volume offsets; the file is as
//!   long as the volume rounded up to 4 KiB and sparse where the layer holds nothing.
//! * `<id>.map`: the [`AllocMap`] (format documented in `alloc_map.rs`).
//!
//! The data file is opened twice: buffered (reads, large writes, syncs) and, where the
//! filesystem allows it, with O_DIRECT for small aligned writes.

use std::fs::{File, OpenOptions};
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use rustix::fs::{Advice, FallocateFlags};

use crate::alloc_map::AllocMap;
use crate::error::StoreError;
use crate::BLOCK_SIZE;

/// Raises this process's soft limit of open files to its hard limit and returns the new soft
/// limit. Every open layer holds three descriptors (data, O_DIRECT data, map), so a store with
/// many snapshots outgrows the usual soft limit of 1024 long before the hard one.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        setrlimit(Resource::Nofile, l)?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

pub struct Layer {
    pub id: u64,
    data: File,
    direct: Option<File>,
    map_file: File,
    pub map: AllocMap,
    /// Set by every change of data or map; a flush with nothing to do returns at once.
    changed: AtomicBool,
    flush_lock: Mutex<()>,
}

pub fn data_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.data"))
}

pub fn map_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.map"))
}

/// Parses a layer file name back to its id (for the sweep of orphans).
pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".data").or_else(|| name.strip_suffix(".map"))?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

impl Layer {
    /// Creates the files of a new, empty layer for a volume of `size` bytes and syncs them.
    pub fn create(dir: &Path, id: u64, size: u64, want_direct: bool) -> Result<Layer, StoreError> {
        let data = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(data_path(dir, id))?;
        data.set_len(blocks_for(size) * BLOCK_SIZE)?;
        data.sync_all()?;
        let map_file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(map_path(dir, id))?;
        let map = AllocMap::create_file(&map_file, blocks_for(size))?;
        map_file.sync_all()?;
        File::open(dir)?.sync_all()?;
        let direct = if want_direct { open_direct(&data_path(dir, id)) } else { None };
        Ok(Layer { id, data, direct, map_file, map, changed: AtomicBool::new(false), flush_lock: Mutex::new(()) })
    }

    /// Opens an existing layer.
    pub fn open(dir: &Path, id: u64, want_direct: bool) -> Result<Layer, StoreError> {
        let dp = data_path(dir, id);
        let data = OpenOptions::new().read(true).write(true).open(&dp).map_err(|e| StoreError::Corrupt {
            what: format!("layer {id:016x}"),
            why: format!("data file {}: {e}", dp.display()),
        })?;
        let map_file = OpenOptions::new().read(true).write(true).open(map_path(dir, id))?;
        let map = AllocMap::load(&map_file, &format!("allocation map of layer {id:016x}"))?;
        let direct = if want_direct { open_direct(&dp) } else { None };
        Ok(Layer { id, data, direct, map_file, map, changed: AtomicBool::new(false), flush_lock: Mutex::new(()) })
    }

    /// Descriptor for reads and buffered writes.
    pub fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    /// Descriptor opened with O_DIRECT, if the filesystem allowed it.
    pub fn direct_fd(&self) -> Option<RawFd> {
        self.direct.as_ref().map(|f| f.as_raw_fd())
    }

    /// The data file opened with O_DIRECT, if the filesystem allowed it.
    pub fn direct_file(&self) -> Option<&File> {
        self.direct.as_ref()
    }

    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// Notes that data or map changed since the last flush.
    pub fn mark_changed(&self) {
        self.changed.store(true, Ordering::Release);
    }

    /// The durability rule: copy the dirty map pages, sync the data, then write and sync the
    /// map pages. Every bit written describes data synced before it.
    pub fn flush(&self) -> Result<(), StoreError> {
        let _g = self.flush_lock.lock();
        if !self.changed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let pages = self.map.take_dirty();
        let res = self.data.sync_data().and_then(|()| {
            crate::crash_point!("layer-flush-after-data-sync");
            self.map.write(&self.map_file, &pages)
        });
        if let Err(e) = res {
            self.map.restore_dirty(&pages);
            self.changed.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    /// Grows the layer for a volume of `size` bytes, durably.
    pub fn grow(&self, size: u64) -> Result<(), StoreError> {
        let blocks = blocks_for(size);
        if self.data.metadata()?.len() < blocks * BLOCK_SIZE {
            self.data.set_len(blocks * BLOCK_SIZE)?;
        }
        AllocMap::reserve(&self.map_file, blocks)?;
        self.map.grow(blocks);
        self.mark_changed();
        self.flush()
    }

    /// Gives the space of a block-aligned byte range back to the filesystem.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.fallocate(FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)
    }

    /// Zeroes a block-aligned byte range in place (the filesystem's ZERO_RANGE), keeping it
    /// allocated; [`StoreError::SlowZeroes`] where the filesystem cannot.
    pub fn zero_range_in_place(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match self.fallocate(FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, offset, len) {
            Err(StoreError::Io(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(StoreError::SlowZeroes),
            other => other,
        }
    }

    /// Zeroes a block-aligned byte range, keeping it allocated: in place where the
    /// filesystem can, else by writing the zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match self.zero_range_in_place(offset, len) {
            Err(StoreError::SlowZeroes) => {
                // Filesystems without ZERO_RANGE: write the zeros.
                let zeros = vec![0u8; (1 << 20).min(len as usize)];
                let mut off = offset;
                while off < offset + len {
                    let n = zeros.len().min((offset + len - off) as usize);
                    std::os::unix::fs::FileExt::write_all_at(&self.data, &zeros[..n], off)?;
                    off += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(&self.data, mode, offset, len).map_err(|e| StoreError::Io(e.into()))
    }

    /// Asks the kernel to read a range ahead (NBD CACHE). Advisory: errors are ignored.
    pub fn prefetch(&self, offset: u64, len: u64) {
        let _ = rustix::fs::fadvise(&self.data, offset, NonZeroU64::new(len), Advice::WillNeed);
    }
}

/// Opens `path` with O_DIRECT, or None where the filesystem refuses it (tmpfs, some overlays).
fn open_direct(path: &Path) -> Option<File> {
    match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!(path = %path.display(), error = %e, "O_DIRECT refused; small writes go through the page cache");
            None
        }
    }
}
