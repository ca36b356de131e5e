//! Small helpers: a seedable pseudo-random generator, content comparison, sparse images.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
/// Allocation granularity of the block store.
pub const BLOCK: u64 = 4096;

/// xorshift64*: fast, deterministic, good enough for test data and choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that small seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    /// A seed from the clock, printed so that a failing run can be replayed with
    /// `EVS_TEST_SEED=<seed>`.
    pub fn from_env_or_time(what: &str) -> Rng {
        let seed = std::env::var("EVS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("{what}: seed {seed} (replay with EVS_TEST_SEED={seed})");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Deterministic data of `len` bytes derived from `seed` (never all zeros for len >= 8).
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Index of the first differing byte, if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Panics with the first differing offset (relative to `base`) when `got != want`.
pub fn assert_bytes_eq(got: &[u8], want: &[u8], base: u64, what: &str) {
    if let Some(i) = first_difference(got, want) {
        let show = |v: &[u8]| {
            let end = (i + 16).min(v.len());
            v[i.min(v.len())..end].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
        };
        panic!(
            "{what}: data differs at byte {} (offset {} + {i}); lengths got {} want {}\n  got:  {}\n  want: {}",
            base + i as u64,
            base,
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

pub fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// A 64-bit checksum of a file's content (FNV-style over 8-byte words; not cryptographic).
pub fn file_checksum(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 4 << 20];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut total = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf);
        if n == 0 {
            break;
        }
        total += n as u64;
        let mut chunks = buf[..n].chunks_exact(8);
        for c in &mut chunks {
            h ^= u64::from_le_bytes(c.try_into().unwrap());
            h = h.wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        for &b in chunks.remainder() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^ total
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

/// Asserts two files have the same length and bytes; on failure names the first differing
/// offset (and both checksums).
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = a.metadata().unwrap_or_else(|e| panic!("{}: {e}", a.display())).len();
    let lb = b.metadata().unwrap_or_else(|e| panic!("{}: {e}", b.display())).len();
    assert_eq!(la, lb, "{} is {la} bytes but {} is {lb}", a.display(), b.display());
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        assert_eq!(na, nb, "short read comparing {} and {}", a.display(), b.display());
        if na == 0 {
            break;
        }
        if let Some(i) = first_difference(&ba[..na], &bb[..nb]) {
            panic!(
                "{} and {} differ at byte {} (checksums {:016x} vs {:016x})",
                a.display(),
                b.display(),
                pos + i as u64,
                file_checksum(a),
                file_checksum(b)
            );
        }
        pos += na as u64;
    }
}

/// Creates a sparse file of `size` bytes and writes each `(offset, data)` into it.
pub fn write_sparse_file(path: &Path, size: u64, pieces: &[(u64, Vec<u8>)]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    for (off, data) in pieces {
        assert!(off + data.len() as u64 <= size);
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(data).unwrap();
    }
    f.sync_all().ok();
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns the last answer.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a whole file into memory.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
