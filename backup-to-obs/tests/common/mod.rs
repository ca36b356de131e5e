//! Shared by the integration tests: the two real stores (a directory, Garage), an in-memory
//! volume to back up and one to restore into, and a progress that can cancel.
#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use evs_backup::{ChunkSink, ChunkSource, ObjectStore, OpendalStore, Progress, StoreConfig};
use parking_lot::Mutex;

/// A store for one test; the directory (fs) lives as long as it.
pub struct TestStore {
    pub store: Arc<dyn ObjectStore>,
    pub config: StoreConfig,
    _dir: Option<tempfile::TempDir>,
}

impl TestStore {
    pub fn fs() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig::File { path: dir.path().join("obs") };
        TestStore { store: Arc::new(OpendalStore::open(&config).unwrap()), config, _dir: Some(dir) }
    }

    /// Garage (or any S3 server) from the environment `scripts/garage.sh start` prints, under a
    /// key prefix of its own so tests share the bucket.
    pub fn s3() -> TestStore {
        let var = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
                panic!(
                    "{name} is not set: this test needs a real S3 server. Start one with \
                     `eval \"$(scripts/garage.sh start)\"` (scripts/test.sh does) and run the tests again"
                )
            })
        };
        let config = StoreConfig::S3 {
            bucket: var("EVS_TEST_S3_BUCKET"),
            prefix: format!("test-{}", random_hex(8)),
            endpoint: var("EVS_TEST_S3_ENDPOINT"),
            region: var("EVS_TEST_S3_REGION"),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
        };
        TestStore { store: Arc::new(OpendalStore::open(&config).unwrap()), config, _dir: None }
    }

    /// Keys of the objects under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.store.list(prefix).await.unwrap().into_iter().map(|m| m.key).collect()
    }
}

pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic incompressible bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs a test body once against a directory store and once against Garage.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fs() {
                super::$name($crate::common::TestStore::fs()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn s3() {
                super::$name($crate::common::TestStore::s3()).await
            }
        }
    )*};
}

/// A volume in memory, read by chunk.
pub struct MemSource {
    pub data: Vec<u8>,
    pub chunk_size: usize,
    pub reads: AtomicU64,
}

impl MemSource {
    pub fn new(data: Vec<u8>, chunk_size: u32) -> Arc<MemSource> {
        Arc::new(MemSource { data, chunk_size: chunk_size as usize, reads: AtomicU64::new(0) })
    }
}

impl ChunkSource for MemSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = index as usize * self.chunk_size;
        let end = start + buf.len();
        if end > self.data.len() || buf.len() > self.chunk_size {
            return Err(io::Error::other(format!("read of chunk {index} ({} bytes) past the end", buf.len())));
        }
        buf.copy_from_slice(&self.data[start..end]);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A restore target in memory, filled with 0xEE so that a range left unwritten shows.
pub struct MemSink {
    pub data: Mutex<Vec<u8>>,
    pub writes: AtomicU64,
    pub zeroed: AtomicU64,
    pub flushed: AtomicBool,
}

impl MemSink {
    pub fn new(size: u64) -> Arc<MemSink> {
        Arc::new(MemSink {
            data: Mutex::new(vec![0xEE; size as usize]),
            writes: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            flushed: AtomicBool::new(false),
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().clone()
    }

    pub fn untouched(&self) -> bool {
        self.writes.load(Ordering::Relaxed) == 0 && self.zeroed.load(Ordering::Relaxed) == 0
    }
}

impl ChunkSink for MemSink {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.data.lock();
        let at = offset as usize;
        d.get_mut(at..at + data.len()).ok_or_else(|| io::Error::other("write past the end"))?.copy_from_slice(data);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.lock();
        let at = offset as usize;
        d.get_mut(at..at + len as usize).ok_or_else(|| io::Error::other("zero past the end"))?.fill(0);
        self.zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushed.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Progress that records what it is told and cancels after `cancel_after` done reports.
#[derive(Default)]
pub struct TestProgress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub reports: AtomicU64,
    pub cancel_after: Option<u64>,
}

impl TestProgress {
    pub fn cancelling_after(n: u64) -> TestProgress {
        TestProgress { cancel_after: Some(n), ..Default::default() }
    }
}

impl Progress for TestProgress {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.reports.fetch_add(1, Ordering::Relaxed);
    }

    fn cancelled(&self) -> bool {
        self.cancel_after.is_some_and(|n| self.reports.load(Ordering::Relaxed) >= n)
    }
}
