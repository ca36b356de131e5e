//! A bad config file stops `evs-target` before it touches anything: exit status 2 and one
//! error naming the file, the line and the key (bad TOML, unknown keys, wrong types, values
//! out of range, invalid tier definitions).

use std::path::Path;
use std::time::Duration;

use evs_tests::tools::{format_output, output_with_timeout};
use evs_tests::util::{Rng, MIB};
use evs_tests::{bin_path, Daemon, DaemonOptions, NbdClient};

/// `(what, file text with the bad line marked by a trailing "# <-", things the message names)`.
fn cases() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    vec![
        ("unterminated string", "az = \"az1\"\n\nnbd_listen = \"127.0.0.1:1 # <-\n", &["nbd_listen"]),
        ("duplicate key", "az = \"a\"\naz = \"b\" # <-\n", &["az", "duplicate"]),
        ("unknown key", "az = \"a\"\nnbd_lisen = \"127.0.0.1:1\" # <-\n", &["nbd_lisen"]),
        ("unknown table", "[tier.gpssd] # <-\niops_max = 5\n", &["tier"]),
        ("wrong type", "az = \"a\"\nmax_snapshots_per_volume = \"many\" # <-\n", &["max_snapshots_per_volume"]),
        ("out of range", "\nmax_snapshots_per_volume = 0 # <-\n", &["max_snapshots_per_volume", "between 1 and"]),
        ("negative jobs", "max_running_jobs_per_tenant = -1 # <-\n", &["max_running_jobs_per_tenant"]),
        ("bad listen address", "api_listen = \"not-an-address\" # <-\n", &["api_listen"]),
        ("bad io backend", "io_backend = \"magic\" # <-\n", &["io_backend", "magic"]),
        ("bad nbd_tls", "nbd_tls = \"maybe\" # <-\n", &["nbd_tls", "maybe"]),
        ("new tier without its limits", "[tiers.turbo] # <-\niops_max = 5\n", &["tiers", "turbo", "mbps_max"]),
        ("bad tier name", "[tiers.Turbo] # <-\niops_max = 5\nmbps_max = 5\n", &["tiers", "Turbo", "lowercase"]),
        ("limits for unlimited", "[tiers.unlimited] # <-\niops_max = 5\nmbps_max = 5\n", &["unlimited"]),
        ("unknown tier key", "[tiers.gpssd]\niops = 5 # <-\n", &["iops"]),
        ("tier value of the wrong type", "[tiers.gpssd]\niops_max = \"fast\" # <-\n", &["iops_max"]),
        ("negative tier value", "[tiers.gpssd]\niops_baseline = 100\niops_max = -5 # <-\n", &["iops_max"]),
        ("infinite tier value", "[tiers.high]\nmbps_max = inf # <-\n", &["mbps_max"]),
        ("zero tier limit", "[tiers.essd]\nmbps_max = 10\niops_max = 0 # <-\n", &["iops_max", "essd", "zero"]),
        ("negative burst seconds", "[tiers.common]\nburst_seconds = -1 # <-\n", &["burst_seconds"]),
        ("bad quota size", "[quotas]\nmax_capacity_per_tenant = \"lots\" # <-\n", &["max_capacity_per_tenant"]),
        ("negative quota", "[quotas]\nmax_volumes_per_tenant = -3 # <-\n", &["max_volumes_per_tenant", "negative"]),
        ("chunk size not a power of two", "[backups]\nchunk_size = 3000000 # <-\n", &["chunk_size", "power of two"]),
        ("unknown backups key", "[backups]\nchunks = 1 # <-\n", &["chunks"]),
        ("bad delete rate", "delete_bytes_per_second = 10 # <-\n", &["delete_bytes_per_second"]),
        // What the backup engine would refuse when it opens the store, refused at start.
        ("s3 store without region", "backup_store = \"s3://evs-b/p\" # <-\n", &["backup_store", "needs region"]),
        (
            "obs store with a region",
            "backup_store = \"obs://evs-b?endpoint=https://obs.example&region=r\" # <-\n",
            &["backup_store", "takes no region"],
        ),
    ]
}

#[test]
fn a_bad_config_file_names_its_file_line_and_key_and_the_daemon_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut failures = Vec::new();
    for (i, (what, text, needles)) in cases().into_iter().enumerate() {
        let file = format!("bad-{i}.toml");
        std::fs::write(root.join(&file), text).unwrap();
        let line = text.lines().position(|l| l.ends_with("# <-")).expect("a marked line") + 1;
        let data = format!("data-{i}");
        let mut cmd = std::process::Command::new(bin_path("evs-target"));
        cmd.current_dir(root)
            .args(["--config", &file, "--data-dir", &data])
            // Ports no test uses: the daemon must not get as far as binding them anyway.
            .args(["--nbd-listen", "127.0.0.1:1", "--api-listen", "127.0.0.1:1", "--metrics-listen", "127.0.0.1:1"])
            .env("NO_COLOR", "1");
        let out = output_with_timeout(&mut cmd, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        let at = format!("{file}:{line}");
        if out.status.code() != Some(2) {
            failures.push(format!("{what}: exit status {:?}, expected 2\n{}", out.status.code(), format_output(&out)));
        } else if !err.contains(&at) {
            failures.push(format!("{what}: the message does not name {at}: {err}"));
        } else if let Some(n) = needles.iter().find(|n| !err.contains(*n)) {
            failures.push(format!("{what}: the message does not name {n:?}: {err}"));
        } else if err.lines().filter(|l| !l.trim().is_empty()).count() != 1 {
            failures.push(format!("{what}: more than one line on stderr: {err}"));
        }
        if Path::new(&root.join(&data)).exists() {
            failures.push(format!("{what}: the data directory was created before the config was checked"));
        }
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

/// Bad flags get one line naming the flag (SPEC.md), exit status 2, and nothing is created.
#[test]
fn a_bad_flag_gets_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["--bogus"], "--bogus"),
        (vec!["--io-backend", "magic"], "magic"),
        (vec!["--nbd-tls", "maybe"], "maybe"),
        (vec!["--data-dir"], "--data-dir"),
        (vec!["--backup-store", "obs://evs-b"], "needs endpoint"),
    ] {
        let mut cmd = std::process::Command::new(bin_path("evs-target"));
        cmd.current_dir(dir.path()).args(&args).env("NO_COLOR", "1");
        let out = output_with_timeout(&mut cmd, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}\n{}", format_output(&out));
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line\n{err}");
        assert!(err.starts_with("evs-target: error: ") && err.contains(needle), "{args:?}: {err}");
    }
    assert!(!dir.path().join("evs-data").exists(), "a bad flag created the data directory");
}

const GOLD: &str = "[tiers.gold]\niops_max = 800\nmbps_max = 35\n";

/// A tier the config file adds is a tier like the built-in ones (create, set-tier, the limits
/// `volume show` prints, the list in errors); taking it out of the file while a volume has it
/// stops the daemon at start-up, naming the volume and the tier, and changes nothing.
#[test]
fn a_tier_the_config_adds_serves_volumes_and_cannot_vanish_under_them() {
    let mut d = Daemon::start_with(DaemonOptions { config: Some(GOLD.into()), ..Default::default() });
    d.evsctl_ok(&["volume", "create", "v", "--size", "10G", "--tier", "gold"]);
    let q = &d.show_volume("v")["qos"];
    // Flat: the baseline is the max, no per-GiB growth, no burst.
    assert_eq!((q["iops_limit"].as_f64(), q["bandwidth_limit"].as_f64()), (Some(800.0), Some(35e6)), "{q}");
    assert_eq!(q["iops_burst_capacity"].as_f64(), Some(0.0), "{q}");
    d.evsctl_ok(&["volume", "create", "w", "--size", "1G"]);
    d.evsctl_ok(&["volume", "set-tier", "w", "--tier", "gold"]);
    assert_eq!(d.show_volume("w")["tier"], "gold");
    let out = d.evsctl(&["volume", "create", "x", "--size", "1G", "--tier", "platinum"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("essd, gold, unlimited"), "{}", format_output(&out));

    let mut rng = Rng::from_env_or_time("custom tier");
    let data = rng.bytes(MIB as usize);
    let mut c = NbdClient::connect(&d.attach("v")).expect("connect");
    c.write(0, &data).expect("write");
    c.flush().expect("flush");
    c.disconnect().expect("disconnect");
    // What the served volume's limiter holds (the data path's), not only what a tier computes.
    assert_eq!(d.show_volume("v")["qos"]["iops_limit"].as_f64(), Some(800.0));
    assert!(d.terminate().success());

    // Without [tiers.gold] the volumes would run unlimited: refused.
    std::fs::write(d.config_path(), "az = \"az1\"\n").unwrap();
    let out = output_with_timeout(&mut d.command(), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", format_output(&out));
    assert!(
        err.contains("tier \"gold\"") && err.contains("volume \"") && err.contains("[tiers.gold]"),
        "the error names neither the volume nor the tier: {err}"
    );

    // With it back, all is as it was.
    std::fs::write(d.config_path(), GOLD).unwrap();
    d.restart();
    for v in ["v", "w"] {
        assert_eq!(d.show_volume(v)["tier"], "gold", "{v}");
    }
    let mut c = NbdClient::connect(&d.attach("v")).expect("connect");
    assert!(c.read_all(0, MIB, 1 << 20).expect("read") == data, "volume v after the refused start");
    c.disconnect().expect("disconnect");
}
