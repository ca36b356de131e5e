//! A minimal vhost-user-blk frontend for benchmarks: drives one virtqueue of a vhost-user-blk
//! socket from this process (no guest), 4 KiB random reads or writes at a fixed queue depth,
//! and prints the IOPS. It measures the backend's data path natively, where a guest under
//! software emulation would measure the emulator.
//!
//! ```text
//! vhost-frontend-bench SOCKET randread|randwrite SECONDS [QD] [SPAN_BYTES]
//! ```
//!
//! The vhost-user protocol is the `vhost` crate's frontend; the split ring (descriptor table,
//! avail and used rings) is laid out here in a memfd shared with the backend, as a virtio
//! driver would (virtio 1.2, 2.7). One request = header, 4 KiB data, status byte: three
//! chained descriptors of a fixed slot. Output: one line `IOPS <n> ERRORS <n> KICKS <n>`.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const BLOCK: u64 = 4096;
const MEM_SIZE: usize = 16 << 20;
// Layout of the shared memory (guest physical addresses).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x4000;
const STATUS: u64 = 0x6000;
const DATA: u64 = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Used ring flag: the device is polling the avail ring and needs no kick (virtio 1.2, 2.7.10).
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Negotiated as a guest's driver does (Linux, with QEMU): without it the device owes stable
/// writes on completion and flushes after each one.
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: vhost-frontend-bench SOCKET randread|randwrite SECONDS [QD] [SPAN_BYTES]");
    }
    let write = match args[2].as_str() {
        "randread" => false,
        "randwrite" => true,
        other => bail!("unknown workload {other:?}: randread or randwrite"),
    };
    let seconds: u64 = args[3].parse().context("SECONDS")?;
    let qd: u16 = args.get(4).map(|s| s.parse()).transpose().context("QD")?.unwrap_or(32);
    let span: u64 = args.get(5).map(|s| s.parse()).transpose().context("SPAN_BYTES")?.unwrap_or(256 << 20);
    if qd == 0 || qd as u64 * 3 > QUEUE_SIZE as u64 || qd as u64 * BLOCK > MEM_SIZE as u64 - DATA {
        bail!("QD must be 1 to {}", QUEUE_SIZE / 3);
    }
    if span < BLOCK {
        bail!("SPAN_BYTES must be at least {BLOCK}");
    }

    // Shared memory: a memfd the backend maps too.
    let fd = rustix::fs::memfd_create("vhost-frontend-bench", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(MEM_SIZE as u64)?;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)))])
            .context("mapping the shared memory")?;
    let region = mem.iter().next().context("one region")?;
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).context("memory region info")?;
    let va = |gpa: u64| info.userspace_addr + gpa;

    let mut fe = Frontend::connect(&args[1], 1).with_context(|| format!("connecting to {}", args[1]))?;
    fe.set_owner()?;
    let features = fe.get_features()?;
    let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if features & proto != 0 {
        let p = fe.get_protocol_features()?;
        fe.set_protocol_features(p & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ))?;
    }
    // No EVENT_IDX, no indirect descriptors: the simplest driver.
    fe.set_features(features & (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | proto))?;
    fe.set_mem_table(&[info])?;
    fe.set_vring_num(0, QUEUE_SIZE)?;
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: va(DESC),
            used_ring_addr: va(USED),
            avail_ring_addr: va(AVAIL),
            log_addr: None,
        },
    )?;
    fe.set_vring_base(0, 0)?;
    let kick = EventFd::new(0)?;
    let call = EventFd::new(0)?;
    fe.set_vring_call(0, &call)?;
    fe.set_vring_kick(0, &kick)?;
    if features & proto != 0 {
        fe.set_vring_enable(0, true)?;
    }

    // Fixed chains: slot i uses descriptors 3i (header), 3i+1 (data), 3i+2 (status).
    let blocks = span / BLOCK;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_sector = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * (BLOCK / 512)
    };
    for i in 0..qd as u64 {
        let d = DESC + i * 3 * 16;
        put_desc(&mem, d, HDRS + i * 16, 16, F_NEXT, (3 * i + 1) as u16)?;
        let data_flags = if write { F_NEXT } else { F_NEXT | F_WRITE };
        put_desc(&mem, d + 16, DATA + i * BLOCK, BLOCK as u32, data_flags, (3 * i + 2) as u16)?;
        put_desc(&mem, d + 32, STATUS + i, 1, F_WRITE, 0)?;
        if write {
            mem.write_slice(&vec![i as u8 ^ 0x5a; BLOCK as usize], GuestAddress(DATA + i * BLOCK))?;
        }
    }
    let ty: u32 = if write { 1 } else { 0 };
    let mut avail_idx: u16 = 0;
    let mut submit = |mem: &GuestMemoryMmap<()>, slot: u64, avail_idx: &mut u16| -> anyhow::Result<()> {
        let h = HDRS + slot * 16;
        mem.write_obj(ty, GuestAddress(h))?;
        mem.write_obj(0u32, GuestAddress(h + 4))?;
        mem.write_obj(next_sector(), GuestAddress(h + 8))?;
        mem.write_obj(0xffu8, GuestAddress(STATUS + slot))?;
        let at = AVAIL + 4 + 2 * (*avail_idx % QUEUE_SIZE) as u64;
        mem.write_obj((slot * 3) as u16, GuestAddress(at))?;
        *avail_idx = avail_idx.wrapping_add(1);
        // The ring entry before the index (release), as a driver must.
        mem.store(*avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)?;
        Ok(())
    };
    for slot in 0..qd as u64 {
        submit(&mem, slot, &mut avail_idx)?;
    }
    kick.write(1)?;

    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let (mut done, mut errors, mut used_seen, mut kicks) = (0u64, 0u64, 0u16, 0u64);
    loop {
        call.read()?; // blocks until the backend signals
        let used_idx: u16 = mem.load(GuestAddress(USED + 2), Ordering::Acquire)?;
        while used_seen != used_idx {
            let e = USED + 4 + 8 * (used_seen % QUEUE_SIZE) as u64;
            let id: u32 = mem.read_obj(GuestAddress(e))?;
            used_seen = used_seen.wrapping_add(1);
            let slot = id as u64 / 3;
            let status: u8 = mem.read_obj(GuestAddress(STATUS + slot))?;
            if status != 0 {
                errors += 1;
            }
            done += 1;
            if Instant::now() < end {
                submit(&mem, slot, &mut avail_idx)?;
            }
        }
        if avail_idx == used_seen {
            break; // everything submitted has completed, and the time is up
        }
        kick_unless_suppressed(&mem, &kick, &mut kicks)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("IOPS {:.0} ERRORS {errors} KICKS {kicks}", done as f64 / secs);
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

/// Kicks the device unless it has asked not to be (VRING_USED_F_NO_NOTIFY while it is
/// serving the queue), as a Linux driver does (`virtqueue_kick_prepare`): the avail index
/// store is ordered before the flags load by a full fence, so a device that turns
/// notifications back on and then finds no new request cannot miss this one.
fn kick_unless_suppressed(mem: &GuestMemoryMmap<()>, kick: &EventFd, kicks: &mut u64) -> anyhow::Result<()> {
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags: u16 = mem.load(GuestAddress(USED), Ordering::Acquire)?;
    if flags & VRING_USED_F_NO_NOTIFY == 0 {
        kick.write(1)?;
        *kicks += 1;
    }
    Ok(())
}

fn put_desc(mem: &GuestMemoryMmap<()>, at: u64, addr: u64, len: u32, flags: u16, next: u16) -> anyhow::Result<()> {
    mem.write_obj(addr, GuestAddress(at))?;
    mem.write_obj(len, GuestAddress(at + 8))?;
    mem.write_obj(flags, GuestAddress(at + 12))?;
    mem.write_obj(next, GuestAddress(at + 14))?;
    Ok(())
}
