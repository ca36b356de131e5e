//! Model-based test of a volume: random writes (aligned and not), trims, write-zeroes,
//! extends, flushes and reopens against a plain byte vector; every read equals the model.

use std::sync::Arc;

use evs_snapshot::io_engine::run_one;
use evs_snapshot::{BlockStore, EngineKind, StoreError, StoreOptions, Volume, WritePlan};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Act {
    Write { off: u64, len: usize, seed: u8 },
    Trim { off: u64, len: u64 },
    Zero { off: u64, len: u64, no_hole: bool },
    Extend { by_blocks: u64 },
    Flush,
    Reopen,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => (0u64..200_000, 1usize..20_000, any::<u8>()).prop_map(|(off, len, seed)| Act::Write { off, len, seed }),
        3 => (0u64..200_000, 1u64..30_000).prop_map(|(off, len)| Act::Trim { off, len }),
        2 => (0u64..200_000, 1u64..30_000, any::<bool>()).prop_map(|(off, len, no_hole)| Act::Zero { off, len, no_hole }),
        1 => (1u64..8).prop_map(|by_blocks| Act::Extend { by_blocks }),
        1 => Just(Act::Flush),
        1 => Just(Act::Reopen),
    ]
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i * 7 % 256) as u8)).collect()
}

/// Writes through the async plan path, like the NBD server does.
fn plan_and_write(
    vol: &Volume,
    engine: &mut dyn evs_snapshot::IoEngine,
    off: u64,
    data: &[u8],
) -> Result<(), StoreError> {
    match vol.plan_write(off, data)? {
        WritePlan::Done => Ok(()),
        WritePlan::Submit { op, pending } => {
            let (_, r) = run_one(engine, op);
            r?;
            vol.commit_write(pending);
            Ok(())
        }
    }
}

fn check(vol: &Volume, model: &[u8]) {
    let mut buf = vec![0xAAu8; model.len()];
    vol.read_at(0, &mut buf).unwrap();
    assert!(buf == model, "volume content differs from the model");
}

fn run(acts: Vec<Act>, engine_kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { engine: engine_kind, direct_writes: true, direct_write_max: 8192, ..Default::default() };
    let mut store = BlockStore::open(dir.path(), opts.clone()).unwrap();
    let size = 200_704u64; // 49 blocks: not a power of two
    let id = store.create_volume("t", "v", size).unwrap().id;
    let mut vol: Arc<Volume> = store.open_volume(id).unwrap();
    let mut engine = engine_kind.build(16).unwrap();
    let mut model = vec![0u8; size as usize];
    for a in acts {
        let cur = model.len() as u64;
        match a {
            Act::Write { off, len, seed } => {
                let off = off % cur;
                let len = len.min((cur - off) as usize);
                let data = pattern(seed, len);
                match seed % 4 {
                    0 | 2 => plan_and_write(&vol, engine.as_mut(), off, &data).unwrap(),
                    1 => vol.write_at(off, &data).unwrap(),
                    // Bulk writes: O_DIRECT for whole blocks, write_at for the rest.
                    _ => vol.write_at_direct(off, &data).unwrap(),
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Act::Trim { off, len } => {
                let off = off % cur;
                let len = len.min(cur - off);
                vol.trim(off, len).unwrap();
                // Trimmed whole blocks read as zeros; partial edges keep their data.
                let first = off.div_ceil(4096) * 4096;
                let end = off + len;
                let last = if end == cur { cur } else { end / 4096 * 4096 };
                if first < last {
                    model[first as usize..last as usize].fill(0);
                }
            }
            Act::Zero { off, len, no_hole } => {
                let off = off % cur;
                let len = len.min(cur - off);
                vol.write_zeroes(off, len, no_hole).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Act::Extend { by_blocks } => {
                let new = cur + by_blocks * 4096;
                store.extend_volume(id, new).unwrap();
                assert_eq!(vol.size(), new);
                model.resize(new as usize, 0);
            }
            Act::Flush => vol.flush().unwrap(),
            Act::Reopen => {
                vol.flush().unwrap();
                drop(vol);
                store.close();
                store = BlockStore::open(dir.path(), opts.clone()).unwrap();
                vol = store.open_volume(id).unwrap();
                assert_eq!(vol.size(), model.len() as u64);
            }
        }
        check(&vol, &model);
    }
    // Out-of-range requests are refused and change nothing.
    let size = vol.size();
    assert!(matches!(vol.write_at(size - 10, &[1u8; 20]), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(vol.trim(size, 1), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(vol.read_at(u64::MAX - 3, &mut [0u8; 8]), Err(StoreError::OutOfRange { .. })));
    check(&vol, &model);
    // Allocation never exceeds what was written.
    let allocated = vol.allocated_bytes();
    assert!(allocated <= model.len().next_multiple_of(4096) as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("EVS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48), ..ProptestConfig::default() })]

    #[test]
    fn volume_matches_model_portable(acts in proptest::collection::vec(act(), 1..40)) {
        run(acts, EngineKind::Portable);
    }

    #[test]
    fn volume_matches_model_uring(acts in proptest::collection::vec(act(), 1..40)) {
        run(acts, EngineKind::detect());
    }
}

#[test]
fn thin_and_trim_gives_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    let info = store.create_volume("t", "big", 1 << 30).unwrap();
    assert_eq!(info.allocated, 0);
    let vol = store.open_volume(info.id).unwrap();
    vol.write_at(1 << 20, &vec![7u8; 1 << 20]).unwrap();
    vol.flush().unwrap();
    assert_eq!(vol.allocated_bytes(), 1 << 20);
    let data_file = dir.path().join("layers").join(format!("{:016x}.data", info.layers[0]));
    let used = |p: &std::path::Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    assert!(used(&data_file) >= 1 << 20 && used(&data_file) < 4 << 20, "sparse file uses {}", used(&data_file));
    vol.trim(1 << 20, 1 << 20).unwrap();
    assert_eq!(vol.allocated_bytes(), 0);
    assert!(used(&data_file) < 64 << 10, "trim gave space back: {}", used(&data_file));
    let ext = vol.extents(0, 4 << 20).unwrap();
    assert_eq!(ext.len(), 1);
    assert!(ext[0].hole);
}

#[test]
fn delete_destroys_and_names_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    let a = store.create_volume("t", "a", 1 << 20).unwrap();
    assert!(matches!(store.create_volume("t", "a", 1 << 20), Err(StoreError::VolumeExists(_))));
    assert!(store.create_volume("u", "a", 1 << 20).is_ok(), "names are per owner");
    assert!(matches!(store.create_volume("t", "b", 1000), Err(StoreError::InvalidSize { .. })));
    assert!(matches!(store.extend_volume(a.id, 4096), Err(StoreError::InvalidSize { .. })));
    let v = store.open_volume(a.id).unwrap();
    v.write_at(0, &[5u8; 4096]).unwrap();
    v.flush().unwrap();
    drop(v);
    store.delete_volume(a.id).unwrap();
    assert!(matches!(store.volume_info(a.id), Err(StoreError::VolumeNotFound(_))));
    let layer_files = std::fs::read_dir(dir.path().join("layers")).unwrap().count();
    assert_eq!(layer_files, 2, "only the other volume's data and map remain");
    let b = store.create_volume("t", "a", 1 << 20).unwrap();
    let v = store.open_volume(b.id).unwrap();
    let mut buf = [1u8; 4096];
    v.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "a new volume never reads old data");
    assert_eq!(store.list_volumes(Some("t")).unwrap().len(), 1);
    assert_eq!(store.list_volumes(None).unwrap().len(), 2);
}
