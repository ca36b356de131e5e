//! A virtio-blk driver in the test process, on one queue of a vhost-user-blk socket: the
//! `vhost` crate speaks the vhost-user protocol; the split ring (virtio 1.2, 2.7) is laid out
//! here in guest memory made of memfds shared with the backend, as a guest's driver would. One
//! request at a time, each chain built from the data ranges the test chooses, so a test can
//! place buffers where a guest could (across two memory regions, outside guest memory, split
//! in odd lengths) and check the bytes and status that come back. It negotiates VERSION_1
//! only: no FLUSH, so the device owes it stable writes on completion.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 64;
// The ring and the request header live in the first region (guest physical addresses).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
/// Guest memory below this address of the first region is the driver's.
pub const FREE_FROM: u64 = 0x4000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub struct VhostDriver {
    _fe: Frontend,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
}

impl VhostDriver {
    /// Connects to `socket` with guest memory of `regions` (guest physical address, size;
    /// the first starts at 0), each a memfd the backend maps too.
    pub fn connect(socket: &Path, regions: &[(u64, usize)]) -> VhostDriver {
        assert_eq!(regions.first().map(|r| r.0), Some(0), "the first region starts at 0");
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = regions
            .iter()
            .map(|&(gpa, size)| {
                let fd = rustix::fs::memfd_create("evs-test-guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
                let f = File::from(fd);
                f.set_len(size as u64).unwrap();
                (GuestAddress(gpa), size, Some(FileOffset::new(f, 0)))
            })
            .collect();
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges_with_files(ranges).unwrap();
        let infos: Vec<VhostUserMemoryRegionInfo> =
            mem.iter().map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap()).collect();
        let va = |gpa: u64| infos[0].userspace_addr + gpa;
        let mut fe = Frontend::connect(socket, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & proto != 0 {
            let p = fe.get_protocol_features().unwrap();
            fe.set_protocol_features(p & VhostUserProtocolFeatures::CONFIG).unwrap();
        }
        fe.set_features(features & (VIRTIO_F_VERSION_1 | proto)).unwrap();
        fe.set_mem_table(&infos).unwrap();
        fe.set_vring_num(0, QUEUE_SIZE).unwrap();
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
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        if features & proto != 0 {
            fe.set_vring_enable(0, true).unwrap();
        }
        VhostDriver { _fe: fe, mem, kick, call, avail_idx: 0 }
    }

    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// One request of type `ty` at `sector` with data in `data` (guest address, length),
    /// device-writable for reads; waits for it and returns (status, used length).
    pub fn request(&mut self, ty: u32, sector: u64, data: &[(u64, u32)]) -> (u8, u32) {
        let m = &self.mem;
        m.write_obj(ty, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let n = data.len() as u16 + 2;
        assert!(n <= QUEUE_SIZE, "too many data ranges");
        let data_flags = if ty == VIRTIO_BLK_T_IN { F_NEXT | F_WRITE } else { F_NEXT };
        put_desc(m, 0, HDR, 16, F_NEXT, 1);
        for (i, &(addr, len)) in data.iter().enumerate() {
            put_desc(m, i as u16 + 1, addr, len, data_flags, i as u16 + 2);
        }
        put_desc(m, n - 1, STATUS, 1, F_WRITE, 0);
        let at = AVAIL + 4 + 2 * (self.avail_idx % QUEUE_SIZE) as u64;
        m.write_obj(0u16, GuestAddress(at)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.store(self.avail_idx, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used: u16 = m.load(GuestAddress(USED + 2), Ordering::Acquire).unwrap();
            if used == self.avail_idx {
                break;
            }
            assert!(Instant::now() < deadline, "the backend did not complete the request in 20 s");
            let _ = self.call.read();
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = USED + 4 + 8 * (self.avail_idx.wrapping_sub(1) % QUEUE_SIZE) as u64;
        let id: u32 = m.read_obj(GuestAddress(e)).unwrap();
        assert_eq!(id, 0, "the used entry names the chain's head");
        let len: u32 = m.read_obj(GuestAddress(e + 4)).unwrap();
        (m.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    /// What a broken driver does: publishes `ahead` more available entries than it put in the
    /// ring (more than the ring holds when `ahead` > the queue size) and kicks.
    pub fn publish_bogus_avail(&mut self, ahead: u16) {
        let idx = self.avail_idx.wrapping_add(ahead);
        self.mem.store(idx, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
        self.kick.write(1).unwrap();
    }

    /// Puts the avail index back where the requests really end.
    pub fn restore_avail(&mut self) {
        self.mem.store(self.avail_idx, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
    }

    /// The queue size (entries of the ring).
    pub fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    /// Copies guest memory out (ranges in order).
    pub fn gather(&self, data: &[(u64, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len) in data {
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
        }
        out
    }

    /// Fills guest ranges with `byte`.
    pub fn fill(&self, data: &[(u64, u32)], byte: u8) {
        for &(addr, len) in data {
            self.mem.write_slice(&vec![byte; len as usize], GuestAddress(addr)).unwrap();
        }
    }

    /// Copies `bytes` into the guest ranges, in order.
    pub fn scatter(&self, data: &[(u64, u32)], bytes: &[u8]) {
        let mut at = 0;
        for &(addr, len) in data {
            self.mem.write_slice(&bytes[at..at + len as usize], GuestAddress(addr)).unwrap();
            at += len as usize;
        }
    }
}

fn put_desc(mem: &GuestMemoryMmap<()>, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * i as u64;
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}
