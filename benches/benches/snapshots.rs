//! Criterion benches of snapshots (issue goals in parentheses):
//!
//! * `snapshot_create/{1g,100g}`: taking a snapshot of a thin volume with data and 64 live
//!   snapshots (older ones deleted, untimed, as retention does; equal within noise whatever
//!   the size, under 5 ms);
//! * `chain_read/{chain_1,chain_16}`: a 4 KiB random read (plan + read) on a volume whose data
//!   lies under 0 or 15 snapshots' layers (loss under 10%);
//! * `overwrite/{in_head,first_after_snapshot}`: a 4 KiB aligned write through the engine into
//!   a block the head holds vs one only a snapshot's layer holds (loss under 20%);
//! * `diff/100g_1pct`: changed extents between two snapshots of a 100 GiB volume with 1% of it
//!   rewritten in 64 KiB pieces (under 100 ms).
//!
//! ```text
//! cargo bench -p evs-benches --bench snapshots
//! EVS_BENCH_DIR=/mnt/disk cargo bench -p evs-benches --bench snapshots
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use evs_benches::{fill, pattern, Fixture, Offsets};
use evs_snapshot::io_engine::run_one;
use evs_snapshot::WritePlan;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Snapshots kept alive while the create bench takes thousands.
const LIVE: u64 = 64;

fn snapshot_create(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_create");
    for (name, size) in [("1g", GIB), ("100g", 100 * GIB)] {
        let f = Fixture::new(&format!("snap-{name}"), size);
        // Some data spread over the volume, so the first snapshot has something to flush.
        for off in Offsets::new(size, 7).take(256) {
            fill(&f.volume, off, 4096);
        }
        let id = f.volume.id();
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A write between snapshots, as a live volume has.
                    fill(&f.volume, (n * 4096) % size, 4096);
                    let t = Instant::now();
                    f.store.create_snapshot(id, &format!("s{n}")).expect("create snapshot");
                    total += t.elapsed();
                    // Keep LIVE snapshots, as a volume under a retention policy does (untimed).
                    if n >= LIVE {
                        let old = f.store.find_snapshot(id, &format!("s{}", n - LIVE)).expect("find snapshot");
                        f.store.delete_snapshot(old.id).expect("delete snapshot");
                        // The merge (and its unlink's discards) finishes before the next timed
                        // create, so the figure is the create's own cost.
                        f.store.wait_merges().expect("merges");
                    }
                    n += 1;
                }
                total
            })
        });
    }
    g.finish();
}

fn chain_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("chain_read");
    for snapshots in [0u64, 15] {
        let f = Fixture::new("chain", GIB);
        // All data in the bottom layer, then `snapshots` layers with a few blocks each on top:
        // a read of the bottom's data resolves through every layer.
        fill(&f.volume, 0, (256 * MIB) as usize);
        for s in 0..snapshots {
            f.store.create_snapshot(f.volume.id(), &format!("s{s}")).expect("snapshot");
            for off in Offsets::new(256 * MIB, s + 1).take(64) {
                fill(&f.volume, off, 4096);
            }
        }
        let mut offs = Offsets::new(256 * MIB, 99);
        let mut buf = vec![0u8; 4096];
        g.bench_function(format!("chain_{}", snapshots + 1), |b| {
            b.iter(|| f.volume.read_at(black_box(offs.next().unwrap()), &mut buf).expect("read"))
        });
    }
    g.finish();
}

fn overwrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("overwrite");
    for after_snapshot in [false, true] {
        let f = Fixture::new("overwrite", GIB);
        fill(&f.volume, 0, GIB as usize / 4);
        if after_snapshot {
            f.store.create_snapshot(f.volume.id(), "base").expect("snapshot");
        }
        let mut engine = f.engine.build(64).expect("engine");
        let data = pattern(4096, 3);
        let mut offs = Offsets::new(GIB / 4, 5);
        let name = if after_snapshot { "first_after_snapshot" } else { "in_head" };
        g.bench_function(name, |b| {
            b.iter(|| match f.volume.plan_write(offs.next().unwrap(), &data).expect("plan") {
                WritePlan::Submit { op, pending } => {
                    run_one(engine.as_mut(), op).1.expect("write");
                    f.volume.commit_write(pending);
                }
                WritePlan::Done => {}
            })
        });
    }
    g.finish();
}

fn diff(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff");
    g.sample_size(20);
    let size = 100 * GIB;
    let f = Fixture::new("diff", size);
    let id = f.volume.id();
    let a = f.store.create_snapshot(id, "a").expect("snapshot a");
    // 1% of the volume in 64 KiB pieces at pseudo-random places.
    let piece = 64 * 1024u64;
    let data = pattern(piece as usize, 9);
    for off in Offsets::new(size / piece * 4096, 11).take((size / 100 / piece) as usize) {
        f.volume.write_at(off / 4096 * piece, &data).expect("write");
    }
    let b = f.store.create_snapshot(id, "b").expect("snapshot b");
    let (ext, _) = f.store.changed_extents(id, Some(a.id), Some(b.id)).expect("diff");
    let changed: u64 = ext.iter().map(|e| e.len).sum();
    eprintln!("diff/100g_1pct: {} extents, {} MiB changed", ext.len(), changed / MIB);
    g.bench_function("100g_1pct", |bch| {
        bch.iter(|| f.store.changed_extents(id, Some(a.id), Some(b.id)).expect("diff"))
    });
    g.finish();
}

criterion_group!(benches, snapshot_create, chain_read, overwrite, diff);
criterion_main!(benches);
