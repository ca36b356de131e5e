//! vhost-user-blk request parsing and validation on arbitrary descriptor chains, and the
//! vhost-user message header the relay reads from a frontend.
//!
//! Input layout: 9 bytes of device parameters (u64 volume size, one byte of flags), 16 bytes
//! of request header, then descriptors of 13 bytes each (u64 guest address, u32 length, one
//! byte whose low bit says device-writable). Checks that nothing panics and that whatever
//! `validate` accepts lies inside the volume and inside the chain's own descriptors.

#![no_main]

use evs_target::vhost::blk::{directions_ok, header_ranges, parse, parse_segments, validate, BlkOp, Desc};
use evs_target::vhost::relay::{parse_header, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.first_chunk::<HEADER_LEN>() {
        if let Ok(h) = parse_header(h) {
            assert!(h.size as usize <= MAX_PAYLOAD);
        }
    }
    let Some((params, rest)) = data.split_first_chunk::<9>() else { return };
    let Some((header, rest)) = rest.split_first_chunk::<16>() else { return };
    let size = u64::from_le_bytes(params[..8].try_into().expect("8 bytes"));
    let read_only = params[8] & 1 != 0;
    let descs: Vec<Desc> = rest
        .chunks_exact(13)
        .map(|c| Desc {
            addr: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
            write: c[12] & 1 != 0,
        })
        .collect();
    let _ = header_ranges(&descs).count();
    let _ = parse_segments(rest, size).map(|segs| {
        for s in segs {
            assert!(s.offset.checked_add(s.len).is_some_and(|e| e <= size), "discard out of bounds: {s:?}");
        }
    });
    let Ok(req) = parse(&descs, header) else { return };
    let end = |addr: u64, len: u32| addr as u128 + len as u128;
    for r in &req.data {
        assert!(
            descs.iter().any(|d| r.addr >= d.addr && end(r.addr, r.len) <= end(d.addr, d.len)),
            "data range {r:?} outside the chain"
        );
    }
    let _ = directions_ok(&descs, &req);
    if validate(&req, size, read_only).is_ok() {
        if let BlkOp::Read { offset, len } | BlkOp::Write { offset, len } = req.op {
            assert!(offset.checked_add(len).is_some_and(|e| e <= size), "accepted out of bounds: {req:?}");
            assert!(!(read_only && matches!(req.op, BlkOp::Write { .. })), "accepted a write on read-only");
        }
    }
});
