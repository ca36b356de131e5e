//! Benchmarks of the EVS engine: criterion benches in `benches/`, end-to-end scripts in `scripts/`.
//!
//! This library holds the fixtures the criterion benches share: a block store in a temporary
//! directory with one volume, and the allocation patterns written into it before measuring.

use std::sync::Arc;

use evs_snapshot::{BlockStore, EngineKind, StoreOptions, Volume, BLOCK_SIZE};

/// Owner label of the benchmark volumes.
pub const OWNER: &str = "bench";

/// The engine the benches use: `EVS_BENCH_IO_BACKEND` (`uring`, `portable` or `auto`) when set,
/// else what [`EngineKind::detect`] finds.
pub fn engine_kind() -> EngineKind {
    match std::env::var("EVS_BENCH_IO_BACKEND") {
        Ok(s) => EngineKind::parse(&s).unwrap_or_else(|e| panic!("EVS_BENCH_IO_BACKEND: {e}")),
        Err(_) => EngineKind::detect(),
    }
}

/// Store options of the benches: the daemon's defaults (small aligned writes with O_DIRECT),
/// with no practical snapshot limit (the create bench takes thousands).
pub fn store_options(engine: EngineKind) -> StoreOptions {
    StoreOptions { engine, direct_writes: true, direct_write_max: 64 * 1024, max_snapshots: 1 << 20 }
}

/// A block store in a temporary directory (removed on drop) and one open volume.
pub struct Fixture {
    pub store: Arc<BlockStore>,
    pub volume: Arc<Volume>,
    pub engine: EngineKind,
    // Declared last: dropped after the store has closed its files.
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Opens a store in a fresh temporary directory (under `EVS_BENCH_DIR` when set, so the
    /// benches can run on the disk under test rather than a tmpfs) and creates a thin volume of
    /// `size` bytes named `name`.
    pub fn new(name: &str, size: u64) -> Fixture {
        let dir = match std::env::var_os("EVS_BENCH_DIR") {
            Some(base) => tempfile::Builder::new().prefix("evs-bench").tempdir_in(base),
            None => tempfile::Builder::new().prefix("evs-bench").tempdir(),
        }
        .expect("temporary directory");
        evs_snapshot::layer::raise_open_file_limit().expect("raise the open file limit");
        let engine = engine_kind();
        let store = BlockStore::open(dir.path(), store_options(engine)).expect("open block store");
        let info = store.create_volume(OWNER, name, size).expect("create volume");
        let volume = store.open_volume(info.id).expect("open volume");
        Fixture { store, volume, engine, _dir: dir }
    }
}

/// A recognisable, non-zero pattern of `len` bytes (zero-detection must not skip it).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

/// Writes `len` bytes of pattern at `offset` and nothing else.
pub fn fill(volume: &Volume, offset: u64, len: usize) {
    volume.write_at(offset, &pattern(len, 0x5a)).expect("write_at");
}

/// Mixed allocation over `range`: in every `stripe` bytes, the first 1 to 4 blocks (varying from
/// stripe to stripe) are written, the rest stays a hole. Returns the bytes written.
pub fn fill_mixed(volume: &Volume, range: std::ops::Range<u64>, stripe: u64) -> u64 {
    assert!(stripe.is_multiple_of(BLOCK_SIZE) && stripe >= 4 * BLOCK_SIZE);
    let data = pattern(4 * BLOCK_SIZE as usize, 0xa5);
    let mut written = 0;
    let mut off = range.start;
    let mut i = 0u64;
    while off + stripe <= range.end {
        let len = ((i % 4) + 1) * BLOCK_SIZE;
        volume.write_at(off, &data[..len as usize]).expect("write_at");
        written += len;
        off += stripe;
        i += 1;
    }
    volume.flush().expect("flush");
    written
}

/// Deterministic pseudo-random block-aligned offsets in `0..size` (no RNG dependency; the same
/// sequence on every run).
pub struct Offsets {
    state: u64,
    blocks: u64,
}

impl Offsets {
    pub fn new(size: u64, seed: u64) -> Offsets {
        Offsets { state: seed | 1, blocks: size / BLOCK_SIZE }
    }
}

impl Iterator for Offsets {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        // 64-bit LCG (Knuth's MMIX constants); the high bits are the well-mixed ones.
        self.state = self.state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        Some((self.state >> 33) % self.blocks * BLOCK_SIZE)
    }
}
