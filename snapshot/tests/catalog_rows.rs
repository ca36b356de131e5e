//! A caller's own catalog rows for a new volume (`create_volume_with`, `clone_snapshot_with`)
//! commit in the transaction that creates it: after a reopen both are there, and when the
//! rows cannot be written the volume is not made at all (no name, no record, no layer files).

use evs_snapshot::{BlockStore, StoreError, StoreOptions};
use redb::{ReadableDatabase, TableDefinition};

const EXTRA: TableDefinition<u64, &str> = TableDefinition::new("caller_rows");

fn layer_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("layers")).unwrap().count()
}

fn row(store: &BlockStore, id: u64) -> Option<String> {
    let r = store.catalog().begin_read().unwrap();
    let t = r.open_table(EXTRA).ok()?;
    t.get(id).unwrap().map(|g| g.value().to_string())
}

#[test]
fn rows_commit_with_the_volume_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
        let put = |w: &redb::WriteTransaction, id: u64| -> Result<(), StoreError> {
            w.open_table(EXTRA)?.insert(id, "mine")?;
            Ok(())
        };
        let v = store.create_volume_with("t", "v", 1 << 20, &put).unwrap();
        store.create_snapshot(v.id, "s").unwrap();
        let snap = store.list_snapshots(v.id).unwrap()[0].id;
        let c = store.clone_snapshot_with("t", "c", snap, None, &put).unwrap();
        assert_eq!(row(&store, c.id).as_deref(), Some("mine"));
        v.id
    };
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.find_volume("t", "v").unwrap().id, id);
    assert_eq!(row(&store, id).as_deref(), Some("mine"));
    assert_eq!(row(&store, store.find_volume("t", "c").unwrap().id).as_deref(), Some("mine"));
}

#[test]
fn rows_that_fail_leave_no_volume_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    let v = store.create_volume("t", "v", 1 << 20).unwrap();
    store.create_snapshot(v.id, "s").unwrap();
    let snap = store.list_snapshots(v.id).unwrap()[0].id;
    let files = layer_files(dir.path());
    let fail = |w: &redb::WriteTransaction, id: u64| -> Result<(), StoreError> {
        w.open_table(EXTRA)?.insert(id, "half")?;
        Err(StoreError::Corrupt { what: "test rows".into(), why: "refused".into() })
    };
    let e = store.create_volume_with("t", "n", 1 << 20, &fail).unwrap_err();
    assert!(matches!(&e, StoreError::Corrupt { what, .. } if what == "test rows"), "{e}");
    let e = store.clone_snapshot_with("t", "c", snap, None, &fail).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    for name in ["n", "c"] {
        assert!(matches!(store.find_volume("t", name), Err(StoreError::VolumeNotFound(_))), "{name}");
    }
    assert_eq!(store.list_volumes(Some("t")).unwrap().len(), 1, "only v");
    assert_eq!(layer_files(dir.path()), files, "the new heads' files are gone again");
    let r = store.catalog().begin_read().unwrap();
    assert!(r.open_table(EXTRA).is_err(), "the failed rows did not commit");
    drop(r);
    // The names are free.
    let n = store.create_volume("t", "n", 1 << 20).unwrap();
    assert_eq!(store.find_volume("t", "n").unwrap().id, n.id);
    drop(store);
    let store = BlockStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.list_volumes(Some("t")).unwrap().len(), 2);
}
