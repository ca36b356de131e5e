//! `evsctl`: parses the command line and runs it; see the library for the commands.

use std::process::ExitCode;

use clap::Parser;
use evsctl::cli::Cli;

fn main() -> ExitCode {
    // clap exits with 2 on usage errors (and 0 for --help/--version) by itself.
    let cli = Cli::parse();
    match evsctl::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(evsctl::wait::exit_code(&e))
        }
    }
}
