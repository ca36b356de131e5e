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

/// A snapshot opened for the first time while a merge moves it: deleting `a` merges its big
/// layer with `b`'s small one by copying `b`'s blocks down, so `b` moves to `a`'s layer and
/// `b`'s layer goes. `open_snapshot` used to read `b`'s record and then its chain in two
/// catalog transactions; a merge committing in between made it fail with "layer N is missing"
/// (the snapshot model proptest caught it under load). Delay points order it: the merge
/// waits 200 ms before its commit, the open starts 50 ms into that wait and holds 300 ms after
/// its catalog read, so the commit lands inside the open. The open must still succeed and read
/// `b`'s bytes, before and after the merge re-chains it.
#[cfg(feature = "failpoints")]
#[test]
fn a_snapshot_opened_while_a_merge_moves_it_reads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    let blocks = 64u64;
    let id = store.create_volume("t", "v", blocks * BLOCK as u64).unwrap().id;
    let vol = store.open_volume(id).unwrap();
    vol.write_at(0, &vec![5u8; blocks as usize * BLOCK]).unwrap();
    let a = store.create_snapshot(id, "a").unwrap();
    vol.write_at(0, &[6u8; BLOCK]).unwrap();
    let b = store.create_snapshot(id, "b").unwrap();
    let b_layer = store.volume_info(id).unwrap().layers[1];
    evs_snapshot::__fail::cfg("merge-before-commit", "sleep(200)").unwrap();
    evs_snapshot::__fail::cfg("open-snapshot-after-catalog", "sleep(300)").unwrap();
    store.delete_snapshot(a.id).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let view = store.open_snapshot(b.id).expect("opening b while the merge moved it");
    assert_eq!(store.wait_merges().unwrap(), 1, "deleting a merged a layer away");
    evs_snapshot::__fail::remove("merge-before-commit");
    evs_snapshot::__fail::remove("open-snapshot-after-catalog");
    assert!(!store.volume_info(id).unwrap().layers.contains(&b_layer), "b's own layer was the one merged away");
    let mut got = vec![0u8; 2 * BLOCK];
    view.read_at(0, &mut got).unwrap();
    assert!(got[..BLOCK].iter().all(|&x| x == 6), "b's own block");
    assert!(got[BLOCK..].iter().all(|&x| x == 5), "the block b reads through to a's layer");
}
