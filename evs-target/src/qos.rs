//! QoS: performance tiers and the per-volume limiter of the data path.
//!
//! A tier gives, for IOPS and for bandwidth, a baseline, a per-GiB increment, a maximum and a
//! burst rate. For a volume of C GiB:
//!
//! * limit = min(max, baseline + per_gib × C) — the rate sustained forever;
//! * peak  = max(limit, burst) — the rate allowed while burst credits last;
//! * credits: a bucket of `burst_seconds × burst` I/O units (or bytes), full at the start,
//!   refilled at the limit and spent by every request. Empty, the volume runs at its limit.
//!   A tier whose burst is not above the limit has no credits beyond a small slack.
//!
//! **I/O unit.** A request of `len` bytes costs `max(1, ceil(len / 256 KiB))` I/O units, as AWS
//! EBS counts SSD I/O (a 1 MiB read is 4 I/Os), and `len` bytes of bandwidth. READ, WRITE and
//! CACHE cost by their length; TRIM and WRITE_ZEROES one unit and no bandwidth (no data moves);
//! FLUSH, BLOCK_STATUS and DISC nothing.
//!
//! **The limiter** ([`Limiter`]) is shared by every connection of a volume. It never refuses:
//! [`Limiter::reserve`] charges the request at once (the buckets may go into debt) and returns
//! the instant the debt is repaid, before which the request must not start. Deadlines come out
//! in reservation order, so connections are served first come, first served. Each connection
//! holds at most one reserved request (it stops reading while it waits), so the debt is
//! bounded by the number of connections. Four buckets (IOPS peak and credits, bandwidth peak and
//! credits) sit under one mutex: a few float operations per request.
//!
//! Limits change online ([`Limiter::set_limits`]): the buckets are brought up to date at the
//! old rates, then take the new ones, keeping their balance (clamped to the new depth).

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes of one I/O unit.
pub const IO_UNIT: u64 = 256 << 10;
/// Bytes per "MB" of the tier tables (MB/s, decimal as the service description gives them).
pub const MB: f64 = 1e6;
const GIB: f64 = (1u64 << 30) as f64;
/// Slack of every bucket, in seconds of its rate: absorbs timer jitter so that a volume
/// running exactly at its limit is not serialised (QEMU's throttling uses 100 ms).
pub const SLACK_SECONDS: f64 = 0.05;
/// The burst bucket depth of the service description: 1,800 s × the burst rate.
pub const DEFAULT_BURST_SECONDS: f64 = 1800.0;

/// One dimension of a tier (IOPS, or bandwidth in bytes per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    pub baseline: f64,
    pub per_gib: f64,
    pub max: f64,
    /// Rate allowed while credits last; not above the limit means no burst.
    pub burst: f64,
}

impl RateSpec {
    /// min(max, baseline + per_gib × size in GiB).
    pub fn limit(&self, size: u64) -> f64 {
        (self.baseline + self.per_gib * size as f64 / GIB).min(self.max)
    }
}

/// A performance tier.
#[derive(Debug, Clone, PartialEq)]
pub struct TierSpec {
    pub name: String,
    pub iops: RateSpec,
    /// Bytes per second.
    pub bandwidth: RateSpec,
    /// Depth of the credit buckets, in seconds of the burst rate.
    pub burst_seconds: f64,
}

/// The effective limits of one volume.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub iops: f64,
    pub iops_peak: f64,
    /// Credit depth in I/O units (0: no burst).
    pub iops_credits: f64,
    pub bps: f64,
    pub bps_peak: f64,
    /// Credit depth in bytes (0: no burst).
    pub bps_credits: f64,
}

impl TierSpec {
    /// The limits of a volume of `size` bytes.
    pub fn limits(&self, size: u64) -> Limits {
        let dim = |r: &RateSpec| {
            let limit = r.limit(size);
            let peak = limit.max(r.burst);
            let credits = if r.burst > limit { self.burst_seconds * r.burst } else { 0.0 };
            (limit, peak, credits)
        };
        let (iops, iops_peak, iops_credits) = dim(&self.iops);
        let (bps, bps_peak, bps_credits) = dim(&self.bandwidth);
        Limits { iops, iops_peak, iops_credits, bps, bps_peak, bps_credits }
    }
}

/// The tiers of the service description (SPEC.md's table). Bandwidth has no burst.
pub fn default_tiers() -> Vec<TierSpec> {
    let t = |name: &str, iops: (f64, f64, f64, f64), mbps: (f64, f64, f64)| TierSpec {
        name: name.to_string(),
        iops: RateSpec { baseline: iops.0, per_gib: iops.1, max: iops.2, burst: iops.3 },
        bandwidth: RateSpec { baseline: mbps.0 * MB, per_gib: mbps.1 * MB, max: mbps.2 * MB, burst: 0.0 },
        burst_seconds: DEFAULT_BURST_SECONDS,
    };
    vec![
        t("common", (100.0, 1.0, 1000.0, 1000.0), (40.0, 0.0, 40.0)),
        t("high", (100.0, 2.0, 3000.0, 3000.0), (100.0, 0.15, 150.0)),
        t("gpssd", (1800.0, 12.0, 20000.0, 8000.0), (100.0, 0.5, 250.0)),
        t("ultra-high", (100.0, 50.0, 20000.0, 10000.0), (120.0, 0.5, 350.0)),
        t("essd", (1800.0, 50.0, 128000.0, 64000.0), (120.0, 0.5, 1000.0)),
    ]
}

/// What a request costs: I/O units and bytes of bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub units: u64,
    pub bytes: u64,
}

impl Cost {
    pub const FREE: Cost = Cost { units: 0, bytes: 0 };

    /// A data transfer (READ, WRITE, CACHE) of `len` bytes.
    pub fn transfer(len: u64) -> Cost {
        Cost { units: len.div_ceil(IO_UNIT).max(1), bytes: len }
    }

    /// A metadata-only mutation (TRIM, WRITE_ZEROES): one unit, no bandwidth.
    pub fn metadata() -> Cost {
        Cost { units: 1, bytes: 0 }
    }

    pub fn is_free(self) -> bool {
        self.units == 0 && self.bytes == 0
    }
}

/// A token bucket that may go into debt: `tokens` is its balance at `last`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    depth: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: f64, depth: f64) -> Bucket {
        Bucket { rate, depth, tokens: depth }
    }

    fn refill(&mut self, dt: f64) {
        self.tokens = (self.tokens + self.rate * dt).min(self.depth);
    }

    /// Charges `n` and returns how long until the balance is back at zero.
    fn charge(&mut self, n: f64) -> f64 {
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }

    fn retune(&mut self, rate: f64, depth: f64) {
        self.rate = rate;
        self.depth = depth;
        self.tokens = self.tokens.min(depth);
    }
}

#[derive(Debug)]
struct State {
    limits: Limits,
    last: Instant,
    iops_peak: Bucket,
    iops_credit: Bucket,
    bps_peak: Bucket,
    bps_credit: Bucket,
}

fn slack(rate: f64) -> f64 {
    // At least one unit (or one 4 KiB block of bandwidth), so a slow tier still admits a
    // request without waiting when it is idle.
    (rate * SLACK_SECONDS).max(1.0)
}

impl State {
    fn new(limits: Limits, now: Instant) -> State {
        State {
            limits,
            last: now,
            iops_peak: Bucket::new(limits.iops_peak, slack(limits.iops_peak)),
            iops_credit: Bucket::new(limits.iops, limits.iops_credits + slack(limits.iops)),
            bps_peak: Bucket::new(limits.bps_peak, slack(limits.bps_peak).max(4096.0)),
            bps_credit: Bucket::new(limits.bps, limits.bps_credits + slack(limits.bps).max(4096.0)),
        }
    }

    fn advance(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if dt > 0.0 {
            self.last = now;
            for b in [&mut self.iops_peak, &mut self.iops_credit, &mut self.bps_peak, &mut self.bps_credit] {
                b.refill(dt);
            }
        }
    }
}

/// The current state of a volume's limiter, for `volume show`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QosStatus {
    /// None: unlimited.
    pub limits: Option<Limits>,
    /// Burst credits left, in I/O units.
    pub iops_burst_balance: f64,
    /// Burst credits left, in bytes.
    pub bps_burst_balance: f64,
}

/// The limiter of one volume, shared by all its connections.
#[derive(Debug)]
pub struct Limiter {
    /// No limits: `reserve` returns at once without taking the lock.
    unlimited: AtomicBool,
    state: Mutex<Option<State>>,
}

impl Limiter {
    /// A limiter with `limits` (None: unlimited), buckets full.
    pub fn new(limits: Option<Limits>, now: Instant) -> Limiter {
        Limiter { unlimited: AtomicBool::new(limits.is_none()), state: Mutex::new(limits.map(|l| State::new(l, now))) }
    }

    /// Changes the limits online. Balances are kept (clamped to the new depths); going from
    /// unlimited to limited starts with full buckets.
    pub fn set_limits(&self, limits: Option<Limits>, now: Instant) {
        let mut g = self.state.lock();
        match (g.as_mut(), limits) {
            (_, None) => *g = None,
            (None, Some(l)) => *g = Some(State::new(l, now)),
            (Some(s), Some(l)) => {
                s.advance(now);
                s.limits = l;
                s.iops_peak.retune(l.iops_peak, slack(l.iops_peak));
                s.iops_credit.retune(l.iops, l.iops_credits + slack(l.iops));
                s.bps_peak.retune(l.bps_peak, slack(l.bps_peak).max(4096.0));
                s.bps_credit.retune(l.bps, l.bps_credits + slack(l.bps).max(4096.0));
            }
        }
        self.unlimited.store(g.is_none(), Ordering::Release);
    }

    /// Charges `cost` and returns when the request may start: `None` at once, `Some(t)` not
    /// before `t`.
    pub fn reserve(&self, cost: Cost, now: Instant) -> Option<Instant> {
        if cost.is_free() || self.unlimited.load(Ordering::Acquire) {
            return None;
        }
        let mut g = self.state.lock();
        let s = g.as_mut()?;
        // Another connection may have advanced the buckets past this caller's clock reading.
        let now = now.max(s.last);
        s.advance(now);
        let units = cost.units as f64;
        let bytes = cost.bytes as f64;
        let mut wait = s.iops_peak.charge(units).max(s.iops_credit.charge(units));
        if bytes > 0.0 {
            wait = wait.max(s.bps_peak.charge(bytes)).max(s.bps_credit.charge(bytes));
        }
        (wait > 0.0).then(|| now + Duration::from_secs_f64(wait))
    }

    /// Limits and burst balances now.
    pub fn status(&self, now: Instant) -> QosStatus {
        let mut g = self.state.lock();
        match g.as_mut() {
            None => QosStatus { limits: None, iops_burst_balance: 0.0, bps_burst_balance: 0.0 },
            Some(s) => {
                s.advance(now);
                let l = s.limits;
                QosStatus {
                    limits: Some(l),
                    iops_burst_balance: s.iops_credit.tokens.clamp(0.0, l.iops_credits),
                    bps_burst_balance: s.bps_credit.tokens.clamp(0.0, l.bps_credits),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(name: &str) -> TierSpec {
        default_tiers().into_iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn tier_formulas_follow_the_service_description() {
        let g = 1u64 << 30;
        let l = tier("common").limits(100 * g);
        assert_eq!((l.iops, l.iops_peak, l.bps), (200.0, 1000.0, 40.0 * MB));
        assert_eq!(l.iops_credits, 1800.0 * 1000.0);
        assert_eq!(tier("common").limits(5000 * g).iops, 1000.0);
        let l = tier("gpssd").limits(100 * g);
        assert_eq!((l.iops, l.iops_peak, l.bps), (3000.0, 8000.0, 150.0 * MB));
        // Large enough that the limit passes the burst rate: no credits.
        let l = tier("gpssd").limits(1000 * g);
        assert_eq!((l.iops, l.iops_peak, l.iops_credits), (13800.0, 13800.0, 0.0));
        assert_eq!(tier("essd").limits(10_000 * g).iops, 128000.0);
        assert_eq!(tier("essd").limits(10_000 * g).bps, 1000.0 * MB);
        assert_eq!(tier("high").limits(200 * g).bps, 130.0 * MB);
        assert_eq!(tier("ultra-high").limits(100 * g).iops, 5100.0);
        assert_eq!(tier("ultra-high").limits(100 * g).bps_credits, 0.0, "no bandwidth burst by default");
    }

    #[test]
    fn costs() {
        assert_eq!(Cost::transfer(4096), Cost { units: 1, bytes: 4096 });
        assert_eq!(Cost::transfer(256 << 10), Cost { units: 1, bytes: 256 << 10 });
        assert_eq!(Cost::transfer((256 << 10) + 1).units, 2);
        assert_eq!(Cost::transfer(1 << 20).units, 4);
        assert_eq!(Cost::transfer(0).units, 1);
        assert!(Cost::FREE.is_free() && !Cost::metadata().is_free());
    }

    fn limits(iops: f64, peak: f64, credits: f64, bps: f64) -> Limits {
        Limits { iops, iops_peak: peak, iops_credits: credits, bps, bps_peak: bps, bps_credits: 0.0 }
    }

    /// Admits `n` requests of `cost` back to back as one client would (each starting at its
    /// deadline); returns the time the last one started.
    fn run(l: &Limiter, t0: Instant, n: usize, cost: Cost) -> Instant {
        let mut now = t0;
        for _ in 0..n {
            if let Some(t) = l.reserve(cost, now) {
                now = t;
            }
        }
        now
    }

    #[test]
    fn sustained_rate_without_burst() {
        let t0 = Instant::now();
        let l = Limiter::new(Some(limits(1000.0, 1000.0, 0.0, 1e12)), t0);
        // 10,000 I/Os at 1000 IOPS: ~10 s, minus the slack the idle bucket starts with.
        let end = run(&l, t0, 10_000, Cost::transfer(4096));
        let secs = (end - t0).as_secs_f64();
        assert!((9.9..=10.0).contains(&secs), "{secs}");
    }

    #[test]
    fn burst_then_baseline() {
        let t0 = Instant::now();
        // 1000 IOPS sustained, 5000 peak, 4000 credits: the burst lasts 4000 / (5000 - 1000)
        // = 1 s (5000 I/Os), then 1000 IOPS.
        let l = Limiter::new(Some(limits(1000.0, 5000.0, 4000.0, 1e12)), t0);
        let c = Cost::transfer(4096);
        let end = run(&l, t0, 5000, c);
        let secs = (end - t0).as_secs_f64();
        assert!((0.9..=1.01).contains(&secs), "burst phase took {secs}");
        let status = l.status(end);
        assert!(status.iops_burst_balance < 100.0, "{status:?}");
        let end2 = run(&l, end, 2000, c);
        let secs = (end2 - end).as_secs_f64();
        assert!((1.95..=2.01).contains(&secs), "baseline phase took {secs}");
        // Idle for 2 s: 2000 credits back.
        let later = end2 + Duration::from_secs(2);
        let b = l.status(later).iops_burst_balance;
        assert!((1900.0..=2000.0).contains(&b), "{b}");
    }

    #[test]
    fn bandwidth_limits_large_requests() {
        let t0 = Instant::now();
        let l = Limiter::new(Some(limits(1e6, 1e6, 0.0, 100.0 * MB)), t0);
        // 1000 MiB at 100 MB/s ≈ 10.49 s.
        let end = run(&l, t0, 1000, Cost::transfer(1 << 20));
        let secs = (end - t0).as_secs_f64();
        assert!((10.4..=10.5).contains(&secs), "{secs}");
        // Large I/Os count as several units against the IOPS limit.
        let l = Limiter::new(Some(limits(100.0, 100.0, 0.0, 1e12)), t0);
        let end = run(&l, t0, 100, Cost::transfer(1 << 20)); // 400 units
        let secs = (end - t0).as_secs_f64();
        assert!((3.9..=4.0).contains(&secs), "{secs}");
    }

    #[test]
    fn deadlines_are_first_come_first_served_across_callers() {
        let t0 = Instant::now();
        let l = Limiter::new(Some(limits(100.0, 100.0, 0.0, 1e12)), t0);
        let c = Cost::transfer(4096);
        let mut last = t0;
        // Two "connections" reserving alternately at the same instant: strictly increasing.
        for _ in 0..50 {
            let d = l.reserve(c, t0).unwrap_or(t0);
            assert!(d >= last);
            last = d;
        }
        assert!((last - t0).as_secs_f64() > 0.4);
    }

    #[test]
    fn online_change_keeps_the_balance_and_unlimited_bypasses() {
        let t0 = Instant::now();
        let l = Limiter::new(Some(limits(1000.0, 5000.0, 4000.0, 1e12)), t0);
        run(&l, t0, 2000, Cost::transfer(4096)); // spends ~2000 credits
        let before = l.status(t0).iops_burst_balance;
        l.set_limits(Some(limits(2000.0, 5000.0, 3000.0, 1e12)), t0);
        let after = l.status(t0).iops_burst_balance;
        assert!(after <= 3000.0 && (after - before.min(3000.0)).abs() < 1.0, "{before} -> {after}");
        // Now 2000 IOPS once the credits are gone.
        let t1 = run(&l, t0, 10_000, Cost::transfer(4096));
        let t2 = run(&l, t1, 4000, Cost::transfer(4096));
        let secs = (t2 - t1).as_secs_f64();
        assert!((1.95..=2.01).contains(&secs), "{secs}");

        l.set_limits(None, t2);
        assert_eq!(l.reserve(Cost::transfer(1 << 20), t2), None);
        assert_eq!(l.status(t2).limits, None);
        l.set_limits(Some(limits(10.0, 10.0, 0.0, 1e12)), t2);
        assert!(l.reserve(Cost::transfer(4096), t2).is_none(), "starts with full buckets");
        assert_eq!(l.reserve(Cost::FREE, t2), None, "free requests never wait");
    }
}
