//! Reads that land straight in the guest's buffers.
//!
//! A read request's file segments (in buffer order, covering the request) are cut where the
//! guest's data ranges (its device-writable descriptors) begin and end; each piece of a layer
//! file becomes a [`HostSpan`] into the guest's memory as mapped in this process, and each
//! piece of a hole is zeroed there at once. The op then carries the memory map's `Arc`, so a
//! frontend that replaces its memory table meanwhile cannot unmap what the kernel writes into.
//! This is the one place that turns guest addresses into host pointers.
//!
//! Writes still copy out of guest memory: a write may be completed to the guest before its op
//! finishes (write-back), and the guest may then reuse the buffer.

use evs_snapshot::volume::ZERO_FD;
use evs_snapshot::{HostSpan, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::blk::GuestRange;

/// A range that is not inside one mapped region (it crosses a region's end, or it is not
/// guest memory at all): the caller reads through a bounce buffer instead, which splits
/// across regions or reports the guest's error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotMapped;

/// Calls `f(segment, offset into it, guest address, length)` for each piece where `segs`
/// (contiguous from buffer offset 0, in order) meets the guest ranges `data` (in order).
/// Fails if the segments are not contiguous from 0 or the ranges are too short for them.
pub(crate) fn pieces<E>(
    segs: &[Segment],
    data: &[GuestRange],
    mut f: impl FnMut(&Segment, usize, u64, usize) -> Result<(), E>,
    short: impl Fn() -> E,
) -> Result<(), E> {
    let (mut gi, mut gdone, mut pos) = (0usize, 0usize, 0usize);
    for s in segs {
        if s.buf_offset != pos {
            return Err(short());
        }
        let mut sdone = 0;
        while sdone < s.len {
            let Some(r) = data.get(gi) else { return Err(short()) };
            let avail = r.len as usize - gdone;
            if avail == 0 {
                (gi, gdone) = (gi + 1, 0);
                continue;
            }
            let n = avail.min(s.len - sdone);
            f(s, sdone, r.addr.wrapping_add(gdone as u64), n)?;
            sdone += n;
            gdone += n;
        }
        pos += s.len;
    }
    Ok(())
}

const ZEROS: [u8; 4096] = [0; 4096];

/// Zeroes the holes of `segs` in guest memory and lists its file pieces as spans into it
/// (`spans` cleared first). The spans are valid while `mem`'s `Arc` is held.
pub(crate) fn plan(
    mem: &GuestMemoryMmap<()>,
    data: &[GuestRange],
    segs: &[Segment],
    spans: &mut Vec<HostSpan>,
) -> Result<(), NotMapped> {
    spans.clear();
    pieces(
        segs,
        data,
        |s, at, addr, n| {
            let slice = mem.get_slice(GuestAddress(addr), n).map_err(|_| NotMapped)?;
            if s.fd == ZERO_FD {
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(ZEROS.len());
                    slice.write_slice(&ZEROS[..k], done).map_err(|_| NotMapped)?;
                    done += k;
                }
                return Ok(());
            }
            let ptr = slice.ptr_guard_mut().as_ptr();
            // SAFETY: `ptr..ptr + n` is one slice of a region of `mem` (get_slice checked the
            // bounds), mapped writable for as long as the `GuestMemoryMmap` lives; the caller
            // puts that map's `Arc` in the op as its `keep`. This process only touches guest
            // memory through vm-memory's volatile accesses, never through Rust references.
            spans.push(unsafe { HostSpan::new(s.fd, s.offset + at as u64, ptr, n) });
            Ok(())
        },
        || NotMapped,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(fd: i32, offset: u64, buf_offset: usize, len: usize) -> Segment {
        Segment { fd, offset, buf_offset, len }
    }

    fn g(addr: u64, len: u32) -> GuestRange {
        GuestRange { addr, len }
    }

    fn collect(segs: &[Segment], data: &[GuestRange]) -> Result<Vec<(i32, u64, u64, usize)>, NotMapped> {
        let mut out = Vec::new();
        pieces(
            segs,
            data,
            |s, at, addr, n| {
                out.push((s.fd, s.offset + at as u64, addr, n));
                Ok(())
            },
            || NotMapped,
        )?;
        Ok(out)
    }

    #[test]
    fn segments_are_cut_at_guest_range_ends() {
        let segs = [seg(3, 8192, 0, 6144), seg(ZERO_FD, 0, 6144, 2048)];
        let data = [g(0x1000, 1024), g(0x9000, 0), g(0x5000, 7168)];
        assert_eq!(
            collect(&segs, &data).unwrap(),
            vec![(3, 8192, 0x1000, 1024), (3, 9216, 0x5000, 5120), (ZERO_FD, 0, 0x6400, 2048)]
        );
    }

    #[test]
    fn short_ranges_and_gaps_are_refused() {
        assert_eq!(collect(&[seg(3, 0, 0, 4096)], &[g(0x1000, 4095)]), Err(NotMapped));
        assert_eq!(collect(&[seg(3, 0, 512, 4096)], &[g(0x1000, 8192)]), Err(NotMapped));
    }

    proptest::proptest! {
        /// Every byte of the request lands once, in order, at the guest byte it belongs to.
        #[test]
        fn pieces_cover_the_request_in_order(
            seg_lens in proptest::collection::vec(1usize..5000, 1..6),
            range_lens in proptest::collection::vec(0u32..5000, 1..8),
        ) {
            let total: usize = seg_lens.iter().sum();
            let mut range_lens = range_lens;
            let have: usize = range_lens.iter().map(|&l| l as usize).sum();
            if have < total {
                range_lens.push((total - have) as u32);
            }
            let mut segs = Vec::new();
            let mut at = 0;
            for (i, &l) in seg_lens.iter().enumerate() {
                segs.push(seg(i as i32, 1 << 20 | (i as u64) << 16, at, l));
                at += l;
            }
            let mut data = Vec::new();
            let mut addr = 0x10_0000u64;
            for &l in &range_lens {
                data.push(g(addr, l));
                addr += u64::from(l) + 512;
            }
            let got = collect(&segs, &data).unwrap();
            // Byte k of the request: the guest address it must land at.
            let mut want_addr = Vec::with_capacity(total);
            for r in &data {
                want_addr.extend((0..r.len as u64).map(|i| r.addr + i));
            }
            let mut k = 0;
            for (fd, off, gaddr, n) in got {
                let s = segs[fd as usize];
                proptest::prop_assert_eq!(s.buf_offset + (off - s.offset) as usize, k);
                proptest::prop_assert_eq!(gaddr, want_addr[k]);
                proptest::prop_assert_eq!(want_addr[k + n - 1], gaddr + n as u64 - 1);
                k += n;
            }
            proptest::prop_assert_eq!(k, total);
        }
    }
}
