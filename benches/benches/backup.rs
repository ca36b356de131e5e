//! Criterion benches of the backup engine: the chunk codec (1 MiB, compressible and not,
//! plain and encrypted) and a full backup of a 256 MiB in-memory volume to a directory store.
//!
//! ```text
//! cargo bench -p evs-benches --bench backup
//! EVS_BENCH_DIR=/mnt/disk cargo bench -p evs-benches --bench backup   # store on that disk
//! ```

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use evs_backup::{
    decode_chunk, encode_chunk, new_backup_id, BackupRequest, ChunkId, ChunkSource, Engine, EngineOptions, NoProgress,
    OpendalStore, StoreConfig, TenantKeys,
};

const MIB: usize = 1 << 20;
const VOLUME: usize = 256 * MIB;

/// Incompressible bytes (xorshift).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Text-like bytes zstd shrinks about 4 times.
fn compressible(n: usize, seed: u64) -> Vec<u8> {
    let words = noise(4096, seed);
    (0..n).map(|i| b'a' + words[(i / 7) % words.len()] % 16).collect()
}

fn codec(c: &mut Criterion) {
    let keys = TenantKeys::new(&[7u8; 32]);
    let mut g = c.benchmark_group("chunk_1m");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, data) in [("compressible", compressible(MIB, 1)), ("incompressible", noise(MIB, 2))] {
        for (mode, k) in [("plain", None), ("encrypted", Some(&keys))] {
            let id = ChunkId::of(&data, k);
            g.bench_function(format!("encode/{name}/{mode}"), |b| {
                b.iter(|| encode_chunk(&id, black_box(&data), 3, k).expect("encode"))
            });
            let object = encode_chunk(&id, &data, 3, k).expect("encode");
            g.bench_function(format!("decode/{name}/{mode}"), |b| {
                b.iter(|| decode_chunk(&id, black_box(&object), MIB, k).expect("decode"))
            });
        }
        g.bench_function(format!("hash/{name}"), |b| b.iter(|| ChunkId::of(black_box(&data), None)));
    }
    g.finish();
}

struct MemVolume(Vec<u8>);

impl ChunkSource for MemVolume {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let at = index as usize * MIB;
        buf.copy_from_slice(&self.0[at..at + buf.len()]);
        Ok(())
    }
}

fn engine_backup(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let base = std::env::var_os("EVS_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    // Half the chunks compressible, all distinct: every backup uploads everything, so each
    // iteration gets a new store.
    let mut data = noise(VOLUME, 3);
    for c in (0..VOLUME / MIB).step_by(2) {
        data[c * MIB..(c + 1) * MIB].copy_from_slice(&compressible(MIB, c as u64 + 10));
    }
    let source: Arc<dyn ChunkSource> = Arc::new(MemVolume(data));
    let chunks: Vec<u64> = (0..(VOLUME / MIB) as u64).collect();
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(VOLUME as u64));
    let mut run = 0;
    g.bench_function("backup_256m_fs", |b| {
        b.iter(|| {
            run += 1;
            let config = StoreConfig::File { path: dir.path().join(format!("obs{run}")) };
            let engine = Engine::new(Arc::new(OpendalStore::open(&config).expect("store")), EngineOptions::default());
            let id = new_backup_id(std::time::SystemTime::now());
            let req = BackupRequest {
                tenant: "bench",
                volume: "vol",
                backup_id: &id,
                server_backup: None,
                source: source.clone(),
                read_chunks: chunks.clone(),
                parent: None,
                kind_full: true,
                snapshot: "s",
                az: "az1",
                key: None,
                name: None,
            };
            let m = rt.block_on(engine.backup(req, &NoProgress)).expect("backup");
            assert_eq!(m.stats.chunks_uploaded, chunks.len() as u64);
            std::fs::remove_dir_all(dir.path().join(format!("obs{run}"))).expect("clean up");
        })
    });
    g.finish();
}

criterion_group!(benches, codec, engine_backup);
criterion_main!(benches);
