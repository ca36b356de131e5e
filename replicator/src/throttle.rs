//! A group's bandwidth limit: a token bucket in bytes, one second deep, that sleeps the
//! sender when empty.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug)]
pub struct Throttle {
    state: Mutex<(f64, Instant)>,
    /// Bytes per second; 0: unlimited.
    rate: u64,
}

impl Throttle {
    pub fn new(bytes_per_second: u64) -> Throttle {
        Throttle { state: Mutex::new((bytes_per_second as f64, Instant::now())), rate: bytes_per_second }
    }

    /// How long sending `n` bytes now must wait (the bytes are charged).
    pub fn charge(&self, n: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        let mut g = self.state.lock();
        let (tokens, last) = &mut *g;
        let now = now.max(*last);
        *tokens = (*tokens + rate * (now - *last).as_secs_f64()).min(rate);
        *last = now;
        *tokens -= n as f64;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / rate)
        }
    }

    /// Charges `n` bytes and sleeps as long as the limit says.
    pub fn take(&self, n: u64) {
        let d = self.charge(n, Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_the_rate() {
        let t0 = Instant::now();
        let t = Throttle::new(10 << 20);
        // 50 MiB at 10 MiB/s, with a 10 MiB bucket full at the start: 4 s of waiting.
        let mut now = t0;
        for _ in 0..50 {
            now += t.charge(1 << 20, now);
        }
        let secs = (now - t0).as_secs_f64();
        assert!((3.9..=4.05).contains(&secs), "{secs}");
        assert_eq!(Throttle::new(0).charge(1 << 40, t0), Duration::ZERO);
    }
}
