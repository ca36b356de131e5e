//! `evsctl`: parses the command line and runs it; see the library for the commands.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use evsctl::cli::{missing_subcommand_line, usage_error_line, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version as clap prints them.
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        // A usage error like any other (SPEC.md: one line), not clap's whole help.
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("{}", missing_subcommand_line(std::env::args()));
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{}", usage_error_line(&e));
            return ExitCode::from(2);
        }
    };
    match evsctl::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(evsctl::wait::exit_code(&e))
        }
    }
}
