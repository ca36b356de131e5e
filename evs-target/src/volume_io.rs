//! What every connection of one volume shares on the data path: its QoS limiter and its I/O
//! counters. One [`VolumeIo`] per volume, kept in the [`VolumeIoRegistry`] while the volume
//! exists, so all its NBD connections (and its snapshot exports) meet the same buckets, and
//! `set-tier` or `extend` retune them without reconnecting anyone.
//!
//! Counters are relaxed atomics written by the connection threads and read by the metrics
//! endpoint: a scrape may see one request's counters half-updated, never a torn value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::qos::{Limiter, Limits};

/// Upper bounds (seconds) of the latency histogram buckets; the last bucket is +Inf.
pub const LATENCY_BOUNDS: [f64; 15] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A latency histogram (request received → reply queued), Prometheus-style.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); index LATENCY_BOUNDS.len() is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|&b| s <= b).unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (the last one is +Inf = count), sum in seconds, count.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (cumulative, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, self.count.load(Ordering::Relaxed))
    }
}

/// The I/O counters of one volume.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Writes replied to before their data op completed (write-back; a flush waits for them).
    pub write_early_replies: AtomicU64,
    /// FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS.
    pub other_ops: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Total time requests were held back by QoS.
    pub throttled_ns: AtomicU64,
    /// Requests held back by QoS.
    pub throttled_ops: AtomicU64,
    /// Requests received and not yet answered, over all connections.
    pub queue_depth: AtomicI64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
}

impl VolumeStats {
    pub fn add_throttled(&self, d: Duration) {
        self.throttled_ops.fetch_add(1, Ordering::Relaxed);
        self.throttled_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }
}

/// The data-path state shared by every connection of one volume.
#[derive(Debug)]
pub struct VolumeIo {
    pub volume_id: u64,
    pub owner: String,
    pub name: String,
    pub limiter: Limiter,
    pub stats: VolumeStats,
}

/// Every volume's [`VolumeIo`], by volume id.
#[derive(Debug, Default)]
pub struct VolumeIoRegistry {
    by_id: Mutex<HashMap<u64, Arc<VolumeIo>>>,
}

impl VolumeIoRegistry {
    pub fn new() -> Arc<VolumeIoRegistry> {
        Arc::new(VolumeIoRegistry::default())
    }

    /// The volume's state, created with `limits` if it has none yet (an existing one keeps
    /// its buckets and counters: call [`retune`](Self::retune) to change its limits).
    pub fn get_or_create(&self, volume_id: u64, owner: &str, name: &str, limits: Option<Limits>) -> Arc<VolumeIo> {
        self.by_id
            .lock()
            .entry(volume_id)
            .or_insert_with(|| {
                Arc::new(VolumeIo {
                    volume_id,
                    owner: owner.to_string(),
                    name: name.to_string(),
                    limiter: Limiter::new(limits, Instant::now()),
                    stats: VolumeStats::default(),
                })
            })
            .clone()
    }

    pub fn get(&self, volume_id: u64) -> Option<Arc<VolumeIo>> {
        self.by_id.lock().get(&volume_id).cloned()
    }

    /// New limits for a volume's live connections (a no-op when nothing serves it yet).
    pub fn retune(&self, volume_id: u64, limits: Option<Limits>) {
        if let Some(v) = self.get(volume_id) {
            v.limiter.set_limits(limits, Instant::now());
        }
    }

    /// Forgets a deleted volume.
    pub fn remove(&self, volume_id: u64) {
        self.by_id.lock().remove(&volume_id);
    }

    /// Every volume's state, by id (for the metrics endpoint).
    pub fn all(&self) -> Vec<Arc<VolumeIo>> {
        let mut v: Vec<_> = self.by_id.lock().values().cloned().collect();
        v.sort_by_key(|v| v.volume_id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(10));
        let (c, sum, n) = h.snapshot();
        assert_eq!(n, 3);
        assert_eq!(c.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(c[0], 1); // <= 50 µs
        assert_eq!(c[3], 1); // <= 500 µs
        assert_eq!(c[4], 2); // <= 1 ms
        assert_eq!(*c.last().unwrap(), 3);
        assert!((sum - 10.00073).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn one_state_per_volume() {
        let r = VolumeIoRegistry::new();
        let a = r.get_or_create(7, "t", "v", None);
        let b = r.get_or_create(7, "t", "v", None);
        assert!(Arc::ptr_eq(&a, &b));
        a.stats.read_ops.fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.all()[0].stats.read_ops.load(Ordering::Relaxed), 1);
        r.remove(7);
        assert!(r.get(7).is_none());
    }
}
