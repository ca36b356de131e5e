//! Criterion bench of the QoS limiter's own cost per request (issue goal: the limiter in place
//! costs under 2% of unthrottled IOPS). Compare with the daemon's CPU time per request of the
//! end-to-end run (`benches/scripts/qos-bench.sh`, BENCHMARKS.md).
//!
//! * `limiter/reserve_1_thread`: one connection charging 4 KiB reads, limits out of reach
//!   (never delays: the work every unthrottled request does);
//! * `limiter/reserve_2_threads`: two connections of one volume charging at once (the lock
//!   is shared by a volume's connections);
//! * `limiter/bypassed`: the `unlimited` tier's check.
//!
//! ```text
//! cargo bench -p evs-benches --bench qos
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use evs_target::qos::{Cost, Limiter, Limits};

fn unreachable() -> Limits {
    Limits { iops: 1e9, iops_peak: 1e9, iops_credits: 0.0, bps: 1e15, bps_peak: 1e15, bps_credits: 0.0 }
}

fn limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");
    let cost = Cost::transfer(4096);
    let l = Limiter::new(Some(unreachable()), Instant::now());
    g.bench_function("reserve_1_thread", |b| b.iter(|| assert!(l.reserve(black_box(cost), Instant::now()).is_none())));
    let shared = Arc::new(Limiter::new(Some(unreachable()), Instant::now()));
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (l, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(l.reserve(cost, Instant::now()));
            }
        })
    };
    g.bench_function("reserve_2_threads", |b| b.iter(|| black_box(shared.reserve(black_box(cost), Instant::now()))));
    stop.store(true, Ordering::Relaxed);
    other.join().expect("second thread");
    let none = Limiter::new(None, Instant::now());
    g.bench_function("bypassed", |b| b.iter(|| assert!(none.reserve(black_box(cost), Instant::now()).is_none())));
    g.finish();
}

criterion_group!(benches, limiter);
criterion_main!(benches);
