//! The same suite against every I/O engine: file reads and writes with several segments,
//! syncs, socket recv/send, errors, and the fault-injecting wrapper.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use evs_snapshot::io_engine::faulty::FaultyEngine;
use evs_snapshot::io_engine::{run_one, SendBuf};
use evs_snapshot::{AlignedBuf, EngineKind, IoEngine, Op, Segment};

fn engines() -> Vec<Box<dyn IoEngine>> {
    let mut v = vec![EngineKind::Portable.build(64).unwrap()];
    if EngineKind::detect() == EngineKind::Uring {
        v.push(EngineKind::Uring.build(64).unwrap());
    } else {
        eprintln!("io_uring unavailable here: only the portable engine is tested");
    }
    v
}

#[test]
fn file_segments_round_trip() {
    for mut e in engines() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = f.as_raw_fd();
        let mut buf = AlignedBuf::zeroed(12288);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let segs = vec![
            Segment { fd, offset: 0, buf_offset: 0, len: 4096 },
            Segment { fd, offset: 65536, buf_offset: 4096, len: 8192 },
        ];
        let (_, r) = run_one(e.as_mut(), Op::Write { buf, segs });
        assert_eq!(r.unwrap(), 12288, "{:?}", e.kind());
        let (_, r) = run_one(e.as_mut(), Op::Sync { fd, datasync: true });
        r.unwrap();
        let mut check = vec![0u8; 8192];
        f.read_exact_at(&mut check, 65536).unwrap();
        assert!(check.iter().enumerate().all(|(i, &b)| b == ((i + 4096) % 251) as u8));

        let segs = vec![
            Segment { fd, offset: 65536, buf_offset: 100, len: 8192 },
            Segment { fd, offset: 0, buf_offset: 8292, len: 4096 },
        ];
        let (op, r) = run_one(e.as_mut(), Op::Read { buf: AlignedBuf::zeroed(12388), segs });
        assert_eq!(r.unwrap(), 12288);
        let Op::Read { buf, .. } = op else { panic!("op changed kind") };
        assert!(buf[..100].iter().all(|&b| b == 0));
        assert!(buf[100..8292].iter().enumerate().all(|(i, &b)| b == ((i + 4096) % 251) as u8));
        assert!(buf[8292..].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
}

#[test]
fn read_past_end_is_an_error() {
    for mut e in engines() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        f.set_len(4096).unwrap();
        let f = std::fs::File::open(dir.path().join("f")).unwrap();
        let segs = vec![Segment { fd: f.as_raw_fd(), offset: 0, buf_offset: 0, len: 8192 }];
        let (_, r) = run_one(e.as_mut(), Op::Read { buf: AlignedBuf::zeroed(8192), segs });
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof, "{:?}", e.kind());
        // A bad descriptor reports EBADF.
        let (_, r) = run_one(e.as_mut(), Op::Sync { fd: 1_000_000, datasync: true });
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}

#[test]
fn socket_send_and_recv() {
    for mut e in engines() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let bufs = vec![
            SendBuf { data: AlignedBuf::copy_from(b"xxhello "), start: 2, end: 8 },
            SendBuf { data: AlignedBuf::copy_from(b"world"), start: 0, end: 5 },
        ];
        let (_, r) = run_one(e.as_mut(), Op::Send { fd: a.as_raw_fd(), bufs });
        assert_eq!(r.unwrap(), 11);
        let mut got = [0u8; 11];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world");

        b.write_all(b"ping").unwrap();
        let seg = Segment { fd: a.as_raw_fd(), offset: 0, buf_offset: 10, len: 100 };
        let (op, r) = run_one(e.as_mut(), Op::Recv { buf: AlignedBuf::zeroed(110), seg });
        assert_eq!(r.unwrap(), 4);
        let Op::Recv { buf, .. } = op else { panic!() };
        assert_eq!(&buf[10..14], b"ping");

        // Queued recv plus a file op: the file op completes without waiting for the peer.
        let seg = Segment { fd: a.as_raw_fd(), offset: 0, buf_offset: 0, len: 16 };
        e.push(1, Op::Recv { buf: AlignedBuf::zeroed(16), seg });
        e.push(2, Op::Sync { fd: a.as_raw_fd(), datasync: true });
        e.wait(1).unwrap();
        let mut out = Vec::new();
        e.drain(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag, 2);
        drop(b); // peer closes: the recv completes with 0
        e.wait(1).unwrap();
        e.drain(&mut out);
        assert_eq!(out[1].tag, 1);
        assert_eq!(*out[1].result.as_ref().unwrap(), 0);
    }
}

#[test]
fn many_ops_in_flight() {
    for mut e in engines() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let fd = f.as_raw_fd();
        for i in 0..300u64 {
            let buf = AlignedBuf::copy_from(&[(i % 256) as u8; 4096]);
            e.push(i, Op::Write { buf, segs: vec![Segment { fd, offset: i * 4096, buf_offset: 0, len: 4096 }] });
        }
        let mut out = Vec::new();
        while out.len() < 300 {
            e.wait(1).unwrap();
            e.drain(&mut out);
        }
        assert!(out.iter().all(|c| *c.result.as_ref().unwrap() == 4096));
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort();
        assert_eq!(tags, (0..300).collect::<Vec<_>>());
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 299 * 4096 + 7).unwrap();
        assert_eq!(b[0], (299 % 256) as u8);
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn faulty_engine_fails_chosen_ops() {
    for inner in engines() {
        let rule = Arc::new(|op: &Op| matches!(op, Op::Write { .. }).then_some(libc::ENOSPC));
        let mut e = FaultyEngine::new(inner, rule);
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(8192).unwrap();
        let fd = f.as_raw_fd();
        let (_, r) = run_one(
            &mut e,
            Op::Write {
                buf: AlignedBuf::copy_from(&[9u8; 4096]),
                segs: vec![Segment { fd, offset: 0, buf_offset: 0, len: 4096 }],
            },
        );
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        let mut b = [1u8; 4096];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0), "a failed write changed nothing");
        let (_, r) = run_one(&mut e, Op::Sync { fd, datasync: true });
        r.unwrap();
    }
}

#[test]
fn op_without_segments_completes_at_once() {
    for mut e in engines() {
        // A read of holes only has no file segment; it must still complete.
        let (op, r) = run_one(e.as_mut(), Op::Read { buf: AlignedBuf::zeroed(4096), segs: Vec::new() });
        assert_eq!(r.unwrap(), 0, "{:?}", e.kind());
        assert!(matches!(op, Op::Read { .. }));
        assert_eq!(e.in_flight(), 0);
    }
}

/// Anonymous memory the engine fills through raw pointers only, as it does a vhost-user
/// guest's mapping.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the tests touch it through raw pointers only while no
// op is in flight.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Mapping {
        // SAFETY: an anonymous private mapping; no address hint, no file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping { ptr: p.cast(), len }
    }

    /// A copy of the bytes (no op may be in flight).
    fn bytes(&self) -> Vec<u8> {
        // SAFETY: the whole mapping is readable and initialised (zero or read into).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn read_into_foreign_memory() {
    for mut e in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let fd = f.as_raw_fd();
        let m = Arc::new(Mapping::new(16384));
        // SAFETY: both spans lie inside the mapping, which the op's `keep` holds.
        let spans = unsafe {
            vec![
                evs_snapshot::HostSpan::new(fd, 4096, m.ptr.add(100), 8192),
                evs_snapshot::HostSpan::new(fd, 0, m.ptr.add(8292), 4096),
            ]
        };
        let (op, r) = run_one(e.as_mut(), Op::ReadInto { spans, keep: m.clone() });
        assert_eq!(r.unwrap(), 12288, "{:?}", e.kind());
        drop(op);
        let got = m.bytes();
        assert!(got[..100].iter().all(|&b| b == 0));
        assert_eq!(&got[100..8292], &data[4096..12288]);
        assert_eq!(&got[8292..12388], &data[..4096]);
        assert!(got[12388..].iter().all(|&b| b == 0));
        // Past the end of the file: an error, as for reads into owned buffers.
        // SAFETY: inside the mapping, which the op holds.
        let spans = vec![unsafe { evs_snapshot::HostSpan::new(fd, 8192, m.ptr, 8192) }];
        let (_, r) = run_one(e.as_mut(), Op::ReadInto { spans, keep: m.clone() });
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof, "{:?}", e.kind());
        assert_eq!(Arc::strong_count(&m), 1, "the engine kept the memory after completion");
    }
}
