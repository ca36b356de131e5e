//! Criterion benches of the block store's hot path: the work the NBD server asks of a volume
//! per request, without the network.
//!
//! ```text
//! cargo bench -p evs-benches                                # all
//! cargo bench -p evs-benches -- read_segments               # one group
//! EVS_BENCH_IO_BACKEND=portable cargo bench -p evs-benches  # force an engine
//! EVS_BENCH_DIR=/mnt/disk cargo bench -p evs-benches        # store on the disk under test
//! ```
//!
//! Layout of the 1 GiB volume, written once before measuring:
//!
//! ```text
//! [0, 1 MiB)              allocated (the "allocated" reads)
//! [1 MiB, 1 GiB - 4 MiB)  mixed: 1-4 blocks written at the start of every 64 KiB stripe
//! [1 GiB - 4 MiB, 1 GiB)  hole (the "hole" reads)
//! ```
//!
//! `write/4k_plan_submit_commit` writes at pseudo-random aligned offsets, so it runs last: it
//! adds allocated blocks as it goes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use evs_benches::{fill, fill_mixed, pattern, Fixture, Offsets};
use evs_snapshot::io_engine::run_one;
use evs_snapshot::{Segment, WritePlan};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const KIB4: u64 = 4096;
const HOLE_AT: u64 = GIB - 4 * MIB;
/// Ops in flight an engine is built for (the NBD server's queue depth order of magnitude).
const ENGINE_DEPTH: u32 = 64;

fn fixture() -> Fixture {
    let f = Fixture::new("bench-1g", GIB);
    fill(&f.volume, 0, MIB as usize);
    fill_mixed(&f.volume, MIB..HOLE_AT, 64 * 1024);
    f.volume.flush().expect("flush");
    eprintln!("block_store benches: engine {}, volume 1 GiB", f.engine.name());
    f
}

fn read_segments(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("read_segments");
    let cases = [
        ("4k_allocated", 0, KIB4),
        ("4k_hole", HOLE_AT, KIB4),
        ("1m_allocated", 0, MIB),
        ("1m_hole", HOLE_AT, MIB),
        ("1m_mixed", 256 * MIB, MIB),
    ];
    let mut segs: Vec<Segment> = Vec::with_capacity(256);
    for (name, offset, len) in cases {
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                segs.clear();
                f.volume.read_segments(black_box(offset), black_box(len), 0, &mut segs).expect("read_segments");
                black_box(segs.len())
            })
        });
    }
    g.finish();
}

fn write_4k(c: &mut Criterion, f: &Fixture) {
    let mut engine = f.engine.build(ENGINE_DEPTH).expect("build I/O engine");
    let data = pattern(KIB4 as usize, 0x3c);
    let mut offsets = Offsets::new(GIB, 0x5eed);
    let mut g = c.benchmark_group("write");
    g.throughput(Throughput::Bytes(KIB4));
    // One aligned 4 KiB write at queue depth 1: plan, submit on the engine, commit the blocks.
    g.bench_function("4k_plan_submit_commit", |b| {
        b.iter(|| {
            let offset = offsets.next().expect("endless");
            // An aligned write is always `Submit`; `Done` (done synchronously) is for unaligned ones.
            if let WritePlan::Submit { op, pending } =
                f.volume.plan_write(offset, black_box(&data)).expect("plan_write")
            {
                let (_op, res) = run_one(engine.as_mut(), op);
                res.expect("write op");
                f.volume.commit_write(pending);
            }
        })
    });
    g.finish();
}

fn read_at_4k(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("read_at");
    g.throughput(Throughput::Bytes(KIB4));
    let mut buf = vec![0u8; KIB4 as usize];
    for (name, offset) in [("4k_allocated", 64 * KIB4), ("4k_hole", HOLE_AT)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                f.volume.read_at(black_box(offset), &mut buf).expect("read_at");
                black_box(buf[0])
            })
        });
    }
    g.finish();
}

fn extents_1g(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("extents");
    g.sample_size(20);
    g.bench_function("1g_mixed", |b| b.iter(|| black_box(f.volume.extents(0, black_box(GIB)).expect("extents").len())));
    g.finish();
}

fn block_store(c: &mut Criterion) {
    let f = fixture();
    read_segments(c, &f);
    read_at_4k(c, &f);
    // extents before write/4k, so its allocation pattern is the one described above.
    extents_1g(c, &f);
    write_4k(c, &f);
}

criterion_group!(benches, block_store);
criterion_main!(benches);
