//! `evs-target`: parses the flags, resolves the configuration, runs the daemon.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use evs_target::config::{Config, Flags};
use evs_target::daemon;

fn main() -> ExitCode {
    // Test builds: the crash points named in FAILPOINTS (see evs_snapshot::crash_point!).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            // One line, as every other start-up error (SPEC.md), instead of clap's usage block.
            let rendered = e.render().to_string();
            let what: Vec<&str> = rendered.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            eprintln!("evs-target: error: {} (see --help)", what.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
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
