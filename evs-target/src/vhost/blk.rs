//! virtio-blk without I/O: the features we offer, the configuration space, and the parsing of
//! one request's descriptor chain into a [`BlkRequest`] (virtio 1.2, section 5.2).
//!
//! A request is a chain of guest buffers: a 16-byte header the device reads (type, reserved,
//! sector), the data (read by the device for OUT, DISCARD and WRITE_ZEROES; written for IN and
//! GET_ID), and one status byte the device writes last. Drivers may split or merge those pieces
//! across descriptors however they like, so parsing works on byte ranges, not on descriptor
//! boundaries.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk sectors are 512 bytes whatever the block size.
pub const SECTOR: u64 = 512;
/// The header every request starts with.
pub const OUT_HDR_LEN: usize = 16;
/// One segment of a DISCARD or WRITE_ZEROES payload.
pub const SEGMENT_LEN: usize = 16;
/// WRITE_ZEROES segment flag: the device may deallocate (punch) the range.
pub const WZ_UNMAP: u32 = 1;
/// Largest data transfer of one request we accept (the guest is held to it by seg_max ×
/// size_max; a larger one gets IOERR).
pub const MAX_TRANSFER: u64 = 32 << 20;
/// Largest DISCARD / WRITE_ZEROES range, in sectors (advertised in the config space).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23; // 4 GiB
/// Segments per DISCARD / WRITE_ZEROES request (advertised).
pub const MAX_DISCARD_SEG: u32 = 1;
/// Descriptors per request beyond header and status: the guest merges at most this many
/// segments into one request (seg_max).
pub const SEG_MAX: u32 = 126;
/// Largest segment (size_max): with `SEG_MAX` it bounds a guest's request to what we accept,
/// even when the guest raises its max_sectors_kb.
pub const SIZE_MAX: u32 = 256 << 10;
const _: () = assert!(SEG_MAX as u64 * SIZE_MAX as u64 <= MAX_TRANSFER);
/// Queue size we accept (the frontend chooses up to this).
pub const MAX_QUEUE_SIZE: usize = 256;

pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

/// The feature bits of [`virtio_bindings`] as a mask.
const fn bit(b: u32) -> u64 {
    1 << b
}

/// The virtio features offered for a volume (read-only for snapshot exports). The caller adds
/// the vhost-user protocol-features bit.
pub fn features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_MQ);
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// Whether a driver that acknowledged `acked` takes completed writes as stable: it did not
/// negotiate FLUSH (nor CONFIG_WCE, which we do not offer), so the device has no volatile
/// cache as far as it knows (virtio 1.2, 5.2.6.2). A read-only device has no writes.
pub fn write_through(acked: u64, read_only: bool) -> bool {
    !read_only && acked & bit(VIRTIO_BLK_F_FLUSH) == 0
}

/// Length of the configuration space we fill in (`struct virtio_blk_config` up to and
/// including the write-zeroes fields; later fields read as zeros).
pub const CONFIG_LEN: usize = 60;

/// The configuration space of a volume of `size` bytes served on `num_queues` queues:
/// capacity in 512-byte sectors, 512-byte logical and 4 KiB physical blocks (the store's
/// block: the guest aligns its file systems to it), and the discard/write-zeroes limits.
pub fn config_space(size: u64, num_queues: u16, read_only: bool) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    c[0..8].copy_from_slice(&(size / SECTOR).to_le_bytes()); // capacity
    put32(&mut c, 8, SIZE_MAX); // size_max
    put32(&mut c, 12, SEG_MAX); // seg_max
                                // geometry (16..20) not offered
    put32(&mut c, 20, SECTOR as u32); // blk_size
    c[24] = 3; // physical_block_exp: 2^3 logical blocks = 4 KiB
    c[25] = 0; // alignment_offset
    c[26..28].copy_from_slice(&8u16.to_le_bytes()); // min_io_size, in logical blocks
    put32(&mut c, 28, 8); // opt_io_size
    c[32] = 1; // writeback (no CONFIG_WCE: FLUSH is offered, the cache is write-back)
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    if !read_only {
        put32(&mut c, 36, MAX_DISCARD_SECTORS); // max_discard_sectors
        put32(&mut c, 40, MAX_DISCARD_SEG); // max_discard_seg
        put32(&mut c, 44, 8); // discard_sector_alignment: 4 KiB
        put32(&mut c, 48, MAX_DISCARD_SECTORS); // max_write_zeroes_sectors
        put32(&mut c, 52, MAX_DISCARD_SEG); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

/// `len` bytes of the configuration space from `offset` (zeros past what we define, nothing
/// past the 256 bytes a config space may have).
pub fn config_slice(config: &[u8], offset: u32, len: u32) -> Vec<u8> {
    let (offset, len) = (offset as usize, len as usize);
    if offset.checked_add(len).is_none_or(|end| end > 256) {
        return Vec::new();
    }
    (offset..offset + len).map(|i| config.get(i).copied().unwrap_or(0)).collect()
}

/// One descriptor of a chain: guest address, length, and whether the device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: u64,
    pub len: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkOp {
    /// Read `len` bytes at `offset` into the data ranges.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the data ranges (`len` bytes) at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// The device id string into the data ranges.
    GetId,
    /// Discard / write zeroes: the segments are in the data ranges (read them with
    /// [`parse_segments`]).
    Discard,
    WriteZeroes,
    /// A type we do not implement (answered UNSUPP).
    Unsupported(u32),
}

/// A parsed request: the op, its data in guest memory (after the header, before the status),
/// and where the status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    pub op: BlkOp,
    pub data: Vec<GuestRange>,
    pub status: u64,
}

/// Why a chain is not a request we can answer at all (no status byte to write, or no
/// header): the request is completed with nothing written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the descriptor chain has no writable status byte at its end")]
    NoStatus,
    #[error("the descriptor chain is shorter than the 16-byte request header")]
    ShortHeader,
    #[error("a descriptor runs past the end of the address space")]
    AddressOverflow,
}

/// Parses a chain. `header` must hold the chain's first 16 readable bytes (the caller reads
/// them from guest memory at the ranges [`header_ranges`] gives). Checks of range and
/// direction that deserve an IOERR reply are left to [`validate`].
pub fn parse(descs: &[Desc], header: &[u8; OUT_HDR_LEN]) -> Result<BlkRequest, ChainError> {
    parse_in(descs, header, Vec::new())
}

/// [`parse`] listing the data ranges in `data` (a recycled list, cleared here), so that a
/// queue allocates nothing per request.
pub fn parse_in(
    descs: &[Desc],
    header: &[u8; OUT_HDR_LEN],
    mut data: Vec<GuestRange>,
) -> Result<BlkRequest, ChainError> {
    data.clear();
    // Every address below is within a descriptor: none may run past 2^64 (a guest picks them).
    if descs.iter().any(|d| d.len > 0 && d.addr.checked_add(d.len as u64 - 1).is_none()) {
        return Err(ChainError::AddressOverflow);
    }
    // Status: the last byte of the last descriptor, which must be device-writable.
    let last = descs.last().ok_or(ChainError::NoStatus)?;
    if !last.write || last.len == 0 {
        return Err(ChainError::NoStatus);
    }
    let status = last.addr + (last.len as u64 - 1);
    let total: u64 = descs.iter().map(|d| d.len as u64).sum();
    if total < OUT_HDR_LEN as u64 + 1 {
        return Err(ChainError::ShortHeader);
    }
    let ty = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    // Data: every byte after the header and before the status.
    let mut skip = OUT_HDR_LEN as u64;
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let mut len = d.len as u64;
        if i + 1 == n {
            len -= 1; // the status byte
        }
        let s = skip.min(len);
        len -= s;
        skip -= s;
        if len > 0 {
            // Below the descriptor's last byte: no overflow (checked above).
            data.push(GuestRange { addr: d.addr + s, len: len as u32 });
        }
    }
    let len: u64 = data.iter().map(|r| r.len as u64).sum();
    let offset = sector.saturating_mul(SECTOR);
    let op = match ty {
        VIRTIO_BLK_T_IN => BlkOp::Read { offset, len },
        VIRTIO_BLK_T_OUT => BlkOp::Write { offset, len },
        VIRTIO_BLK_T_FLUSH => BlkOp::Flush,
        VIRTIO_BLK_T_GET_ID => BlkOp::GetId,
        VIRTIO_BLK_T_DISCARD => BlkOp::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => BlkOp::WriteZeroes,
        other => BlkOp::Unsupported(other),
    };
    Ok(BlkRequest { op, data, status })
}

/// The guest ranges holding a chain's first `OUT_HDR_LEN` bytes (the header), in order.
pub fn header_ranges(descs: &[Desc]) -> impl Iterator<Item = GuestRange> + '_ {
    let mut need = OUT_HDR_LEN as u64;
    descs
        .iter()
        .map_while(move |d| {
            (need > 0).then(|| {
                let n = need.min(d.len as u64);
                need -= n;
                GuestRange { addr: d.addr, len: n as u32 }
            })
        })
        .filter(|r| r.len > 0)
}

/// Whether the data ranges of a request all have the direction its op needs: device-writable
/// for IN and GET_ID, device-readable for OUT, DISCARD and WRITE_ZEROES. Returns false when a
/// range lies in a descriptor of the wrong kind.
pub fn directions_ok(descs: &[Desc], req: &BlkRequest) -> bool {
    let want_write = match req.op {
        BlkOp::Read { .. } | BlkOp::GetId => true,
        BlkOp::Write { .. } | BlkOp::Discard | BlkOp::WriteZeroes => false,
        BlkOp::Flush | BlkOp::Unsupported(_) => return true,
    };
    // In u128: a descriptor may end exactly at 2^64.
    let end = |addr: u64, len: u32| addr as u128 + len as u128;
    req.data.iter().all(|r| {
        descs.iter().any(|d| d.write == want_write && r.addr >= d.addr && end(r.addr, r.len) <= end(d.addr, d.len))
    })
}

/// Why a well-formed request is answered IOERR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{what} of {len} bytes at {offset} is past the end of the {size}-byte volume")]
    OutOfRange { what: &'static str, offset: u64, len: u64, size: u64 },
    #[error("{what} length {len} is not a multiple of 512")]
    Unaligned { what: &'static str, len: u64 },
    #[error("transfer of {len} bytes exceeds the {max}-byte maximum")]
    TooLarge { len: u64, max: u64 },
    #[error("{0} on a read-only volume")]
    ReadOnly(&'static str),
    #[error("the data buffers have the wrong direction for this request")]
    Direction,
    #[error("malformed discard/write-zeroes payload: {0}")]
    BadSegments(&'static str),
    /// Answered UNSUPP, not IOERR, as the specification asks (unknown segment flags, unmap on
    /// a discard).
    #[error("unsupported discard/write-zeroes request: {0}")]
    Unsupported(&'static str),
}

impl RequestError {
    /// The status byte this refusal is answered with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// Checks a request against the volume: range, alignment, size, read-only.
pub fn validate(req: &BlkRequest, size: u64, read_only: bool) -> Result<(), RequestError> {
    let in_range = |what, offset: u64, len: u64| match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RequestError::OutOfRange { what, offset, len, size }),
    };
    match req.op {
        BlkOp::Read { offset, len } | BlkOp::Write { offset, len } => {
            let what = if matches!(req.op, BlkOp::Read { .. }) { "read" } else { "write" };
            if what == "write" && read_only {
                return Err(RequestError::ReadOnly("write"));
            }
            if len % SECTOR != 0 {
                return Err(RequestError::Unaligned { what, len });
            }
            if len > MAX_TRANSFER {
                return Err(RequestError::TooLarge { len, max: MAX_TRANSFER });
            }
            in_range(what, offset, len)
        }
        BlkOp::Discard | BlkOp::WriteZeroes if read_only => {
            Err(RequestError::ReadOnly(if req.op == BlkOp::Discard { "discard" } else { "write zeroes" }))
        }
        // Checked before the payload is copied out of the guest: a guest sets the length.
        BlkOp::Discard | BlkOp::WriteZeroes => {
            let len: u64 = req.data.iter().map(|r| r.len as u64).sum();
            if len > MAX_DISCARD_SEG as u64 * SEGMENT_LEN as u64 {
                Err(RequestError::BadSegments("more segments than max_discard_seg"))
            } else if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) {
                Err(RequestError::BadSegments("not a whole number of 16-byte segments"))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// One DISCARD / WRITE_ZEROES segment, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroSegment {
    pub offset: u64,
    pub len: u64,
    /// WRITE_ZEROES may deallocate.
    pub unmap: bool,
}

/// Parses a DISCARD (`discard`) or WRITE_ZEROES payload (16-byte segments: sector, number of
/// sectors, flags) and checks each segment against the volume.
pub fn parse_segments(payload: &[u8], size: u64, discard: bool) -> Result<Vec<ZeroSegment>, RequestError> {
    if payload.is_empty() || !payload.len().is_multiple_of(SEGMENT_LEN) {
        return Err(RequestError::BadSegments("not a whole number of 16-byte segments"));
    }
    if payload.len() / SEGMENT_LEN > MAX_DISCARD_SEG as usize {
        return Err(RequestError::BadSegments("more segments than max_discard_seg"));
    }
    let mut out = Vec::new();
    for s in payload.chunks_exact(SEGMENT_LEN) {
        let sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
        if flags & !WZ_UNMAP != 0 {
            return Err(RequestError::Unsupported("unknown segment flags"));
        }
        if discard && flags & WZ_UNMAP != 0 {
            return Err(RequestError::Unsupported("the unmap flag on a discard"));
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::BadSegments("more sectors than max_discard_sectors"));
        }
        let (offset, len) = (sector.saturating_mul(SECTOR), sectors as u64 * SECTOR);
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => return Err(RequestError::OutOfRange { what: "discard", offset, len, size }),
        }
        out.push(ZeroSegment { offset, len, unmap: flags & WZ_UNMAP != 0 });
    }
    Ok(out)
}

/// The GET_ID answer: up to 20 bytes, NUL-padded (a serial such as `evs-42`).
pub fn device_id(volume_id: u64) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let s = format!("evs-{volume_id}");
    let n = s.len().min(id.len());
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(ty: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn d(addr: u64, len: u32, write: bool) -> Desc {
        Desc { addr, len, write }
    }

    #[test]
    fn read_with_separate_descriptors() {
        let descs = [d(0x1000, 16, false), d(0x2000, 4096, true), d(0x3000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_IN, 8)).unwrap();
        assert_eq!(r.op, BlkOp::Read { offset: 4096, len: 4096 });
        assert_eq!(r.data, vec![GuestRange { addr: 0x2000, len: 4096 }]);
        assert_eq!(r.status, 0x3000);
        assert!(directions_ok(&descs, &r));
        assert_eq!(validate(&r, 1 << 20, false), Ok(()));
        assert_eq!(header_ranges(&descs).collect::<Vec<_>>(), vec![GuestRange { addr: 0x1000, len: 16 }]);
    }

    #[test]
    fn write_with_header_data_and_status_merged() {
        // Header and data in one readable descriptor, data tail and status in a writable one
        // is not valid for a write; header + data readable, status alone is.
        let descs = [d(0x1000, 16 + 1024, false), d(0x5000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_OUT, 2)).unwrap();
        assert_eq!(r.op, BlkOp::Write { offset: 1024, len: 1024 });
        assert_eq!(r.data, vec![GuestRange { addr: 0x1010, len: 1024 }]);
        assert!(directions_ok(&descs, &r));
        // Header split over two descriptors.
        let descs = [d(0x1000, 8, false), d(0x2000, 8, false), d(0x3000, 512, false), d(0x4000, 1, true)];
        assert_eq!(
            header_ranges(&descs).collect::<Vec<_>>(),
            vec![GuestRange { addr: 0x1000, len: 8 }, GuestRange { addr: 0x2000, len: 8 }]
        );
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_OUT, 0)).unwrap();
        assert_eq!(r.data, vec![GuestRange { addr: 0x3000, len: 512 }]);
        // Data and status sharing the last (writable) descriptor.
        let descs = [d(0x1000, 16, false), d(0x2000, 513, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_IN, 0)).unwrap();
        assert_eq!((r.data.clone(), r.status), (vec![GuestRange { addr: 0x2000, len: 512 }], 0x2200));
    }

    #[test]
    fn malformed_chains_and_requests() {
        assert_eq!(parse(&[], &hdr(0, 0)), Err(ChainError::NoStatus));
        assert_eq!(parse(&[d(0x1000, 16, false)], &hdr(0, 0)), Err(ChainError::NoStatus));
        assert_eq!(parse(&[d(0x1000, 8, false), d(0x2000, 1, true)], &hdr(0, 0)), Err(ChainError::ShortHeader));
        // A read whose buffer the device may not write.
        let descs = [d(0x1000, 16, false), d(0x2000, 512, false), d(0x3000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_IN, 0)).unwrap();
        assert!(!directions_ok(&descs, &r));
        // Past the end, unaligned, read-only.
        let descs = [d(0x1000, 16, false), d(0x2000, 4096, false), d(0x3000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_OUT, 2047)).unwrap();
        assert!(matches!(validate(&r, 1 << 20, false), Err(RequestError::OutOfRange { .. })));
        assert_eq!(validate(&r, 1 << 30, true), Err(RequestError::ReadOnly("write")));
        let descs = [d(0x1000, 16, false), d(0x2000, 100, false), d(0x3000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_OUT, 0)).unwrap();
        assert_eq!(validate(&r, 1 << 20, false), Err(RequestError::Unaligned { what: "write", len: 100 }));
        let r = parse(&descs, &hdr(99, 0)).unwrap();
        assert_eq!(r.op, BlkOp::Unsupported(99));
        // A sector number that overflows is out of range, not a wrap-around.
        let descs = [d(0x1000, 16, false), d(0x2000, 512, true), d(0x3000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_IN, u64::MAX)).unwrap();
        assert!(matches!(validate(&r, 1 << 20, false), Err(RequestError::OutOfRange { .. })));
    }

    #[test]
    fn a_descriptor_that_wraps_the_address_space_is_refused() {
        // A guest controls every descriptor: an address near the top must not overflow.
        let descs = [d(0x1000, 16, false), d(u64::MAX - 10, 512, true), d(0x3000, 1, true)];
        assert_eq!(parse(&descs, &hdr(VIRTIO_BLK_T_IN, 0)), Err(ChainError::AddressOverflow));
        let descs = [d(0x1000, 16, false), d(u64::MAX, 2, true)];
        assert_eq!(parse(&descs, &hdr(VIRTIO_BLK_T_IN, 0)), Err(ChainError::AddressOverflow));
        // A header descriptor that ends exactly at 2^64 is fine too.
        let descs = [d(u64::MAX - 15, 16, false), d(0x2000, 512, true), d(0x3000, 1, true)];
        let r = parse(&descs, &hdr(VIRTIO_BLK_T_IN, 0)).unwrap();
        assert_eq!(r.data, vec![GuestRange { addr: 0x2000, len: 512 }]);
        assert!(directions_ok(&descs, &r));
        // The last byte of the address space is still a place for a status byte.
        let descs = [d(0x1000, 16, false), d(u64::MAX, 1, true)];
        assert_eq!(parse(&descs, &hdr(VIRTIO_BLK_T_FLUSH, 0)).map(|r| r.status), Ok(u64::MAX));
    }

    proptest::proptest! {
        /// Whatever chain a guest builds: no panic, and what `parse` and `validate` accept is
        /// inside the volume, sector-aligned, within the transfer limit, made of pieces of the
        /// chain's own descriptors, and never a write to a read-only volume.
        #[test]
        fn any_chain_parses_without_panic_and_accepted_requests_are_in_bounds(
            descs in proptest::collection::vec(
                (proptest::prop_oneof![proptest::num::u64::ANY, 0u64..0x10000, (u64::MAX - 0x10000)..=u64::MAX],
                 proptest::prop_oneof![proptest::num::u32::ANY, 0u32..8192],
                 proptest::bool::ANY),
                0..8),
            ty in proptest::prop_oneof![0u32..16, proptest::num::u32::ANY],
            sector in proptest::prop_oneof![0u64..4096, proptest::num::u64::ANY],
            size in 0u64..(1 << 34),
            read_only in proptest::bool::ANY,
        ) {
            let descs: Vec<Desc> = descs.into_iter().map(|(addr, len, write)| d(addr, len, write)).collect();
            let _ = header_ranges(&descs).count();
            let Ok(req) = parse(&descs, &hdr(ty, sector)) else { return Ok(()) };
            for r in &req.data {
                let end = |addr: u64, len: u32| addr as u128 + len as u128;
                let inside = descs.iter().any(|x| r.addr >= x.addr && end(r.addr, r.len) <= end(x.addr, x.len));
                proptest::prop_assert!(inside, "data range {r:?} outside the chain {descs:?}");
            }
            let _ = directions_ok(&descs, &req);
            if validate(&req, size, read_only).is_ok() {
                match req.op {
                    BlkOp::Read { offset, len } | BlkOp::Write { offset, len } => {
                        proptest::prop_assert!(offset.checked_add(len).is_some_and(|e| e <= size));
                        proptest::prop_assert_eq!(len % SECTOR, 0);
                        proptest::prop_assert!(len <= MAX_TRANSFER);
                        let write_on_ro = read_only && matches!(req.op, BlkOp::Write { .. });
                        proptest::prop_assert!(!write_on_ro);
                    }
                    BlkOp::Discard | BlkOp::WriteZeroes => {
                        proptest::prop_assert!(!read_only);
                        let len: u64 = req.data.iter().map(|r| r.len as u64).sum();
                        proptest::prop_assert!(len <= MAX_DISCARD_SEG as u64 * SEGMENT_LEN as u64);
                    }
                    _ => {}
                }
            }
        }

        /// Any discard payload: no panic, and accepted segments lie inside the volume.
        #[test]
        fn any_discard_payload_is_in_bounds_or_refused(
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            size in 0u64..(1 << 34),
        ) {
            if let Ok(segs) = parse_segments(&payload, size, false) {
                for s in segs {
                    proptest::prop_assert!(s.offset.checked_add(s.len).is_some_and(|e| e <= size));
                }
            }
        }
    }

    #[test]
    fn discard_segments() {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        let want = vec![ZeroSegment { offset: 4096, len: 8192, unmap: false }];
        assert_eq!(parse_segments(&seg, 1 << 20, true).unwrap(), want);
        assert_eq!(parse_segments(&seg, 1 << 20, false).unwrap(), want);
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_segments(&seg, 1 << 20, false).unwrap()[0].unmap);
        // The specification: UNSUPP for unmap on a discard and for unknown flags.
        let e = parse_segments(&seg, 1 << 20, true).unwrap_err();
        assert_eq!((e.status(), e), (STATUS_UNSUPP, RequestError::Unsupported("the unmap flag on a discard")));
        seg[12..16].copy_from_slice(&2u32.to_le_bytes());
        let e = parse_segments(&seg, 1 << 20, false).unwrap_err();
        assert_eq!((e.status(), e), (STATUS_UNSUPP, RequestError::Unsupported("unknown segment flags")));
        seg[12..16].copy_from_slice(&0u32.to_le_bytes());
        let e = parse_segments(&seg, 8192, false).unwrap_err();
        assert!(matches!(e, RequestError::OutOfRange { .. }) && e.status() == STATUS_IOERR, "{e}");
        assert!(parse_segments(&seg[..15], 1 << 20, false).is_err());
        assert!(parse_segments(&[seg, seg].concat(), 1 << 20, false).is_err());
    }

    /// The payload's length is checked before anything is copied from the guest: a guest can
    /// make a chain of many large readable descriptors.
    #[test]
    fn a_discard_payload_longer_than_its_segments_is_refused_unread() {
        let descs = [d(0x1000, 16, false), d(0x10_0000, u32::MAX, false), d(0x2000, 1, true)];
        for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let r = parse(&descs, &hdr(ty, 0)).unwrap();
            let e = validate(&r, 1 << 40, false).unwrap_err();
            assert_eq!(e, RequestError::BadSegments("more segments than max_discard_seg"));
            let r = parse(&[d(0x1000, 16 + 15, false), d(0x2000, 1, true)], &hdr(ty, 0)).unwrap();
            assert!(matches!(validate(&r, 1 << 40, false), Err(RequestError::BadSegments(_))));
            let r = parse(&[d(0x1000, 32, false), d(0x2000, 1, true)], &hdr(ty, 0)).unwrap();
            assert_eq!(validate(&r, 1 << 40, false), Ok(()));
        }
    }

    #[test]
    fn config_space_fields() {
        let c = config_space(10 << 30, 4, false);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (10u64 << 30) / 512);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), SIZE_MAX);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_ne!(features(false) & bit(VIRTIO_BLK_F_SIZE_MAX), 0);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), MAX_DISCARD_SECTORS);
        assert_eq!(c[56], 1);
        let ro = config_space(1 << 20, 1, true);
        assert_eq!(&ro[36..60], &[0u8; 24]);
        assert_eq!(config_slice(&c, 0, 8), c[0..8].to_vec());
        assert_eq!(config_slice(&c, 56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(config_slice(&c, 250, 10).is_empty());
        assert_eq!(features(true) & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(features(true) & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(features(false) & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(&device_id(42)[..7], b"evs-42\0");
        assert!(!write_through(features(false), false), "all we offer, FLUSH included");
        assert!(write_through(bit(VIRTIO_F_VERSION_1), false), "a driver without FLUSH");
        assert!(!write_through(bit(VIRTIO_F_VERSION_1), true), "read-only: nothing to write");
    }
}
