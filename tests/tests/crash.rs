//! kill -9 during a write workload with periodic flushes (and, in the second test, snapshots
//! taken and deleted all the while), many times over one volume: after
//! each restart every write acknowledged before the last completed FLUSH (or written with FUA)
//! reads back intact, and no block reads as something it never held.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use evs_tests::daemon::bin_path;
use evs_tests::nbd_client::consts::CMD_FLAG_FUA;
use evs_tests::util::{Rng, BLOCK};
use evs_tests::{ConnectOptions, Daemon, NbdClient};

/// Blocks of the volume under test (4 MiB).
const BLOCKS: u64 = 1024;
const MAGIC: u64 = 0x4556_5343_5241_5348; // "EVSCRASH"

/// Content of block `blk` written by operation `seq`: a header naming both, then bytes derived
/// from them, so a block read back tells which write it came from, or that it is garbage.
fn block_content(seq: u64, blk: u64) -> Vec<u8> {
    let mut v = Rng::new(seq.wrapping_mul(0x1_0000_0001) ^ blk).bytes(BLOCK as usize);
    v[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v[16..24].copy_from_slice(&blk.to_le_bytes());
    v
}

#[derive(Clone, Copy, Debug)]
struct Op {
    seq: u64,
    /// A trim or write-zeroes: the block reads as zeros afterwards.
    zero: bool,
}

/// What the test knows about each block, across all iterations.
struct Model {
    /// Every operation ever sent for the block (acknowledged or not).
    history: Vec<Vec<Op>>,
    /// Latest operation acknowledged for the block.
    last_acked: Vec<Option<u64>>,
    /// Oldest operation whose result may still be seen: the latest one made durable by a
    /// completed FLUSH (or its own FUA). None: nothing durable yet, zeros are allowed.
    durable: Vec<Option<u64>>,
    next_seq: u64,
    flushes: u64,
    acked_ops: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            history: vec![Vec::new(); BLOCKS as usize],
            last_acked: vec![None; BLOCKS as usize],
            durable: vec![None; BLOCKS as usize],
            next_seq: 1,
            flushes: 0,
            acked_ops: 0,
        }
    }

    fn make_durable(&mut self, blk: u64, seq: u64) {
        let d = &mut self.durable[blk as usize];
        *d = Some(d.map_or(seq, |old| old.max(seq)));
    }

    /// Checks one block read after a restart; Err explains what is wrong.
    fn check(&self, blk: u64, got: &[u8]) -> Result<(), String> {
        let floor = self.durable[blk as usize];
        let ops = &self.history[blk as usize];
        let allowed = |op: &Op| floor.is_none_or(|f| op.seq >= f);
        if got.iter().all(|&b| b == 0) {
            if floor.is_none() || ops.iter().any(|op| op.zero && allowed(op)) {
                return Ok(());
            }
            return Err(format!("reads as zeros, but write {} was durable", floor.unwrap()));
        }
        let magic = u64::from_le_bytes(got[0..8].try_into().unwrap());
        let seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
        let which = u64::from_le_bytes(got[16..24].try_into().unwrap());
        if magic != MAGIC {
            return Err("holds garbage (no header of any write)".into());
        }
        if which != blk {
            return Err(format!("holds the content that write {seq} sent to block {which}"));
        }
        if got != block_content(seq, blk).as_slice() {
            return Err(format!("holds a torn or corrupted copy of write {seq}"));
        }
        match ops.iter().find(|op| op.seq == seq && !op.zero) {
            None => Err(format!("holds write {seq}, which never wrote this block")),
            Some(op) if !allowed(op) => Err(format!(
                "holds write {seq}, older than write {} that a completed flush made durable",
                floor.unwrap()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// One client's workload until the connection breaks: 1–4 block writes (1 in 10 with FUA),
/// some trims and write-zeroes, a FLUSH every `flush_every` operations.
fn workload(mut c: NbdClient, mut model: Model, mut rng: Rng, flush_every: u64) -> Model {
    // Acknowledgements of the previous daemon process are not covered by this one's flushes.
    model.last_acked.fill(None);
    let mut since_flush = 0;
    loop {
        let n = rng.range(1, 5).min(BLOCKS);
        let first = rng.below(BLOCKS - n + 1);
        let seq = model.next_seq;
        model.next_seq += 1;
        let kind = rng.below(20);
        let zero = kind < 2;
        for b in first..first + n {
            model.history[b as usize].push(Op { seq, zero });
        }
        let mut fua = false;
        let res = match kind {
            0 => c.trim(first * BLOCK, (n * BLOCK) as u32),
            1 => c.write_zeroes(first * BLOCK, (n * BLOCK) as u32, 0),
            _ => {
                let mut data = Vec::with_capacity((n * BLOCK) as usize);
                for b in first..first + n {
                    data.extend_from_slice(&block_content(seq, b));
                }
                fua = rng.chance(10);
                c.write_flags(first * BLOCK, &data, if fua { CMD_FLAG_FUA } else { 0 })
            }
        };
        if res.is_err() {
            return model;
        }
        model.acked_ops += 1;
        for b in first..first + n {
            model.last_acked[b as usize] = Some(seq);
            if fua {
                model.make_durable(b, seq);
            }
        }
        since_flush += 1;
        if since_flush >= flush_every {
            since_flush = 0;
            // Everything acknowledged so far is covered by this flush.
            let covered: Vec<(u64, u64)> =
                model.last_acked.iter().enumerate().filter_map(|(b, s)| s.map(|s| (b as u64, s))).collect();
            if c.flush().is_err() {
                return model;
            }
            model.flushes += 1;
            for (b, s) in covered {
                model.make_durable(b, s);
            }
        }
    }
}

#[test]
fn kill9_during_writes_never_loses_flushed_data() {
    crash_loop("crash", 20, false);
}

/// The same while another client takes and deletes snapshots of the volume all the time: kills
/// land during snapshot creation, during background merges and during writes after a snapshot.
#[test]
fn kill9_during_snapshots_and_merges_never_loses_flushed_data() {
    crash_loop("crash_snapshots", 12, true);
}

/// Takes snapshot `s<n>` and deletes `s<n-2>` in a loop until `stop`; returns how many
/// snapshots it took.
fn snapshot_churn(evsctl: Vec<String>, first: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut n = first;
    let mut taken = 0;
    while !stop.load(Ordering::Acquire) {
        let run = |args: &[&str]| {
            Command::new(bin_path("evsctl"))
                .args(&evsctl)
                .args(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !run(&["snapshot", "create", "crash", &format!("s{n}")]) {
            break; // the daemon is gone
        }
        taken += 1;
        if n >= first + 2 {
            run(&["snapshot", "delete", &format!("crash@s{}", n - 2)]);
        }
        n += 1;
        thread::sleep(Duration::from_millis(5));
    }
    taken
}

fn crash_loop(name: &str, default_iterations: u32, with_snapshots: bool) {
    let iterations: u32 =
        std::env::var("EVS_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_iterations);
    let budget = Duration::from_secs(75);
    let mut d = Daemon::start();
    let (tcp, unix) = d.create_volume("crash", "4M");
    let mut rng = Rng::from_env_or_time(name);
    let mut model = Model::new();
    let started = Instant::now();
    let mut done = 0;
    let mut snapshots_taken = 0;
    for it in 0..iterations {
        if it >= 5 && started.elapsed() > budget {
            eprintln!("{name}: stopping after {it} iterations ({:?})", started.elapsed());
            break;
        }
        let uri = if it % 2 == 0 { &tcp } else { &unix };
        let opts = ConnectOptions { structured_replies: it % 3 != 2, ..Default::default() };
        let c = NbdClient::connect_with(uri, &opts).unwrap_or_else(|e| panic!("iteration {it}: connect {uri}: {e}"));
        let flush_every = rng.range(3, 17);
        let wrng = Rng::new(rng.next_u64());
        let writer = thread::spawn(move || workload(c, model, wrng, flush_every));
        let stop = Arc::new(AtomicBool::new(false));
        let churn = with_snapshots.then(|| {
            let args = vec!["--endpoint".to_string(), d.endpoint(), "--token".to_string(), d.token().to_string()];
            let stop = stop.clone();
            let first = u64::from(it) * 1000;
            thread::spawn(move || snapshot_churn(args, first, stop))
        });
        thread::sleep(Duration::from_millis(rng.range(50, 600)));
        d.kill9();
        stop.store(true, Ordering::Release);
        model = writer.join().expect("writer thread panicked");
        if let Some(ch) = churn {
            snapshots_taken += ch.join().expect("snapshot thread panicked");
        }
        d.restart();

        let mut c = NbdClient::connect(if it % 2 == 0 { &unix } else { &tcp })
            .unwrap_or_else(|e| panic!("iteration {it}: connect after restart: {e}"));
        let all = c.read_all(0, BLOCKS * BLOCK, 1 << 20).unwrap_or_else(|e| panic!("iteration {it}: read: {e}"));
        let mut bad = Vec::new();
        for blk in 0..BLOCKS {
            let got = &all[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize];
            if let Err(why) = model.check(blk, got) {
                bad.push(format!("block {blk}: {why}"));
            }
        }
        assert!(
            bad.is_empty(),
            "iteration {it}: after kill -9 and restart, {} blocks are wrong:\n{}",
            bad.len(),
            bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
        c.disconnect().expect("disconnect");
        if with_snapshots {
            // The catalog is consistent: every snapshot it lists has a readable chain (a diff
            // walks every layer of it) and each one reads in full over NBD.
            let list = d.evsctl_json(&["snapshot", "list", "crash"]);
            for s in list["snapshots"].as_array().unwrap() {
                let snap = format!("crash@{}", s["name"].as_str().unwrap());
                d.evsctl_json(&["snapshot", "diff", "crash", "--to", s["name"].as_str().unwrap()]);
                let v = d.evsctl_json(&["snapshot", "attach", &snap]);
                let mut sc = NbdClient::connect(v["uri"].as_str().unwrap()).unwrap();
                sc.read_all(0, BLOCKS * BLOCK, 1 << 20).unwrap_or_else(|e| panic!("iteration {it}: read {snap}: {e}"));
                drop(sc);
                d.evsctl_ok(&["snapshot", "detach", &snap]);
            }
        }
        done += 1;
    }
    let durable = model.durable.iter().filter(|d| d.is_some()).count();
    eprintln!(
        "{name}: {done} iterations, {} operations acknowledged, {} flushes, {durable} blocks durable, {snapshots_taken} snapshots taken",
        model.acked_ops, model.flushes
    );
    assert!(model.flushes > 0 && durable > 0, "the workload never completed a flush: the test proved nothing");
    if with_snapshots {
        assert!(snapshots_taken > 0, "no snapshot was taken during the workload: the test proved nothing");
    }
}
