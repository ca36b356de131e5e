//! Jobs end to end: volume delete runs as a job on a real daemon; `evsctl job ...` and
//! `evsctl volume delete` drive and watch it. Deletions are paced (`delete_bytes_per_second`)
//! so that the jobs last long enough to overlap; the tests assert on states, counts, data and
//! exit codes, never on durations.
//!
//! Not covered here: another tenant seeing or cancelling a job (there is no way to create a
//! second tenant before the tenant API exists; the job manager's unit tests cover the
//! scoping). Add it with `evsctl tenant create` and `Daemon::evsctl_as`.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use evs_tests::tools::format_output;
use evs_tests::util::{assert_bytes_eq, seeded_bytes, MIB};
use evs_tests::{name_field, u64_field, Daemon, DaemonOptions, NbdClient};

/// Bytes written into each volume to delete.
const DATA: u64 = 32 * MIB;
/// Pace of the deletions: each 32 MiB volume takes about 4 s to destroy.
const RATE: u64 = 8 * MIB;

fn daemon(limit: Option<usize>, rate: u64) -> Daemon {
    let mut toml = format!("delete_bytes_per_second = {rate}\n");
    if let Some(l) = limit {
        toml.push_str(&format!("max_running_jobs_per_tenant = {l}\n"));
    }
    Daemon::start_with(DaemonOptions { config: Some(toml), ..Default::default() })
}

/// Creates `name`, writes `len` bytes of data derived from `seed` over NBD, flushes and
/// detaches. Returns the data.
fn volume_with_data(d: &Daemon, name: &str, len: u64, seed: u64) -> Vec<u8> {
    let (tcp, _) = d.create_volume(name, "64M");
    let data = seeded_bytes(seed, len as usize);
    let mut c = NbdClient::connect(&tcp).unwrap_or_else(|e| panic!("connect {tcp}: {e}"));
    for (i, chunk) in data.chunks((4 * MIB) as usize).enumerate() {
        c.write(i as u64 * 4 * MIB, chunk).expect("write");
    }
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    d.evsctl_ok(&["volume", "detach", name]);
    data
}

/// `volume delete NAME --no-wait --output json` → the job id.
fn delete_no_wait(d: &Daemon, name: &str) -> u64 {
    let v = d.evsctl_json(&["volume", "delete", name, "--no-wait"]);
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["deleted"], false, "--no-wait does not claim the volume is deleted: {v}");
    assert_eq!(v["job"]["kind"], "delete-volume", "{v}");
    assert_eq!(v["job"]["target"], format!("volume {name}"), "{v}");
    u64_field(&v, "job_id")
}

fn jobs(d: &Daemon) -> Vec<Value> {
    let v = d.evsctl_json(&["job", "list"]);
    v["jobs"].as_array().unwrap_or_else(|| panic!("`job list` printed no `jobs` array: {v}")).clone()
}

fn job(d: &Daemon, id: u64) -> Value {
    d.evsctl_json(&["job", "show", &id.to_string()])
}

fn state(j: &Value) -> &str {
    j["state"].as_str().unwrap_or_else(|| panic!("no state in {j}"))
}

/// Polls `job show ID` until `f` holds (panics after a minute, with the job).
fn until_job(d: &Daemon, id: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(d, id);
        if f(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never got {what}: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr\n{}", format_output(o));
    lines[0].to_string()
}

fn layer_files(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.data_dir().join("layers"))
        .expect("layers dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Eight paced delete jobs of one tenant: polling `job list` never shows more than `limit`
/// running, the queued ones start in the order they were created, at some point exactly
/// `limit` run, and all succeed with the volumes and their files gone.
fn queue_of_eight(limit: usize) {
    let d = daemon((limit != 5).then_some(limit), RATE);
    let names: Vec<String> = (0..8).map(|i| format!("q{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        volume_with_data(&d, n, DATA, i as u64);
    }
    let ids: Vec<u64> = names.iter().map(|n| delete_no_wait(&d, n)).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "job ids grow: {ids:?}");

    let mut max_running = 0;
    let mut seen_states: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let list = jobs(&d);
        let by_id: BTreeMap<u64, &Value> = list.iter().map(|j| (u64_field(j, "id"), j)).collect();
        let states: Vec<&str> = ids.iter().map(|id| state(by_id[id])).collect();
        for (id, s) in ids.iter().zip(&states) {
            let v = seen_states.entry(*id).or_default();
            if v.last().map(String::as_str) != Some(*s) {
                v.push(s.to_string());
            }
        }
        let running = states.iter().filter(|s| **s == "running").count();
        assert!(running <= limit, "{running} jobs running with a limit of {limit}: {states:?}");
        max_running = max_running.max(running);
        // FIFO: a job has left the queue only if every older one has.
        if let Some(first_queued) = states.iter().position(|s| *s == "queued") {
            assert!(
                states[first_queued..].iter().all(|s| *s == "queued"),
                "a job started before an older queued one: {states:?}"
            );
        }
        if states.iter().all(|s| *s == "succeeded") {
            break;
        }
        assert!(
            states.iter().all(|s| ["queued", "running", "succeeded"].contains(s)),
            "a delete job did not succeed: {list:?}"
        );
        assert!(Instant::now() < deadline, "the jobs did not finish: {states:?}");
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(max_running, limit, "the queue never filled the {limit} running slots");
    for (id, seen) in &seen_states {
        assert!(seen.iter().all(|s| ["queued", "running", "succeeded"].contains(&s.as_str())), "job {id}: {seen:?}");
        assert_eq!(seen.last().map(String::as_str), Some("succeeded"), "job {id}: {seen:?}");
    }
    for (id, n) in ids.iter().zip(&names) {
        let j = job(&d, *id);
        assert!(u64_field(&j, "bytes_total") >= DATA, "job {id} destroyed less than was written: {j}");
        assert_eq!(u64_field(&j, "bytes_done"), u64_field(&j, "bytes_total"), "{j}");
        assert!(u64_field(&j, "started_unix") >= u64_field(&j, "created_unix"), "{j}");
        assert!(u64_field(&j, "finished_unix") >= u64_field(&j, "started_unix"), "{j}");
        assert!(j["error"].is_null(), "{j}");
        assert!(d.list_volumes().iter().all(|v| name_field(v) != n), "{n} still listed");
    }
    assert!(layer_files(&d).is_empty(), "layer files left: {:?}", layer_files(&d));
    // The table lists them too.
    let table = d.evsctl_ok(&["job", "list"]);
    assert_eq!(table.lines().filter(|l| l.contains("delete-volume") && l.contains("succeeded")).count(), 8, "{table}");
}

#[test]
fn eight_deletes_run_at_most_five_at_a_time_in_fifo_order() {
    queue_of_eight(5);
}

#[test]
fn the_running_limit_is_configurable() {
    queue_of_eight(2);
}

/// A queued delete is cancelled at once and the volume is usable again; while queued the
/// volume is `deleting` and refuses changes; a running delete past its catalog commit refuses
/// the cancel and finishes. `job wait` exits 0 (succeeded) or 3 (cancelled).
#[test]
fn cancel_a_queued_delete_keeps_the_volume() {
    // The busy volume takes about 16 s to destroy: it outlasts every check below.
    let d = daemon(Some(1), 4 * MIB);
    volume_with_data(&d, "busy", 64 * MIB, 1);
    let kept = volume_with_data(&d, "keep", 8 * MIB, 2);
    let busy = delete_no_wait(&d, "busy");
    until_job(&d, busy, "running, past its catalog commit", |j| {
        state(j) == "running" && u64_field(j, "bytes_total") > 0
    });
    let queued = delete_no_wait(&d, "keep");
    assert_eq!(state(&job(&d, queued)), "queued", "the limit is 1");

    // While its delete job is queued the volume is `deleting` and refuses changes.
    let v = d.show_volume("keep");
    assert_eq!(v["state"], "deleting", "{v}");
    let table = d.evsctl_ok(&["volume", "list"]);
    assert!(table.lines().any(|l| l.starts_with("keep ") && l.trim_end().ends_with("deleting")), "{table}");
    for args in [
        &["volume", "attach", "keep"][..],
        &["volume", "extend", "keep", "--size", "128M"],
        &["volume", "set-tier", "keep", "--tier", "high"],
        &["snapshot", "create", "keep", "s1"],
        &["volume", "create", "keep", "--size", "1M"],
    ] {
        let o = d.evsctl(args);
        assert!(!o.status.success(), "{args:?} succeeded on a volume being deleted\n{}", format_output(&o));
        let line = stderr_line(&o);
        assert!(
            line.contains("\"keep\" is being deleted") && line.contains(&format!("job {queued}")),
            "{args:?}: {line}"
        );
    }
    assert_eq!(delete_no_wait(&d, "keep"), queued, "deleting it again returns the same job");

    // Cancel the queued job: at once, with a note; the volume is available again.
    let out = d.evsctl_ok(&["job", "cancel", &queued.to_string()]);
    assert_eq!(out, format!("cancelled job {queued}\n"));
    let j = job(&d, queued);
    assert_eq!(state(&j), "cancelled", "{j}");
    assert!(j["started_unix"].is_null(), "a cancelled queued job never started: {j}");
    assert!(j["notes"].to_string().contains("cancelled while queued"), "{j}");
    let o = d.evsctl(&["job", "wait", &queued.to_string()]);
    assert_eq!(o.status.code(), Some(3), "`job wait` of a cancelled job\n{}", format_output(&o));
    assert!(stderr_line(&o).contains(&format!("job {queued} was cancelled")), "{}", format_output(&o));
    assert_eq!(d.show_volume("keep")["state"], "available");
    let uri = d.attach("keep");
    let mut c = NbdClient::connect(&uri).expect("connect to the kept volume");
    let got = c.read_all(0, kept.len() as u64, 4 << 20).expect("read");
    assert_bytes_eq(&got, &kept, 0, "the volume whose delete was cancelled");
    c.disconnect().expect("disconnect");
    d.evsctl_ok(&["volume", "extend", "keep", "--size", "128M"]);

    // The running one is past its point of no return: the cancel is refused, it finishes.
    let o = d.evsctl(&["job", "cancel", &busy.to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", format_output(&o));
    assert!(stderr_line(&o).contains("point of no return"), "{}", format_output(&o));
    let o = d.evsctl(&["--output", "json", "job", "wait", &busy.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", format_output(&o));
    let j: Value = serde_json::from_slice(&o.stdout).expect("`job wait --output json` prints the job");
    assert_eq!((state(&j), u64_field(&j, "id")), ("succeeded", busy), "{j}");
    let o = d.evsctl(&["job", "cancel", &busy.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_line(&o).contains("already succeeded"), "{}", format_output(&o));
    let o = d.evsctl(&["job", "show", "999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_line(&o).contains("job 999 not found"), "{}", format_output(&o));
    assert_eq!(d.list_volumes().len(), 1);
}

/// `volume delete` waits for its job by default and prints as before (table and JSON, the
/// JSON now with the job); a job that fails makes it exit 1 with the job's error, and
/// `job wait` of that job too.
#[test]
fn volume_delete_waits_and_reports_the_jobs_result() {
    let d = daemon(None, 64 * MIB);
    volume_with_data(&d, "plain", 4 * MIB, 3);
    assert_eq!(d.evsctl_ok(&["volume", "delete", "plain"]), "deleted volume plain\n");
    volume_with_data(&d, "js", 4 * MIB, 4);
    let v = d.evsctl_json(&["volume", "delete", "js"]);
    assert_eq!((v["name"].as_str(), v["deleted"].as_bool()), (Some("js"), Some(true)), "{v}");
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(u64_field(&v["job"], "id"), u64_field(&v, "job_id"));
    assert!(d.list_volumes().is_empty());

    // A real failure: the volume's data file is replaced by a directory, so destroying it
    // fails (after the catalog commit: the volume is gone, the job says why it failed).
    d.evsctl_ok(&["volume", "create", "doomed", "--size", "16M"]);
    let files = layer_files(&d);
    let data = files.iter().find(|f| f.ends_with(".data")).expect("the volume's data file");
    let path = d.data_dir().join("layers").join(data);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let o = d.evsctl(&["volume", "delete", "doomed"]);
    assert_eq!(o.status.code(), Some(1), "{}", format_output(&o));
    let line = stderr_line(&o);
    assert!(line.contains("deleting volume doomed") && line.contains("failed"), "{line}");
    assert!(line.contains("destroying its data failed"), "{line}");
    let id = jobs(&d).iter().map(|j| u64_field(j, "id")).max().unwrap();
    let o = d.evsctl(&["--output", "json", "job", "wait", &id.to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", format_output(&o));
    let j: Value = serde_json::from_slice(&o.stdout).expect("the failed job on stdout");
    assert_eq!(state(&j), "failed");
    assert!(j["error"].as_str().unwrap().contains("destroying its data failed"), "{j}");
    assert!(stderr_line(&o).contains(&format!("job {id} failed")), "{}", format_output(&o));
    std::fs::remove_dir(&path).unwrap();
}

/// SIGTERM or kill -9 while a delete job destroys data (and a second one waits behind it):
/// after the restart the interrupted job says it was resumed and succeeds, the queued one runs
/// after it, the data is gone exactly once (no files left but the neighbour's, whose data is
/// intact) and nothing failed.
fn restart_mid_delete(kill9: bool) {
    let mut d = daemon(Some(1), 4 * MIB);
    let kept = volume_with_data(&d, "neighbour", 8 * MIB, 9);
    volume_with_data(&d, "big", DATA, 5);
    volume_with_data(&d, "next", 4 * MIB, 6);
    let neighbour_files: Vec<String> = {
        let all = layer_files(&d);
        assert_eq!(all.len(), 6);
        // The neighbour was created first: its layer has the lowest id.
        all[..2].to_vec()
    };
    let big = delete_no_wait(&d, "big");
    let next = delete_no_wait(&d, "next");
    until_job(&d, big, "some data destroyed", |j| state(j) == "running" && u64_field(j, "bytes_done") > 0);
    assert_eq!(state(&job(&d, next)), "queued");
    if kill9 {
        d.kill9();
    } else {
        let status = d.terminate();
        assert!(status.success(), "SIGTERM with a job running: exit {status}\n{}", d.log());
        assert!(d.log().contains("evs-target stopped"), "{}", d.log());
    }
    d.restart();
    assert!(d.log().contains("jobs reloaded"), "{}", d.log());

    let o = d.evsctl(&["--output", "json", "job", "wait", &big.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", format_output(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(state(&j), "succeeded", "{j}");
    let notes = j["notes"].to_string();
    assert!(notes.contains("resumed after a daemon restart"), "{j}");
    assert!(notes.contains("already removed from the catalog"), "the resumed job found its commit done: {j}");
    let j = until_job(&d, next, "finished", |j| state(j) != "queued" && state(j) != "running");
    assert_eq!(state(&j), "succeeded", "{j}");
    assert!(!j["notes"].to_string().contains("resumed"), "the queued job was not interrupted: {j}");
    assert!(u64_field(&j, "started_unix") > 0);

    let vols = d.list_volumes();
    assert_eq!(vols.iter().map(name_field).collect::<Vec<_>>(), ["neighbour"], "{vols:?}");
    assert_eq!(layer_files(&d), neighbour_files, "only the neighbour's files are left");
    assert!(jobs(&d).iter().all(|j| state(j) == "succeeded"), "{:?}", jobs(&d));
    let uri = d.attach("neighbour");
    let mut c = NbdClient::connect(&uri).expect("connect");
    assert_bytes_eq(&c.read_all(0, kept.len() as u64, 4 << 20).unwrap(), &kept, 0, "the neighbour");
    c.disconnect().unwrap();
}

#[test]
fn sigterm_mid_delete_resumes_and_destroys_once() {
    restart_mid_delete(false);
}

#[test]
fn kill9_mid_delete_resumes_and_destroys_once() {
    restart_mid_delete(true);
}

/// `job wait` draws a progress bar only when stderr is a terminal (here a pty from
/// util-linux's `script`); without one it prints nothing while waiting.
#[test]
fn job_wait_draws_a_progress_bar_on_a_terminal_only() {
    let d = daemon(None, 4 * MIB);
    volume_with_data(&d, "bar", 8 * MIB, 7);
    let id = delete_no_wait(&d, "bar");
    let evsctl = evs_tests::bin_path("evsctl");
    let cmd = format!("{} --endpoint {} --token {} job wait {id}", evsctl.display(), d.endpoint(), d.token());
    let o = evs_tests::tools::output_with_timeout(
        std::process::Command::new(evs_tests::require_tool("script")).args(["-qec", &cmd, "/dev/null"]),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", format_output(&o));
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(tty.contains(&format!("job {id} (volume bar) running")), "no progress bar on the terminal:\n{tty}");
    assert!(tty.contains("MiB/8.00 MiB"), "the bar counts bytes:\n{tty}");
    assert!(tty.contains("state:     succeeded"), "{tty}");

    volume_with_data(&d, "quiet", 4 * MIB, 8);
    let id = delete_no_wait(&d, "quiet");
    let o = d.evsctl(&["job", "wait", &id.to_string()]);
    assert!(o.status.success(), "{}", format_output(&o));
    assert!(o.stderr.is_empty(), "`job wait` without a terminal printed on stderr\n{}", format_output(&o));
}
