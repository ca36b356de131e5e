//! `evs-target`: parses the flags, resolves the configuration, runs the daemon.

use std::process::ExitCode;

use clap::Parser;
use evs_target::config::{Config, Flags};
use evs_target::daemon;

fn main() -> ExitCode {
    // Test builds: the crash points named in FAILPOINTS (see evs_snapshot::crash_point!).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let flags = Flags::parse();
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("evs-target: error: {e}");
            // Like clap's usage errors: the invocation (or its config file) is wrong.
            return ExitCode::from(2);
        }
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evs-target: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
