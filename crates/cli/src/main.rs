//! `serval`: the command-line tool of Serval in Rust.
//!
//! Every subcommand reports bad input as one line on stderr and exits with status 2; other
//! failures exit with status 1.
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serval_wire::{ServiceId, ServicePrefix};

/// Serval: connect to services by name, not by host and port.
#[derive(Debug, Parser)]
#[command(name = "serval", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the serviceID of a name, or the prefix of a domain.
    ///
    /// `web.example.com` prints the 64-hex-digit serviceID; `example.com/*` prints the prefix that
    /// covers every name under example.com, as HEX/LEN; `*` prints the default prefix. Hex IDs
    /// and HEX/LEN prefixes are accepted too and printed in canonical form.
    Id {
        /// Names, domains (`NAME/*`), hex IDs or `HEX/LEN` prefixes.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

/// Exit status for bad input (flags, names, config), as for clap's own usage errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Id { names } => id(&names),
    }
}

/// Prints `--help`/`--version` as clap does; any other parse error as one line, exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            // clap's message is a paragraph, then usage; keep the paragraph, on one line.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{} (see 'serval --help')", message.join(" "));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn id(names: &[String]) -> ExitCode {
    // Validate everything first, so that bad input prints nothing but the error.
    let mut lines = Vec::with_capacity(names.len());
    for name in names {
        match id_line(name) {
            Ok(line) => lines.push(line),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    for line in lines {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

/// One name, domain, ID or prefix in canonical text form.
fn id_line(text: &str) -> Result<String, serval_wire::IdError> {
    if text == "*" || text.contains('/') {
        Ok(ServicePrefix::parse(text)?.to_string())
    } else {
        Ok(ServiceId::parse(text)?.to_string())
    }
}
