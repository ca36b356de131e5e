//! What one NBD connection or one vhost-user queue keeps for its requests in flight besides
//! their [`Slots`](evs_snapshot::Slots): a pool of aligned buffers reused from one request to
//! the next (fresh memory would page-fault on every large read), and how long either looks
//! for more work before it sleeps.

use evs_snapshot::AlignedBuf;

/// How long an NBD connection or a vhost-user queue with nothing at the disk keeps looking
/// for its client's next requests before it blocks: a client at queue depth usually answers
/// a batch of replies with new requests within microseconds, and a wake-up from a blocking
/// wait (the client's socket write or kick, the scheduler switching this thread back in)
/// costs more than that. QEMU's iothreads poll the same way (`poll-max-ns`, 32 µs by
/// default). Bounded, and only while no request of the client's is in flight, so an idle
/// client costs one such spell after its last request.
pub(crate) const IDLE_POLL: std::time::Duration = std::time::Duration::from_micros(32);

/// Aligned buffers kept for reuse.
#[derive(Debug, Default)]
pub(crate) struct BufPool {
    bufs: Vec<AlignedBuf>,
}

impl BufPool {
    /// Buffers kept at the most.
    const MAX: usize = 64;
    /// The largest buffer kept: one huge request must not leave its memory held for the life
    /// of the connection.
    const MAX_CAPACITY: usize = 4 << 20;

    /// A buffer of `len` bytes: a kept one that is large enough but not more than about twice
    /// as large, or a new zeroed one. A reused buffer holds whatever it held before.
    pub(crate) fn take(&mut self, len: usize) -> AlignedBuf {
        if let Some(i) = self.bufs.iter().position(|b| b.capacity() >= len && b.capacity() <= len * 2 + 8192) {
            let mut b = self.bufs.swap_remove(i);
            b.set_len(len);
            return b;
        }
        AlignedBuf::zeroed(len)
    }

    /// Keeps `b` for a later [`take`](Self::take), unless the pool is full or `b` is too large.
    pub(crate) fn put(&mut self, b: AlignedBuf) {
        if self.bufs.len() < Self::MAX && b.capacity() <= Self::MAX_CAPACITY {
            self.bufs.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_reuses_a_buffer_of_a_fitting_size_only() {
        let mut p = BufPool::default();
        let mut b = p.take(4096);
        b.as_mut_slice()[0] = 7;
        p.put(b);
        // Too small for 64 KiB: a new one.
        let big = p.take(65536);
        assert_eq!(big.len(), 65536);
        assert_eq!(p.bufs.len(), 1);
        // Fits 1 KiB (4 KiB ≤ 2 × 1 KiB + 8 KiB): the same buffer, at the new length.
        let small = p.take(1024);
        assert_eq!((small.len(), small.as_slice()[0]), (1024, 7));
        assert!(p.bufs.is_empty());
        p.put(AlignedBuf::zeroed(BufPool::MAX_CAPACITY + 4096));
        assert!(p.bufs.is_empty(), "a buffer over the largest kept was kept");
        for _ in 0..BufPool::MAX + 3 {
            p.put(AlignedBuf::zeroed(4096));
        }
        assert_eq!(p.bufs.len(), BufPool::MAX);
    }
}
