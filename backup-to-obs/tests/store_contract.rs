//! The `ObjectStore` contract, the same on a directory and on Garage (a real S3 server).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{noise, TestStore};
use evs_backup::{FaultRule, FaultyStore, ObjectStore, StoreError, StoreOp};

async fn put_get_head_overwrite(t: TestStore) {
    let s = &t.store;
    s.put("a/b/c", b"hello".to_vec()).await.unwrap();
    assert_eq!(s.get("a/b/c").await.unwrap(), b"hello");
    let m = s.head("a/b/c").await.unwrap().expect("present");
    assert_eq!((m.key.as_str(), m.size), ("a/b/c", 5));
    assert!(m.modified.is_some());
    s.put("a/b/c", b"second version".to_vec()).await.unwrap();
    assert_eq!(s.get("a/b/c").await.unwrap(), b"second version");
    assert_eq!(s.head("a/b/c").await.unwrap().unwrap().size, 14);
    // "a/b" is a prefix, not an object.
    assert_eq!(s.head("a/b").await.unwrap(), None);
    let e = s.get("a/b").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

async fn absent_objects(t: TestStore) {
    let s = &t.store;
    let e = s.get("no/such/key").await.unwrap_err();
    assert!(matches!(&e, StoreError::NotFound { key, .. } if key == "no/such/key"), "{e}");
    assert!(e.to_string().contains("no/such/key"), "{e}");
    assert_eq!(s.head("no/such/key").await.unwrap(), None);
    s.delete("no/such/key").await.unwrap();
    assert!(s.list("no/").await.unwrap().is_empty());
}

async fn empty_and_large_objects(t: TestStore) {
    let s = &t.store;
    s.put("empty", Vec::new()).await.unwrap();
    assert_eq!(s.get("empty").await.unwrap(), Vec::<u8>::new());
    assert_eq!(s.head("empty").await.unwrap().unwrap().size, 0);
    let listed = s.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].key.as_str(), listed[0].size), ("empty", 0));
    let big = noise(17 << 20, 5);
    s.put("big/object", big.clone()).await.unwrap();
    assert_eq!(s.head("big/object").await.unwrap().unwrap().size, big.len() as u64);
    assert!(s.get("big/object").await.unwrap() == big, "large object read back differs");
}

async fn list_is_recursive_sorted_files_only(t: TestStore) {
    let s = &t.store;
    for (k, len) in [("x/2/4", 4), ("x/1", 1), ("y/6", 6), ("x/2/3", 3), ("xy/5", 5)] {
        s.put(k, vec![7u8; len]).await.unwrap();
    }
    let keys = |v: Vec<evs_backup::ObjectMeta>| v.into_iter().map(|m| (m.key, m.size)).collect::<Vec<_>>();
    let own = |v: &[(&str, u64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect::<Vec<_>>();
    assert_eq!(keys(s.list("x/").await.unwrap()), own(&[("x/1", 1), ("x/2/3", 3), ("x/2/4", 4)]));
    assert_eq!(keys(s.list("x/2/").await.unwrap()), own(&[("x/2/3", 3), ("x/2/4", 4)]));
    assert_eq!(keys(s.list("x").await.unwrap()), own(&[("x/1", 1), ("x/2/3", 3), ("x/2/4", 4), ("xy/5", 5)]));
    assert_eq!(keys(s.list("x/2/3").await.unwrap()), own(&[("x/2/3", 3)]));
    assert_eq!(s.list("").await.unwrap().len(), 5);
    assert!(s.list("z/").await.unwrap().is_empty());
    assert!(s.list("x/").await.unwrap().iter().all(|m| m.modified.is_some()));
    s.delete("x/2/3").await.unwrap();
    assert_eq!(keys(s.list("x/2/").await.unwrap()), own(&[("x/2/4", 4)]));
    assert!(s.get("x/2/3").await.unwrap_err().is_not_found());
}

/// While one task overwrites an object again and again, readers only ever see a whole
/// version of it (or nothing, before the first put), through get and through list.
async fn put_is_atomic_for_get_and_list(t: TestStore) {
    const LEN: usize = 8 << 20;
    let s = t.store.clone();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for v in 1..=6u8 {
                s.put("atomic/obj", vec![v; LEN]).await.unwrap();
            }
        })
    };
    let mut seen_whole = 0;
    while !writer.is_finished() {
        for m in s.list("atomic/").await.unwrap() {
            assert_eq!((m.key.as_str(), m.size), ("atomic/obj", LEN as u64), "a partial object was listed");
        }
        match s.get("atomic/obj").await {
            Ok(data) => {
                assert_eq!(data.len(), LEN, "a partial object was read");
                assert!(data.iter().all(|&b| b == data[0]), "two versions mixed in one read");
                seen_whole += 1;
            }
            Err(e) => assert!(e.is_not_found(), "{e}"),
        }
    }
    writer.await.unwrap();
    assert_eq!(s.get("atomic/obj").await.unwrap(), vec![6u8; LEN]);
    assert_eq!(t.keys("").await, vec!["atomic/obj".to_string()], "staging files visible in the store");
    let _ = seen_whole;
}

async fn invalid_keys_are_refused(t: TestStore) {
    let s = &t.store;
    for bad in ["", "/abs", "a/../b", "a//b", "trailing/", "./a"] {
        let e = s.put(bad, b"x".to_vec()).await.unwrap_err();
        assert!(matches!(e, StoreError::InvalidKey { .. }), "{bad:?}: {e}");
        assert!(matches!(s.get(bad).await.unwrap_err(), StoreError::InvalidKey { .. }));
        assert!(matches!(s.delete(bad).await.unwrap_err(), StoreError::InvalidKey { .. }));
    }
    assert!(matches!(s.list("/").await.unwrap_err(), StoreError::InvalidKey { .. }));
    assert!(s.list("").await.unwrap().is_empty(), "a refused put wrote something");
}

on_both_stores!(
    put_get_head_overwrite,
    absent_objects,
    empty_and_large_objects,
    list_is_recursive_sorted_files_only,
    put_is_atomic_for_get_and_list,
    invalid_keys_are_refused,
);

#[tokio::test]
async fn faulty_store_fails_what_its_rules_pick() {
    let t = TestStore::fs();
    let f = FaultyStore::new(t.store.clone());
    f.add_rule(FaultRule::fail(StoreOp::Put).on_prefix("chunks/").after(2).times(2));
    for i in 0..2 {
        f.put(&format!("chunks/{i}"), vec![1]).await.unwrap();
    }
    f.put("other/x", vec![1]).await.unwrap();
    for i in 2..4 {
        let e = f.put(&format!("chunks/{i}"), vec![1]).await.unwrap_err();
        assert!(e.to_string().contains("injected fault") && e.to_string().contains(&format!("chunks/{i}")), "{e}");
    }
    f.put("chunks/4", vec![1]).await.unwrap();
    assert_eq!(f.injected(), 2);
    // Failed puts were not executed.
    assert_eq!(t.keys("chunks/").await, vec!["chunks/0", "chunks/1", "chunks/4"]);
    // Other operations are not affected; a delay delays and then executes.
    f.add_rule(FaultRule::delay(StoreOp::Get, Duration::from_millis(1)));
    assert_eq!(f.get("chunks/0").await.unwrap(), vec![1]);
    assert_eq!(f.injected(), 3);
    f.add_rule(FaultRule::fail(StoreOp::List));
    assert!(f.list("").await.is_err());
    f.clear_rules();
    assert_eq!(f.list("").await.unwrap().len(), 4);
    assert!(f.describe().contains("file://"));
}

#[tokio::test]
async fn s3_with_a_wrong_secret_fails_clearly() {
    let t = TestStore::s3();
    let mut config = t.config.clone();
    if let evs_backup::StoreConfig::S3 { secret_key, .. } = &mut config {
        *secret_key = "0".repeat(64);
    }
    let tuning = evs_backup::StoreTuning { retries: 0, ..Default::default() };
    let s: Arc<dyn ObjectStore> = Arc::new(evs_backup::OpendalStore::open_tuned(&config, &tuning).unwrap());
    let e = s.put("k", vec![1]).await.unwrap_err();
    assert!(matches!(&e, StoreError::Failed { op: StoreOp::Put, key, .. } if key == "k"), "{e}");
    assert!(!e.to_string().contains(&"0".repeat(64)), "the secret is in the message: {e}");
    assert!(t.store.list("").await.unwrap().is_empty());
}
