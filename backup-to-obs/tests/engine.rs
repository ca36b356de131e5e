//! The engine against a directory store and against Garage, with in-memory volumes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{noise, MemSink, MemSource, TestProgress, TestStore};
use evs_backup::engine::LEASE_TTL;
use evs_backup::{
    new_backup_id, new_server_backup_id, BackupError, BackupKind, BackupRequest, ChunkSource, Engine, EngineOptions,
    FaultRule, FaultyStore, Manifest, NoProgress, ObjectStore, ServerManifest, ServerVolume, StoreOp,
};

const CS: u32 = 64 << 10;
const CSU: usize = CS as usize;

fn engine(store: Arc<dyn ObjectStore>, grace: Duration) -> Engine {
    Engine::new(store, EngineOptions { chunk_size: CS, concurrency: 4, zstd_level: 3, gc_grace: grace })
}

fn id() -> String {
    new_backup_id(std::time::SystemTime::now())
}

/// A request for a backup of `source` reading `read` (no parent, no key).
fn request<'a>(
    tenant: &'a str,
    volume: &'a str,
    backup_id: &'a str,
    source: &Arc<MemSource>,
    read: Vec<u64>,
) -> BackupRequest<'a> {
    BackupRequest {
        tenant,
        volume,
        backup_id,
        server_backup: None,
        source: source.clone() as Arc<dyn ChunkSource>,
        read_chunks: read,
        parent: None,
        kind_full: true,
        snapshot: "snap",
        az: "az1",
        key: None,
        name: None,
    }
}

async fn restore_bytes(e: &Engine, m: &Manifest, key: Option<&[u8; 32]>) -> Result<Vec<u8>, BackupError> {
    let sink = MemSink::new(m.volume_size);
    e.restore(m, sink.clone(), key, &NoProgress).await?;
    assert!(sink.flushed.load(std::sync::atomic::Ordering::Relaxed));
    Ok(sink.contents())
}

/// 20 chunks + 4 KiB: data, holes (never written, not read), written zeros (read), and
/// chunks repeating another's content.
fn holey_volume() -> (Vec<u8>, Vec<u64>) {
    let mut data = vec![0u8; 20 * CSU + 4096];
    let mut read = Vec::new();
    for i in 0..21u64 {
        let at = i as usize * CSU;
        let len = (data.len() - at).min(CSU);
        match i % 5 {
            0 | 1 => data[at..at + len].copy_from_slice(&noise(len, i)),
            // a hole
            2 => {}
            // repeats
            3 => data[at..at + len].copy_from_slice(&noise(len, 1000)),
            // compressible, distinct
            _ => data[at..at + len]
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = ((j / 512) as u8).wrapping_add(i as u8)),
        }
        // Holes are not read; chunk 7 is a hole too but was written with zeros: read.
        if i % 5 != 2 || i == 7 {
            read.push(i);
        }
    }
    (data, read)
}

async fn full_backup_restores_holes_zeros_and_data(t: TestStore) {
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let (data, read) = holey_volume();
    let src = MemSource::new(data.clone(), CS);
    let bid = id();
    let progress = TestProgress::default();
    let mut req = request("t1", "vol", &bid, &src, read.clone());
    req.name = Some("first");
    let m = e.backup(req, &progress).await.unwrap();
    let s = &m.stats;
    // 21 chunks: 4 holes (2, 7, 12, 17; 7 read but zeros); 4 repeats (3, 8, 13, 18) stored once.
    assert_eq!((s.chunks, s.chunks_read, s.chunks_zero), (21, 18, 4));
    assert_eq!((s.chunks_uploaded, s.chunks_deduplicated), (14, 3));
    assert_eq!(s.bytes_read, 17 * CS as u64 + 4096);
    assert_eq!(s.bytes_logical, data.len() as u64 - 4 * CS as u64);
    assert!(s.bytes_uploaded < s.bytes_logical, "compressible chunks were not compressed");
    assert_eq!(src.reads.load(std::sync::atomic::Ordering::Relaxed), 18);
    assert_eq!(progress.done.load(std::sync::atomic::Ordering::Relaxed), s.bytes_read);
    assert_eq!(progress.total.load(std::sync::atomic::Ordering::Relaxed), s.bytes_read);
    assert_eq!(
        (m.kind, m.encrypted, m.name.as_deref(), m.volume_size),
        (BackupKind::Full, false, Some("first"), data.len() as u64)
    );
    assert_eq!(t.keys("chunks/").await.len(), 14, "one object per distinct chunk");
    assert_eq!(t.keys("leases/").await, Vec::<String>::new());
    assert_eq!(t.store.get("FORMAT").await.unwrap(), br#"{"format":"evs-backup","version":1}"#);

    let sink = MemSink::new(data.len() as u64);
    let rs = e.restore(&m, sink.clone(), None, &NoProgress).await.unwrap();
    assert!(sink.contents() == data, "restored volume differs");
    assert_eq!((rs.chunks, rs.chunks_zero, rs.chunks_downloaded), (21, 4, 17));
    assert_eq!(rs.bytes_zeroed, 4 * CS as u64);
    assert_eq!(rs.bytes_written, s.bytes_logical);

    assert_eq!(e.list("t1", None).await.unwrap(), vec![m.clone()]);
    assert_eq!(e.list("t1", Some("vol")).await.unwrap(), vec![m.clone()]);
    assert!(e.list("t1", Some("other")).await.unwrap().is_empty());
    assert_eq!(e.find("t1", &bid).await.unwrap(), m);
    let err = e.find("t2", &bid).await.unwrap_err();
    assert!(matches!(&err, BackupError::NotFound(w) if w.contains(&bid)), "{err}");
    assert!(e.list("t2", None).await.unwrap().is_empty());
    let report = e.verify(&m, None, &NoProgress).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.chunks_checked, 14);
}

async fn incremental_uploads_only_what_changed(t: TestStore) {
    let e = engine(t.store.clone(), Duration::ZERO);
    let n = 1000usize;
    let data = noise(n * CSU, 1);
    let src = MemSource::new(data.clone(), CS);
    let full_id = id();
    let full = e.backup(request("t1", "vol", &full_id, &src, (0..n as u64).collect()), &NoProgress).await.unwrap();
    assert_eq!(full.stats.chunks_uploaded, 1000);

    // 1% of the chunks change.
    let changed: Vec<u64> = (0..10).map(|k| k * 97 + 3).collect();
    let mut data2 = data.clone();
    for &c in &changed {
        let at = c as usize * CSU;
        data2[at..at + CSU].copy_from_slice(&noise(CSU, 5000 + c));
    }
    let src2 = MemSource::new(data2.clone(), CS);
    let inc_id = id();
    let mut req = request("t1", "vol", &inc_id, &src2, changed.clone());
    req.parent = Some(&full_id);
    req.kind_full = false;
    let inc = e.backup(req, &NoProgress).await.unwrap();
    let s = &inc.stats;
    assert_eq!((s.chunks, s.chunks_read, s.chunks_uploaded, s.chunks_deduplicated), (1000, 10, 10, 0));
    assert_eq!(s.bytes_read, 10 * CS as u64);
    assert!(s.bytes_uploaded >= 10 * CS as u64 && s.bytes_uploaded <= 10 * (CS as u64 + 64), "{s:?}");
    assert_eq!(src2.reads.load(std::sync::atomic::Ordering::Relaxed), 10);
    assert_eq!((inc.kind, inc.parent.as_deref()), (BackupKind::Incremental, Some(full_id.as_str())));
    assert_eq!(t.keys("chunks/").await.len(), 1010);

    assert!(restore_bytes(&e, &inc, None).await.unwrap() == data2);
    assert!(restore_bytes(&e, &full, None).await.unwrap() == data);
    let listed: Vec<String> = e.list("t1", Some("vol")).await.unwrap().into_iter().map(|m| m.backup_id).collect();
    assert_eq!(listed, vec![full_id.clone(), inc_id.clone()], "oldest first");

    // Deleting the full backup breaks nothing: the incremental's index is full. gc then
    // removes exactly the 10 chunk versions only the full backup used.
    e.delete(&full).await.unwrap();
    assert!(matches!(e.find("t1", &full_id).await, Err(BackupError::NotFound(_))));
    let gc = e.gc(&NoProgress).await.unwrap();
    assert_eq!((gc.manifests, gc.chunks_listed, gc.chunks_referenced, gc.chunks_removed), (1, 1010, 1000, 10));
    assert_eq!(gc.backups_in_progress, 0);
    assert_eq!(t.keys("chunks/").await.len(), 1000);
    assert!(restore_bytes(&e, &inc, None).await.unwrap() == data2);
    assert!(e.verify(&inc, None, &NoProgress).await.unwrap().is_ok());
}

async fn equal_volumes_share_chunks(t: TestStore) {
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let data = noise(12 * CSU, 7);
    let all: Vec<u64> = (0..12).collect();
    let a =
        e.backup(request("t1", "a", &id(), &MemSource::new(data.clone(), CS), all.clone()), &NoProgress).await.unwrap();
    let objects = t.keys("").await.len();
    let b = e.backup(request("t2", "b", &id(), &MemSource::new(data.clone(), CS), all), &NoProgress).await.unwrap();
    assert_eq!((a.stats.chunks_uploaded, a.stats.chunks_deduplicated), (12, 0));
    assert_eq!((b.stats.chunks_uploaded, b.stats.chunks_deduplicated, b.stats.bytes_uploaded), (0, 12, 0));
    assert_eq!(t.keys("chunks/").await.len(), 12);
    // The second backup added its index and manifest, nothing else.
    assert_eq!(t.keys("").await.len(), objects + 2);
    // Deleting one leaves the other whole, even after gc.
    e.delete(&a).await.unwrap();
    let gc = engine(t.store.clone(), Duration::ZERO).gc(&NoProgress).await.unwrap();
    assert_eq!(gc.chunks_removed, 0);
    assert!(restore_bytes(&e, &b, None).await.unwrap() == data);
}

async fn gc_keeps_referenced_chunks_and_respects_the_grace_period(t: TestStore) {
    let long = engine(t.store.clone(), Duration::from_secs(3600));
    let shared = noise(4 * CSU, 1);
    let mut a_data = shared.clone();
    a_data.extend(noise(3 * CSU, 2));
    let mut b_data = shared;
    b_data.extend(noise(2 * CSU, 3));
    let a = long
        .backup(request("t1", "a", &id(), &MemSource::new(a_data, CS), (0..7).collect()), &NoProgress)
        .await
        .unwrap();
    let b = long
        .backup(request("t1", "b", &id(), &MemSource::new(b_data.clone(), CS), (0..6).collect()), &NoProgress)
        .await
        .unwrap();
    assert_eq!(t.keys("chunks/").await.len(), 9);
    long.delete(&a).await.unwrap();
    assert_eq!(t.keys("indexes/").await, vec![b.index_key.clone()]);

    // Within the grace period: the 3 chunks only `a` used stay.
    let gc = long.gc(&NoProgress).await.unwrap();
    assert_eq!((gc.chunks_referenced, gc.chunks_within_grace, gc.chunks_removed), (6, 3, 0));
    assert_eq!(t.keys("chunks/").await.len(), 9);

    // Past it (a zero grace): they go; everything `b` references stays.
    let short = engine(t.store.clone(), Duration::ZERO);
    let gc = short.gc(&NoProgress).await.unwrap();
    assert_eq!((gc.chunks_referenced, gc.chunks_within_grace, gc.chunks_removed), (6, 0, 3));
    assert!(gc.bytes_removed >= 3 * CS as u64);
    assert_eq!(t.keys("chunks/").await.len(), 6);
    assert!(restore_bytes(&short, &b, None).await.unwrap() == b_data);
    assert!(short.verify(&b, None, &NoProgress).await.unwrap().is_ok());
    assert_eq!(t.keys("leases/").await, Vec::<String>::new());
    // Nothing left to collect.
    assert_eq!(short.gc(&NoProgress).await.unwrap().chunks_removed, 0);
}

async fn gc_sweeps_nothing_while_a_backup_runs(t: TestStore) {
    let e = engine(t.store.clone(), Duration::ZERO);
    let a = e
        .backup(request("t1", "a", &id(), &MemSource::new(noise(3 * CSU, 1), CS), vec![0, 1, 2]), &NoProgress)
        .await
        .unwrap();
    e.delete(&a).await.unwrap();
    // A live lease of another backup (as another daemon's would be).
    let lease = format!("leases/backups/{}", id());
    t.store.put(&lease, b"{}".to_vec()).await.unwrap();
    let gc = e.gc(&NoProgress).await.unwrap();
    assert_eq!((gc.backups_in_progress, gc.chunks_removed), (1, 0));
    assert_eq!(t.keys("chunks/").await.len(), 3);
    t.store.delete(&lease).await.unwrap();
    let gc = e.gc(&NoProgress).await.unwrap();
    assert_eq!((gc.backups_in_progress, gc.chunks_removed), (0, 3));
    assert!(LEASE_TTL > Duration::from_secs(60));
}

async fn interrupted_backup_leaves_no_manifest_and_a_retry_succeeds(t: TestStore) {
    let faulty = Arc::new(FaultyStore::new(t.store.clone()));
    let e = engine(faulty.clone(), Duration::ZERO);
    let data = noise(16 * CSU, 9);
    let src = MemSource::new(data.clone(), CS);
    let bid = id();
    faulty.add_rule(FaultRule::fail(StoreOp::Put).on_prefix("chunks/").after(5));
    let err = e.backup(request("t1", "vol", &bid, &src, (0..16).collect()), &NoProgress).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BackupError::Store(_)) && msg.contains("injected fault") && msg.contains("chunks/"), "{msg}");
    assert!(e.list("t1", None).await.unwrap().is_empty());
    assert!(matches!(e.find("t1", &bid).await, Err(BackupError::NotFound(_))));
    assert!(t.keys("manifests/").await.is_empty() && t.keys("indexes/").await.is_empty());
    assert!(t.keys("leases/").await.is_empty(), "the failed backup left its lease");
    let partial = t.keys("chunks/").await.len();
    // The 5 puts let through (one still in flight when the backup failed may be dropped).
    assert!((1..=5).contains(&partial), "{partial} chunks");

    // The commit point itself fails: the index is there, the backup is not.
    faulty.clear_rules();
    faulty.add_rule(FaultRule::fail(StoreOp::Put).on_prefix("manifests/"));
    let err = e.backup(request("t1", "vol", &bid, &src, (0..16).collect()), &NoProgress).await.unwrap_err();
    assert!(err.to_string().contains("manifests/t1/vol/"), "{err}");
    assert!(e.list("t1", None).await.unwrap().is_empty());
    assert_eq!(t.keys("indexes/").await.len(), 1);

    // The retry (same id) succeeds, and uploads only what the first attempts had not.
    faulty.clear_rules();
    let m = e.backup(request("t1", "vol", &bid, &src, (0..16).collect()), &NoProgress).await.unwrap();
    assert_eq!(m.stats.chunks_uploaded + m.stats.chunks_deduplicated, 16);
    assert_eq!(m.stats.chunks_uploaded, 0, "the second attempt had stored every chunk");
    assert!(restore_bytes(&e, &m, None).await.unwrap() == data);

    // An orphan index (a backup that never committed) is collected by gc.
    faulty.add_rule(FaultRule::fail(StoreOp::Put).on_prefix("manifests/"));
    let other = id();
    e.backup(request("t1", "vol", &other, &src, (0..16).collect()), &NoProgress).await.unwrap_err();
    faulty.clear_rules();
    assert_eq!(t.keys("indexes/").await.len(), 2);
    let gc = e.gc(&NoProgress).await.unwrap();
    assert_eq!((gc.indexes_removed, gc.chunks_removed), (1, 0));
    assert_eq!(t.keys("indexes/").await, vec![m.index_key.clone()]);
}

async fn cancelled_backup_commits_nothing(t: TestStore) {
    let e = engine(t.store.clone(), Duration::ZERO);
    let src = MemSource::new(noise(40 * CSU, 2), CS);
    let progress = TestProgress::cancelling_after(5);
    let err = e.backup(request("t1", "vol", &id(), &src, (0..40).collect()), &progress).await.unwrap_err();
    assert!(matches!(err, BackupError::Cancelled), "{err}");
    assert!(src.reads.load(std::sync::atomic::Ordering::Relaxed) < 40);
    assert!(e.list("t1", None).await.unwrap().is_empty());
    assert!(t.keys("indexes/").await.is_empty() && t.keys("leases/").await.is_empty());
}

async fn verify_names_deleted_and_corrupted_chunks(t: TestStore) {
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let data = noise(6 * CSU, 4);
    let m =
        e.backup(request("t1", "vol", &id(), &MemSource::new(data, CS), (0..6).collect()), &NoProgress).await.unwrap();
    let chunks = t.keys("chunks/").await;
    assert_eq!(chunks.len(), 6);
    let (gone, bad) = (&chunks[1], &chunks[4]);
    t.store.delete(gone).await.unwrap();
    let mut obj = t.store.get(bad).await.unwrap();
    let last = obj.len() - 1;
    obj[last] ^= 0x40;
    t.store.put(bad, obj).await.unwrap();

    let progress = TestProgress::default();
    let r = e.verify(&m, None, &progress).await.unwrap();
    assert!(!r.is_ok());
    assert_eq!(r.chunks_checked, 6);
    assert_eq!(r.missing, vec![gone.clone()]);
    assert_eq!(r.corrupt.len(), 1);
    assert_eq!(r.corrupt[0].key, *bad);
    assert!(r.corrupt[0].why.contains("crc32c"), "{}", r.corrupt[0].why);
    let problems = r.problems().unwrap();
    assert!(problems.contains(gone.as_str()) && problems.contains(bad.as_str()), "{problems}");
    assert_eq!(progress.done.load(std::sync::atomic::Ordering::Relaxed), 6 * CS as u64);

    // A restore fails naming one of them.
    let err = restore_bytes(&e, &m, None).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, BackupError::Missing { key } if key == gone)
            || matches!(&err, BackupError::Corrupt { key, .. } if key == bad),
        "{msg}"
    );
    // A missing index is an error naming it.
    t.store.delete(&m.index_key).await.unwrap();
    let err = e.verify(&m, None, &NoProgress).await.unwrap_err();
    assert!(matches!(&err, BackupError::Missing { key } if *key == m.index_key), "{err}");
}

async fn encryption_round_trip_and_key_errors(t: TestStore) {
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let mut data = vec![0x5Au8; 3 * CSU];
    data.extend(noise(2 * CSU, 8));
    let src = MemSource::new(data.clone(), CS);
    let bid = id();
    let mut req = request("t1", "vol", &bid, &src, (0..5).collect());
    req.key = Some(&k1);
    let m = e.backup(req, &NoProgress).await.unwrap();
    assert!(m.encrypted);
    assert_eq!(m.key_fingerprint.as_deref(), Some(evs_backup::key_fingerprint(&k1).as_str()));
    assert_eq!(m.stats.chunks_uploaded, 3, "the three equal chunks are one");
    // No chunk object holds the plain text.
    for k in t.keys("chunks/").await {
        let obj = t.store.get(&k).await.unwrap();
        assert_eq!(obj[11] & 1, 1, "{k} is not encrypted");
        assert!(!obj.windows(64).any(|w| w == &data[..64]), "{k} holds plain text");
    }
    assert!(restore_bytes(&e, &m, Some(&k1)).await.unwrap() == data);
    assert!(e.verify(&m, Some(&k1), &NoProgress).await.unwrap().is_ok());

    for (key, what) in [(None, "no key"), (Some(&k2), "another key")] {
        let sink = MemSink::new(m.volume_size);
        let err = e.restore(&m, sink.clone(), key, &NoProgress).await.unwrap_err();
        match (key, &err) {
            (None, BackupError::Encrypted { backup_id }) | (Some(_), BackupError::WrongKey { backup_id, .. }) => {
                assert_eq!(backup_id, &bid)
            }
            _ => panic!("{what}: {err}"),
        }
        assert!(err.to_string().contains(&bid), "{err}");
        assert!(sink.untouched(), "{what}: the restore wrote before failing");
        assert!(e.verify(&m, key, &NoProgress).await.is_err());
    }

    // The same data without a key and under another key: other ids, no sharing.
    let plain = e.backup(request("t1", "vol", &id(), &src, (0..5).collect()), &NoProgress).await.unwrap();
    let other_id = id();
    let mut req = request("t2", "vol", &other_id, &src, (0..5).collect());
    req.key = Some(&k2);
    let other = e.backup(req, &NoProgress).await.unwrap();
    assert_eq!((plain.stats.chunks_uploaded, other.stats.chunks_uploaded), (3, 3));
    assert_eq!(t.keys("chunks/").await.len(), 9);
    assert!(restore_bytes(&e, &plain, None).await.unwrap() == data);
    assert!(restore_bytes(&e, &other, Some(&k2)).await.unwrap() == data);
    // An incremental under another key than its parent's is refused (take a full one).
    let inc_id = id();
    let mut req = request("t1", "vol", &inc_id, &src, vec![0]);
    req.parent = Some(&bid);
    req.key = Some(&k2);
    let err = e.backup(req, &NoProgress).await.unwrap_err();
    assert!(matches!(&err, BackupError::Parent { parent, .. } if *parent == bid), "{err}");
}

async fn grown_volume_rereads_the_old_short_chunk(t: TestStore) {
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let old = noise(3 * CSU + 4096, 3);
    let p_id = id();
    let p = e
        .backup(request("t1", "vol", &p_id, &MemSource::new(old.clone(), CS), (0..4).collect()), &NoProgress)
        .await
        .unwrap();
    // Grown to 5 chunks; data written in chunk 3's new part and in chunk 4.
    let mut new = old.clone();
    new.resize(5 * CSU, 0);
    new[3 * CSU + 5000..3 * CSU + 6000].fill(0x77);
    new[4 * CSU..].copy_from_slice(&noise(CSU, 11));
    let src = MemSource::new(new.clone(), CS);
    let inc_id = id();
    let mut req = request("t1", "vol", &inc_id, &src, vec![4]);
    req.parent = Some(&p_id);
    req.kind_full = false;
    let m = e.backup(req, &NoProgress).await.unwrap();
    assert_eq!((m.stats.chunks, m.stats.chunks_read), (5, 2));
    assert!(restore_bytes(&e, &m, None).await.unwrap() == new);
    assert!(restore_bytes(&e, &p, None).await.unwrap() == old);
}

async fn bad_requests_are_refused_and_change_nothing(t: TestStore) {
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let src = MemSource::new(noise(2 * CSU, 1), CS);
    let good = id();
    let cases: Vec<(BackupRequest<'_>, &str)> = vec![
        (request("t/1", "vol", &good, &src, vec![0]), "tenant name \"t/1\""),
        (request("t1", "..", &good, &src, vec![0]), "volume name \"..\""),
        (request("t1", "vol", "bk-nope", &src, vec![0]), "invalid backup id \"bk-nope\""),
        (request("t1", "vol", &good, &src, vec![0, 2]), "chunk 2 to read is past the end"),
    ];
    for (req, want) in cases {
        let err = e.backup(req, &NoProgress).await.unwrap_err();
        assert!(matches!(err, BackupError::Invalid(_)) && err.to_string().contains(want), "{want}: {err}");
    }
    let mut req = request("t1", "vol", &good, &src, vec![0]);
    req.parent = Some("bk-bad");
    assert!(matches!(e.backup(req, &NoProgress).await, Err(BackupError::Invalid(_))));
    assert!(t.keys("").await.is_empty(), "a refused backup wrote {:?}", t.keys("").await);
    assert!(matches!(e.find("t1", "nope").await, Err(BackupError::Invalid(_))));
    assert!(matches!(e.list("../x", None).await, Err(BackupError::Invalid(_))));

    // A missing parent, a parent of another chunk size: the daemon takes a full backup then.
    let missing = id();
    let mut req = request("t1", "vol", &good, &src, vec![0]);
    req.parent = Some(&missing);
    let err = e.backup(req, &NoProgress).await.unwrap_err();
    assert!(matches!(&err, BackupError::Parent { why, .. } if why.contains("does not exist")), "{err}");
    let p = e.backup(request("t1", "vol", &good, &src, vec![0, 1]), &NoProgress).await.unwrap();
    let big = Engine::new(t.store.clone(), EngineOptions { chunk_size: 2 * CS, ..EngineOptions::default() });
    let mut req = request("t1", "vol", &missing, &src, vec![0]);
    req.parent = Some(&p.backup_id);
    let err = big.backup(req, &NoProgress).await.unwrap_err();
    assert!(matches!(&err, BackupError::Parent { why, .. } if why.contains("chunk size")), "{err}");
    // The same id twice.
    let err = e.backup(request("t1", "vol", &good, &src, vec![0]), &NoProgress).await.unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
}

async fn another_format_version_is_refused(t: TestStore) {
    t.store.put("FORMAT", br#"{"format":"evs-backup","version":2}"#.to_vec()).await.unwrap();
    let e = engine(t.store.clone(), Duration::from_secs(3600));
    let src = MemSource::new(noise(CSU, 1), CS);
    let err = e.backup(request("t1", "vol", &id(), &src, vec![0]), &NoProgress).await.unwrap_err();
    assert!(matches!(err, BackupError::Format { .. }) && err.to_string().contains("version 2"), "{err}");
    assert!(e.list("t1", None).await.unwrap_err().to_string().contains("version 2"));
    assert_eq!(t.keys("").await, vec!["FORMAT".to_string()]);
}

async fn server_backups_bind_volume_backups(t: TestStore) {
    let e = engine(t.store.clone(), Duration::ZERO);
    let sbk = new_server_backup_id(std::time::SystemTime::now());
    let (d1, d2) = (noise(2 * CSU, 1), noise(3 * CSU, 2));
    let mut volumes = Vec::new();
    for (vol, d) in [("disk1", &d1), ("disk2", &d2)] {
        let bid = id();
        let src = MemSource::new(d.clone(), CS);
        let mut req = request("t1", vol, &bid, &src, (0..d.len().div_ceil(CSU) as u64).collect());
        req.server_backup = Some(&sbk);
        e.backup(req, &NoProgress).await.unwrap();
        volumes.push(ServerVolume { volume: vol.into(), backup_id: bid });
    }
    // Not before its volume backups exist.
    let mut early = volumes.clone();
    early.push(ServerVolume { volume: "disk3".into(), backup_id: id() });
    let err =
        e.put_server_manifest(&ServerManifest::new("t1", "srv", &sbk, None, "az1", "g", early)).await.unwrap_err();
    assert!(err.to_string().contains("disk3"), "{err}");
    let sm = ServerManifest::new("t1", "srv", &sbk, Some("nightly"), "az1", "g", volumes.clone());
    e.put_server_manifest(&sm).await.unwrap();
    assert_eq!(e.list_server_backups("t1", None).await.unwrap(), vec![sm.clone()]);
    assert_eq!(e.list_server_backups("t1", Some("srv")).await.unwrap(), vec![sm.clone()]);
    assert_eq!(e.find_server_backup("t1", &sbk).await.unwrap(), sm);
    assert!(matches!(e.find_server_backup("t2", &sbk).await, Err(BackupError::NotFound(_))));
    for (v, d) in volumes.iter().zip([&d1, &d2]) {
        let m = e.find("t1", &v.backup_id).await.unwrap();
        assert_eq!(m.server_backup.as_deref(), Some(sbk.as_str()));
        assert!(restore_bytes(&e, &m, None).await.unwrap() == *d);
    }
    // Deleting it deletes its volume backups; gc then frees their chunks.
    e.delete_server_backup(&sm).await.unwrap();
    assert!(e.list_server_backups("t1", None).await.unwrap().is_empty());
    assert!(e.list("t1", None).await.unwrap().is_empty());
    assert_eq!(e.gc(&NoProgress).await.unwrap().chunks_removed, 5);
}

on_both_stores!(
    full_backup_restores_holes_zeros_and_data,
    incremental_uploads_only_what_changed,
    equal_volumes_share_chunks,
    gc_keeps_referenced_chunks_and_respects_the_grace_period,
    gc_sweeps_nothing_while_a_backup_runs,
    interrupted_backup_leaves_no_manifest_and_a_retry_succeeds,
    cancelled_backup_commits_nothing,
    verify_names_deleted_and_corrupted_chunks,
    encryption_round_trip_and_key_errors,
    grown_volume_rereads_the_old_short_chunk,
    bad_requests_are_refused_and_change_nothing,
    another_format_version_is_refused,
    server_backups_bind_volume_backups,
);
