//! Stopping the daemon with SIGTERM and starting it again on the same data directory: it exits
//! 0, and volumes, attachments and data are all there afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use evs_tests::util::{assert_bytes_eq, seeded_bytes, Rng, BLOCK, GIB, KIB, MIB};
use evs_tests::{name_field, u64_field, Daemon, NbdClient};

fn connect(uri: &str) -> NbdClient {
    NbdClient::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

fn size_of(d: &Daemon, name: &str) -> u64 {
    let vols = d.list_volumes();
    let v = vols
        .iter()
        .find(|v| name_field(v) == name)
        .unwrap_or_else(|| panic!("volume {name} not listed after restart: {vols:?}"));
    u64_field(v, "size_bytes")
}

/// Data written without any FLUSH, an online extend, one client still connected: SIGTERM gives
/// exit status 0, and after a start on the same data directory both volumes are listed with
/// their sizes, the admin token is the same, the old attach URIs (TCP and unix) still work and
/// every byte is there. Twice in a row.
#[test]
fn sigterm_then_start_keeps_volumes_attachments_and_data() {
    let mut d = Daemon::start();
    let (a_tcp, a_unix) = d.create_volume("restart-a", "64M");
    let (b_tcp, b_unix) = d.create_volume("restart-b", "1G");
    let token = d.token().to_string();
    let mut rng = Rng::from_env_or_time("restart");

    let mut model_a = vec![0u8; (128 * MIB) as usize];
    let mut pieces_b: Vec<(u64, Vec<u8>)> = Vec::new();
    {
        let mut a = connect(&a_tcp);
        for _ in 0..100 {
            let off = rng.below(64 * MIB - 1);
            let len = rng.range(1, (64 * MIB - off).min(256 * KIB) + 1);
            let data = rng.bytes(len as usize);
            a.write(off, &data).expect("write a");
            model_a[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        a.write_zeroes(MIB, 100_000, 0).expect("write_zeroes a");
        model_a[MIB as usize..(MIB + 100_000) as usize].fill(0);
        a.disconnect().expect("disconnect a");
    }
    d.evsctl_ok(&["volume", "extend", "restart-a", "--size", "128M"]);
    {
        let mut a = connect(&a_unix);
        assert_eq!(a.size(), 128 * MIB, "a new connection after extend sees the new size");
        let data = rng.bytes(3 * MIB as usize);
        a.write(100 * MIB, &data).expect("write beyond the old end");
        model_a[(100 * MIB) as usize..(103 * MIB) as usize].copy_from_slice(&data);
        a.disconnect().expect("disconnect");
    }
    // Volume b stays connected through the SIGTERM.
    let mut b = connect(&b_tcp);
    for i in 0..20u64 {
        let off = i * 50 * MIB + rng.below(MIB);
        let len = rng.range(1, 200 * KIB) as usize;
        let data = rng.bytes(len);
        b.write(off, &data).expect("write b");
        pieces_b.push((off, data));
    }

    for round in 1..=2 {
        let status = d.terminate();
        assert!(status.success(), "round {round}: evs-target exited with {status} after SIGTERM\n{}", d.log());
        drop(b);
        d.restart();
        assert_eq!(d.token(), token, "round {round}: the admin token changed across a restart");

        assert_eq!(size_of(&d, "restart-a"), 128 * MIB, "round {round}");
        assert_eq!(size_of(&d, "restart-b"), GIB, "round {round}");
        assert!(u64_field(&d.show_volume("restart-a"), "allocated_bytes") > 0, "round {round}");

        let mut a = connect(&a_tcp);
        assert_eq!(a.size(), 128 * MIB);
        let got = a.read_all(0, 128 * MIB, 4 << 20).expect("read a");
        assert_bytes_eq(&got, &model_a, 0, &format!("round {round}: volume a after restart"));
        a.disconnect().expect("disconnect");

        let mut bu = connect(&b_unix);
        assert_eq!(bu.size(), GIB);
        for (off, data) in &pieces_b {
            let got = bu.read(*off, data.len() as u32).expect("read b");
            assert_bytes_eq(&got, data, *off, &format!("round {round}: volume b after restart"));
        }
        bu.disconnect().expect("disconnect");

        // More data for the next round, again without FLUSH, again left connected; above every
        // earlier piece (the first ones end below 952 MiB), so no expected piece is overwritten.
        b = connect(&b_tcp);
        let off = 1000 * MIB + round * MIB;
        let data = rng.bytes(123_457);
        b.write(off, &data).expect("write b");
        pieces_b.push((off, data));
    }
    drop(b);
}

/// SIGTERM while a client streams writes (no FLUSH): the daemon drains, flushes and exits 0;
/// after a restart every acknowledged write is there, and a write in flight at the signal
/// (or answered with an error) reads as its old or its new content.
#[test]
fn sigterm_during_writes_keeps_every_acknowledged_write() {
    let mut d = Daemon::start();
    let blocks = 2048u64; // 8 MiB
    let (tcp, _unix) = d.create_volume("restart-drain", "8M");
    let seed = Rng::from_env_or_time("restart_drain").next_u64();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let tcp = tcp.clone();
        thread::spawn(move || {
            let mut c = connect(&tcp);
            let mut rng = Rng::new(seed);
            // Last acknowledged content (seed) of each block, and writes of unknown outcome.
            let mut acked: Vec<Option<u64>> = vec![None; blocks as usize];
            let mut unknown: Vec<(u64, u64)> = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let blk = rng.below(blocks);
                let s = seed ^ (n << 20) ^ blk;
                n += 1;
                match c.write(blk * BLOCK, &seeded_bytes(s, BLOCK as usize)) {
                    Ok(()) => acked[blk as usize] = Some(s),
                    Err(_) => {
                        unknown.push((blk, s));
                        break;
                    }
                }
            }
            (acked, unknown, n)
        })
    };
    thread::sleep(Duration::from_millis(700));
    let status = d.terminate();
    stop.store(true, Ordering::Relaxed);
    let (acked, unknown, n) = writer.join().expect("writer thread");
    assert!(status.success(), "evs-target exited with {status} after SIGTERM during writes\n{}", d.log());
    assert!(n > 10, "only {n} writes were sent before SIGTERM");

    d.restart();
    let mut c = connect(&tcp);
    let all = c.read_all(0, blocks * BLOCK, 4 << 20).expect("read after restart");
    for blk in 0..blocks {
        let got = &all[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize];
        let mut allowed: Vec<Vec<u8>> = vec![match acked[blk as usize] {
            Some(s) => seeded_bytes(s, BLOCK as usize),
            None => vec![0u8; BLOCK as usize],
        }];
        for (b, s) in &unknown {
            if *b == blk {
                allowed.push(seeded_bytes(*s, BLOCK as usize));
            }
        }
        assert!(
            allowed.iter().any(|a| a == got),
            "block {blk} after SIGTERM and restart holds neither its last acknowledged content nor a write in \
             flight (acked: {:?}, {} writes sent)",
            acked[blk as usize],
            n
        );
    }
}
