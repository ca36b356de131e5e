//! Model-based test of snapshots: random writes, trims, write-zeroes, extends, snapshots,
//! clones, rollbacks, snapshot deletes and restarts against in-memory copies of every volume
//! and snapshot. After every step each volume and each snapshot reads back as its model, and
//! every changed-block diff is sound (blocks outside it are equal in both snapshots).
//!
//! Cases: `EVS_PROPTEST_CASES` (default 32); the nightly-style run in the README uses more.

use std::sync::Arc;

use evs_snapshot::{BlockStore, EngineKind, StoreError, StoreOptions, Volume};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Act {
    Write { v: usize, off: u64, len: usize, seed: u8 },
    Trim { v: usize, off: u64, len: u64 },
    Zero { v: usize, off: u64, len: u64 },
    Extend { v: usize, by_blocks: u64 },
    Snapshot { v: usize },
    Clone { s: usize },
    Rollback { s: usize },
    DeleteSnapshot { s: usize },
    Restart,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => (any::<usize>(), 0u64..120_000, 1usize..20_000, any::<u8>())
            .prop_map(|(v, off, len, seed)| Act::Write { v, off, len, seed }),
        2 => (any::<usize>(), 0u64..120_000, 1u64..30_000).prop_map(|(v, off, len)| Act::Trim { v, off, len }),
        1 => (any::<usize>(), 0u64..120_000, 1u64..30_000).prop_map(|(v, off, len)| Act::Zero { v, off, len }),
        1 => (any::<usize>(), 1u64..4).prop_map(|(v, by_blocks)| Act::Extend { v, by_blocks }),
        4 => any::<usize>().prop_map(|v| Act::Snapshot { v }),
        1 => any::<usize>().prop_map(|s| Act::Clone { s }),
        1 => any::<usize>().prop_map(|s| Act::Rollback { s }),
        3 => any::<usize>().prop_map(|s| Act::DeleteSnapshot { s }),
        1 => Just(Act::Restart),
    ]
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i * 13 % 251) as u8)).collect()
}

struct Vol {
    id: u64,
    handle: Arc<Volume>,
    model: Vec<u8>,
    /// Snapshots (ids) the volume's current state descends from.
    lineage: Vec<u64>,
    /// Clones made of its snapshots (their layers stay shared, so never merged away).
    cloned: usize,
}

struct Snap {
    id: u64,
    vol: usize,
    model: Vec<u8>,
    /// Snapshots this one descends from.
    ancestors: Vec<u64>,
}

fn read_all(v: &Volume) -> Vec<u8> {
    let mut buf = vec![0xEEu8; v.size() as usize];
    v.read_at(0, &mut buf).unwrap();
    buf
}

fn check_diff(store: &BlockStore, vols: &[Vol], a: &Snap, b: &Snap) {
    let res = store.changed_extents(vols[a.vol].id, Some(a.id), Some(b.id));
    let (extents, size) = match res {
        Ok(r) => r,
        Err(StoreError::NotInLineage(_)) => {
            assert!(!b.ancestors.contains(&a.id), "diff refused within one line of descent");
            return;
        }
        Err(e) => panic!("diff failed: {e}"),
    };
    assert!(b.ancestors.contains(&a.id), "a diff from a snapshot that is no ancestor must be refused");
    assert_eq!(size, b.model.len() as u64);
    let mut covered = vec![false; b.model.len()];
    for e in &extents {
        let r = e.offset as usize..(e.offset + e.len) as usize;
        if e.zero {
            assert!(b.model[r.clone()].iter().all(|&x| x == 0), "a zero extent holds data");
        }
        covered[r].fill(true);
    }
    for (i, c) in covered.iter().enumerate() {
        if !c {
            let old = a.model.get(i).copied().unwrap_or(0);
            assert_eq!(old, b.model[i], "byte {i} changed outside the diff");
        }
    }
}

fn run(acts: Vec<Act>, engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { engine, direct_writes: true, direct_write_max: 8192, max_snapshots: 6 };
    let mut store = BlockStore::open(dir.path(), opts.clone()).unwrap();
    let size = 122_880u64; // 30 blocks
    let id = store.create_volume("t", "v0", size).unwrap().id;
    let mut vols = vec![Vol {
        id,
        handle: store.open_volume(id).unwrap(),
        model: vec![0; size as usize],
        lineage: vec![],
        cloned: 0,
    }];
    let mut snaps: Vec<Snap> = Vec::new();
    let mut n = 0u32;
    for a in acts {
        n += 1;
        match a {
            Act::Write { v, off, len, seed } => {
                let nv = vols.len();
                let v = &mut vols[v % nv];
                let off = off % v.model.len() as u64;
                let len = len.min(v.model.len() - off as usize);
                let data = pattern(seed, len);
                v.handle.write_at(off, &data).unwrap();
                v.model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Act::Trim { v, off, len } => {
                let nv = vols.len();
                let v = &mut vols[v % nv];
                let cur = v.model.len() as u64;
                let off = off % cur;
                let len = len.min(cur - off);
                v.handle.trim(off, len).unwrap();
                let first = off.div_ceil(4096) * 4096;
                let end = off + len;
                let last = if end == cur { cur } else { end / 4096 * 4096 };
                if first < last {
                    v.model[first as usize..last as usize].fill(0);
                }
            }
            Act::Zero { v, off, len } => {
                let nv = vols.len();
                let v = &mut vols[v % nv];
                let cur = v.model.len() as u64;
                let off = off % cur;
                let len = len.min(cur - off);
                v.handle.write_zeroes(off, len, false).unwrap();
                v.model[off as usize..(off + len) as usize].fill(0);
            }
            Act::Extend { v, by_blocks } => {
                let nv = vols.len();
                let v = &mut vols[v % nv];
                let new = v.model.len() as u64 + by_blocks * 4096;
                store.extend_volume(v.id, new).unwrap();
                v.model.resize(new as usize, 0);
            }
            Act::Snapshot { v } => {
                let vi = v % vols.len();
                let count = snaps.iter().filter(|s| s.vol == vi).count();
                match store.create_snapshot(vols[vi].id, &format!("s{n}")) {
                    Ok(info) => {
                        assert!(count < 6);
                        assert_eq!(info.size, vols[vi].model.len() as u64);
                        let ancestors = vols[vi].lineage.clone();
                        vols[vi].lineage.push(info.id);
                        snaps.push(Snap { id: info.id, vol: vi, model: vols[vi].model.clone(), ancestors });
                    }
                    Err(StoreError::SnapshotLimit { limit, .. }) => assert!(count == 6 && limit == 6),
                    Err(e) => panic!("snapshot failed: {e}"),
                }
                // A second snapshot of the same name is refused.
                if let Some(s) = snaps.last().filter(|s| s.vol == vi) {
                    let name = store.snapshot_info(s.id).unwrap().name;
                    let r = store.create_snapshot(vols[vi].id, &name);
                    assert!(matches!(r, Err(StoreError::SnapshotExists(_)) | Err(StoreError::SnapshotLimit { .. })));
                }
            }
            Act::Clone { s } => {
                if snaps.is_empty() || vols.len() >= 4 {
                    continue;
                }
                let s = &snaps[s % snaps.len()];
                vols[s.vol].cloned += 1;
                let info = store.clone_snapshot("t", &format!("c{n}"), s.id, None).unwrap();
                vols.push(Vol {
                    id: info.id,
                    handle: store.open_volume(info.id).unwrap(),
                    model: s.model.clone(),
                    lineage: vec![],
                    cloned: 0,
                });
            }
            Act::Rollback { s } => {
                if snaps.is_empty() {
                    continue;
                }
                let s = &snaps[s % snaps.len()];
                let v = &mut vols[s.vol];
                store.rollback(v.id, s.id).unwrap();
                // The size stays; past the snapshot's size the volume reads as zeros.
                let mut m = s.model.clone();
                m.resize(v.model.len(), 0);
                v.model = m;
                v.lineage = s.ancestors.clone();
                v.lineage.push(s.id);
            }
            Act::DeleteSnapshot { s } => {
                if snaps.is_empty() {
                    continue;
                }
                let s = snaps.remove(s % snaps.len());
                store.delete_snapshot(s.id).unwrap();
                assert!(matches!(store.snapshot_info(s.id), Err(StoreError::SnapshotNotFound(_))));
                if n.is_multiple_of(2) {
                    store.wait_merges().unwrap();
                }
            }
            Act::Restart => {
                for v in &vols {
                    v.handle.flush().unwrap();
                }
                store.wait_merges().unwrap();
                // Old handles keep files open, not the catalog: they are replaced below.
                store.close();
                store = BlockStore::open(dir.path(), opts.clone()).unwrap();
                store.wait_merges().unwrap();
                for v in vols.iter_mut() {
                    v.handle = store.open_volume(v.id).unwrap();
                }
            }
        }
        for (i, v) in vols.iter().enumerate() {
            assert_eq!(v.handle.size(), v.model.len() as u64, "size of volume {i}");
            assert!(read_all(&v.handle) == v.model, "volume {i} differs from its model after step {n}");
        }
        for s in &snaps {
            let view = store.open_snapshot(s.id).unwrap();
            assert!(view.is_read_only());
            assert!(read_all(&view) == s.model, "snapshot {} differs from its model after step {n}", s.id);
            assert!(matches!(view.write_at(0, &[1]), Err(StoreError::ReadOnly)));
            // Allocated extents of a snapshot cover all its non-zero bytes.
            let (ext, _) = store.changed_extents(vols[s.vol].id, None, Some(s.id)).unwrap();
            let mut covered = vec![false; s.model.len()];
            for e in ext {
                covered[e.offset as usize..(e.offset + e.len) as usize].fill(true);
            }
            assert!(s.model.iter().zip(&covered).all(|(b, c)| *c || *b == 0), "data outside the allocated extents");
        }
        for a in &snaps {
            for b in &snaps {
                if a.vol == b.vol && a.id != b.id {
                    check_diff(&store, &vols, a, b);
                }
            }
        }
    }
    // Chains stay as short as the live snapshots make them: plus a head, at most one hidden
    // layer under it, and layers shared with clones; a clone's chain also has its source's.
    store.wait_merges().unwrap();
    for (i, v) in vols.iter().enumerate() {
        let info = store.volume_info(v.id).unwrap();
        let live = snaps.iter().filter(|s| s.vol == i).count();
        let shared = v.cloned + if i == 0 { 0 } else { 8 };
        assert!(
            info.layers.len() <= live + 2 + shared,
            "volume {i}: {} layers for {live} snapshots",
            info.layers.len()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("EVS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32), ..ProptestConfig::default() })]

    #[test]
    fn snapshots_match_model_portable(acts in proptest::collection::vec(act(), 1..40)) {
        run(acts, EngineKind::Portable);
    }

    #[test]
    fn snapshots_match_model_uring(acts in proptest::collection::vec(act(), 1..40)) {
        run(acts, EngineKind::detect());
    }
}
