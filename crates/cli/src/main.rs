//! `serval`: the command-line tool of Serval in Rust.
//!
//! Every subcommand reports bad input as one line on stderr and exits with status 2; other
//! failures exit with status 1.
#![deny(unsafe_code)]

mod net;

use std::net::SocketAddr;
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
    /// Serve a service: print what each connection sends (or echo it back with --echo).
    ///
    /// Keeps accepting connections until interrupted. Without --echo, each accepted stream's
    /// bytes go to stdout; the listener sends nothing and closes its direction when the
    /// client's ends. With --echo, everything is sent back, then the listener closes.
    Listen {
        /// The service: a name, `NAME/*` for a whole domain, a hex ID or `HEX/LEN`.
        service: String,
        /// Local UDP address to bind; repeat for several (IPv4 and IPv6).
        #[arg(
            long = "bind",
            value_name = "ADDR",
            env = "SERVAL_BIND",
            value_delimiter = ',',
            default_value = "0.0.0.0:54324"
        )]
        bind: Vec<SocketAddr>,
        /// Echo each stream back instead of printing it.
        #[arg(long)]
        echo: bool,
    },
    /// Connect to a service by name, send stdin, print what comes back.
    ///
    /// Exits 0 once both directions have closed.
    Cat {
        /// The service name or hex ID.
        service: String,
        /// Next hop for the SYN: a service router, or the instance itself.
        #[arg(long, value_name = "ADDR", env = "SERVAL_VIA")]
        via: SocketAddr,
        /// Local UDP address to bind (default: any address of the next hop's family).
        #[arg(long = "bind", value_name = "ADDR", env = "SERVAL_BIND")]
        bind: Option<SocketAddr>,
    },
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
        Command::Listen {
            service,
            bind,
            echo,
        } => match ServicePrefix::parse(&service) {
            Ok(prefix) => run(net::listen(&service, prefix, bind, echo)),
            Err(e) => usage(&e),
        },
        Command::Cat { service, via, bind } => match ServiceId::parse(&service) {
            Ok(id) => run(net::cat(&service, id, via, bind)),
            Err(e) => usage(&e),
        },
    }
}

/// Reports bad input as one line, exit status 2.
fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// Runs a network command on a tokio runtime; a failure is one line on stderr, exit status 1.
fn run(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
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
