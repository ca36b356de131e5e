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
use evs_tests::durability::{workload, Model};
use evs_tests::util::{Rng, BLOCK};
use evs_tests::{ConnectOptions, Daemon, NbdClient};

/// Blocks of the volume under test (4 MiB).
const BLOCKS: u64 = 1024;

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
    let mut model = Model::new(BLOCKS);
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
        let bad = model.check_all(&all);
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
    let durable = model.durable_blocks();
    eprintln!(
        "{name}: {done} iterations, {} operations acknowledged, {} flushes, {durable} blocks durable, {snapshots_taken} snapshots taken",
        model.acked_ops, model.flushes
    );
    assert!(model.flushes > 0 && durable > 0, "the workload never completed a flush: the test proved nothing");
    if with_snapshots {
        assert!(snapshots_taken > 0, "no snapshot was taken during the workload: the test proved nothing");
    }
}
