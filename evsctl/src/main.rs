//! `evsctl`: parses the command line and runs it; see the library for the commands.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use evsctl::cli::{usage_error_line, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version (and the help shown for a missing subcommand) as clap prints them.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
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
