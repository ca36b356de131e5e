//! Several connections to one volume (the server advertises NBD_FLAG_CAN_MULTI_CONN): a flush
//! on one covers the writes acknowledged on another, and what one writes the others read.

use std::thread;

use evs_tests::nbd_client::consts::{CMD_FLAG_NO_HOLE, TFLAG_CAN_MULTI_CONN, TFLAG_SEND_FLUSH};
use evs_tests::util::{assert_bytes_eq, Rng, BLOCK, KIB, MIB};
use evs_tests::{ConnectOptions, Daemon, NbdClient};

fn connect(uri: &str) -> NbdClient {
    NbdClient::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

fn connect_simple(uri: &str) -> NbdClient {
    NbdClient::connect_with(uri, &ConnectOptions { structured_replies: false, ..Default::default() })
        .unwrap_or_else(|e| panic!("connect {uri} without structured replies: {e}"))
}

/// Writes random pieces through `c` and into `model`.
fn random_writes(c: &mut NbdClient, model: &mut [u8], rng: &mut Rng, count: usize) {
    let size = model.len() as u64;
    for _ in 0..count {
        let (off, len) = if rng.chance(2) {
            let b = rng.below(size / BLOCK);
            (b * BLOCK, BLOCK * rng.range(1, 9).min(size / BLOCK - b))
        } else {
            let off = rng.below(size - 1);
            (off, rng.range(1, (size - off).min(200 * KIB) + 1))
        };
        let data = rng.bytes(len as usize);
        c.write(off, &data).unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

fn check_whole_volume(c: &mut NbdClient, model: &[u8], what: &str) {
    let got = c.read_all(0, model.len() as u64, 4 << 20).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_bytes_eq(&got, model, 0, what);
}

/// Connection A writes (no FUA, no flush of its own), connection B (over the unix socket)
/// flushes; then the daemon is killed with SIGKILL and started again: everything A wrote is
/// there.
#[test]
fn flush_on_one_connection_makes_writes_of_another_durable() {
    let mut d = Daemon::start();
    let size = 64 * MIB;
    let (tcp, unix) = d.create_volume("mc-flush", "64M");
    let mut a = connect(&tcp);
    let mut b = connect(&unix);
    assert!(a.has_flag(TFLAG_CAN_MULTI_CONN), "NBD_FLAG_CAN_MULTI_CONN not advertised");
    assert!(a.has_flag(TFLAG_SEND_FLUSH), "NBD_FLAG_SEND_FLUSH not advertised");

    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::from_env_or_time("multi_conn_flush");
    random_writes(&mut a, &mut model, &mut rng, 300);
    b.flush().expect("flush on connection B");

    d.kill9();
    drop((a, b));
    d.restart();
    let mut c = connect(&tcp);
    check_whole_volume(&mut c, &model, "after kill -9 and restart");
}

/// What one connection writes, another reads at once: writes, zero-writes and trims on random
/// connections (TCP, unix, one without structured replies), each checked from another.
#[test]
fn writes_on_one_connection_are_read_on_another() {
    let d = Daemon::start();
    let size = 32 * MIB;
    let (tcp, unix) = d.create_volume("mc-visible", "32M");
    let mut conns = vec![connect(&tcp), connect(&unix), connect_simple(&tcp)];
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::from_env_or_time("multi_conn_visible");
    for step in 0..400 {
        let w = rng.below(3) as usize;
        let r = (w + 1 + rng.below(2) as usize) % 3;
        let off = rng.below(size - 1);
        let len = rng.range(1, (size - off).min(300 * KIB) + 1);
        match rng.below(10) {
            0 => {
                conns[w]
                    .write_zeroes(off, len as u32, if rng.chance(2) { CMD_FLAG_NO_HOLE } else { 0 })
                    .unwrap_or_else(|e| panic!("step {step}: write_zeroes {off}+{len}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                // Whole blocks only: those read back as zeros.
                let off = off / BLOCK * BLOCK;
                let len = (len.div_ceil(BLOCK) * BLOCK).min(size - off);
                conns[w].trim(off, len as u32).unwrap_or_else(|e| panic!("step {step}: trim {off}+{len}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let data = rng.bytes(len as usize);
                conns[w].write(off, &data).unwrap_or_else(|e| panic!("step {step}: write {off}+{len}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        // Read a little more than the range, to see the neighbours too.
        let lo = off.saturating_sub(4096);
        let hi = (off + len + 4096).min(size);
        let got = conns[r].read(lo, (hi - lo) as u32).unwrap_or_else(|e| panic!("step {step}: read: {e}"));
        assert_bytes_eq(&got, &model[lo as usize..hi as usize], lo, &format!("step {step}: conn {r} after conn {w}"));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        check_whole_volume(c, &model, &format!("whole volume through connection {i}"));
    }
    for c in conns {
        c.disconnect().expect("disconnect");
    }
}

/// Four connections write their own regions at the same time; afterwards each connection reads
/// every region correctly.
#[test]
fn concurrent_writers_on_four_connections() {
    let d = Daemon::start();
    let region = 4 * MIB;
    let (tcp, unix) = d.create_volume("mc-concurrent", "16M");
    let seed = Rng::from_env_or_time("multi_conn_concurrent").next_u64();
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = if i % 2 == 0 { tcp.clone() } else { unix.clone() };
            thread::spawn(move || {
                let mut c = connect(&uri);
                let mut model = vec![0u8; region as usize];
                let mut rng = Rng::new(seed ^ i);
                for _ in 0..150 {
                    let off = rng.below(region - 1);
                    let len = rng.range(1, (region - off).min(64 * KIB) + 1);
                    let data = rng.bytes(len as usize);
                    c.write(i * region + off, &data).unwrap_or_else(|e| panic!("writer {i}: {e}"));
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                (c, model)
            })
        })
        .collect();
    let mut results: Vec<(NbdClient, Vec<u8>)> = handles.into_iter().map(|h| h.join().expect("writer")).collect();
    let whole: Vec<u8> = results.iter().flat_map(|(_, m)| m.iter().copied()).collect();
    for (i, (c, _)) in results.iter_mut().enumerate() {
        check_whole_volume(c, &whole, &format!("connection {i} reading all regions"));
    }
}
