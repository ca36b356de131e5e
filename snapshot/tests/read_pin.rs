//! A read planned before a merge completes after it: `Volume::read_segments` hands back the
//! chain its segments read from, and holding it keeps the merged-away layer's file open, so
//! the read neither fails with EBADF nor reads another file that took its descriptor.

use evs_snapshot::io_engine::run_one;
use evs_snapshot::{AlignedBuf, BlockStore, EngineKind, Op, StoreOptions};

const BLOCK: usize = 4096;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_read_planned_before_a_merge_reads_the_merged_layer() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    let id = store.create_volume("t", "v", 64 * BLOCK as u64).unwrap().id;
    let vol = store.open_volume(id).unwrap();
    vol.write_at(0, &[7u8; BLOCK]).unwrap();
    let s1 = store.create_snapshot(id, "s1").unwrap();
    // s2 freezes a layer of 16 blocks over s1's one: deleting s1 then copies s1's block up
    // into it and drops s1's layer (merge.rs).
    vol.write_at(BLOCK as u64, &[1u8; 16 * BLOCK]).unwrap();
    store.create_snapshot(id, "s2").unwrap();
    let mut segs = Vec::new();
    let chain = vol.read_segments(0, BLOCK as u64, 0, &mut segs).unwrap();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let before = open_fds();
    store.delete_snapshot(s1.id).unwrap();
    assert_eq!(store.wait_merges().unwrap(), 1, "deleting s1 merged its layer away");
    assert_eq!(open_fds(), before, "the merged-away layer's files closed while a read still needs them");
    let mut engine = EngineKind::Portable.build(4).unwrap();
    let (op, r) = run_one(engine.as_mut(), Op::Read { buf: AlignedBuf::zeroed(BLOCK), segs });
    r.expect("a read planned before the merge failed");
    let Op::Read { buf, .. } = op else { unreachable!() };
    assert!(buf[..BLOCK] == [7u8; BLOCK], "the read did not return the block s1 held");
    // Once the read lets go of the chain, the layer's files close.
    drop(chain);
    assert!(open_fds() < before, "the merged-away layer stayed open after its last reader");
    let mut now = vec![0u8; BLOCK];
    vol.read_at(0, &mut now).unwrap();
    assert_eq!(now, vec![7u8; BLOCK], "the block moved with the merge");
}
