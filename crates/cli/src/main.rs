//! `serval`: the command-line tool of Serval in Rust.
//!
//! Every subcommand reports bad input as one line on stderr and exits with status 2; other
//! failures exit with status 1.
#![deny(unsafe_code)]

/// `eprintln!` that never panics: a daemon whose stderr was closed goes on serving.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod demo;
mod expose_standby;
mod handover;
mod instance;
mod keygen;
mod net;
mod ping;
mod router;
mod serve;
mod sys;
mod table;
mod translate;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// Keeps accepting connections until SIGINT/SIGTERM; then withdraws the service at once
    /// and lets open connections finish (up to 10 s, or until a second signal). Without
    /// --echo, each accepted stream's bytes go to stdout; the listener sends nothing and closes
    /// its direction when the client's ends. With --echo, everything is sent back, then the
    /// listener closes.
    Listen {
        /// The service: a name, `NAME/*` for a whole domain, a hex ID or `HEX/LEN`.
        service: String,
        #[command(flatten)]
        instance: net::InstanceArgs,
        /// A --bind address whose paths are backups: this instance sends on them only while
        /// no other path of the connection works. Repeatable. (With several --bind
        /// addresses, the instance tells each client its other addresses, and a client with
        /// several joins a path to them.)
        #[arg(long, value_name = "ADDR")]
        backup: Vec<std::net::SocketAddr>,
        /// How a connection with several paths spreads what this instance sends:
        /// lowest-rtt (default) or redundant (every packet of data on every path with room).
        #[arg(long, value_name = "NAME")]
        scheduler: Option<serval::Scheduler>,
        /// Echo each stream back instead of printing it.
        #[arg(long)]
        echo: bool,
        /// Send each line back numbered (`1 first line`, `2 …`): the stateful example
        /// service, whose count continues when a stream moves to another instance
        /// (`serval migrate`).
        #[arg(long, conflicts_with = "echo")]
        number: bool,
        /// On SIGINT/SIGTERM, move the open streams to the instance whose admin address is
        /// ADMIN (as `serval migrate` would) instead of waiting for them to finish: a restart
        /// or a host's maintenance drops nothing. Needs --admin and --key.
        #[arg(long, value_name = "ADMIN", requires_all = ["admin", "key"])]
        move_on_stop: Option<std::net::SocketAddr>,
        /// Routerless mode: also answer SYNs for the service multicast on the local network
        /// (group 239.255.86.76), so clients find it by name with no router (`cat --discover`).
        /// Bind a specific address to choose the interface.
        #[arg(long)]
        discover: bool,
        /// UDP port of the discovery group (with --discover).
        #[arg(long, value_name = "PORT", env = "SERVAL_DISCOVER_PORT", default_value_t = serval::DEFAULT_DISCOVERY_PORT)]
        discover_port: u16,
        /// Lease to ask the router for, in milliseconds (default 3000; the router may clamp
        /// it). Hidden: for `serval demo` and tests, which want quick failover.
        #[arg(long, value_name = "MS", hide = true, value_parser = clap::value_parser!(u64).range(1..))]
        lease_ms: Option<u64>,
        /// Exit (SIGKILL, no unregistering) when the parent process dies. Hidden: for the
        /// demo's instances, so that a demo killed outright leaves none behind.
        #[arg(long, hide = true)]
        exit_with_parent: bool,
    },
    /// Connect to a service by name, send stdin, print what comes back.
    ///
    /// Exits 0 once both directions have closed.
    Cat {
        /// The service name or hex ID.
        service: String,
        #[command(flatten)]
        hop: net::HopArgs,
        /// Give up connecting after this many seconds without an answer (a next hop where
        /// nothing listens, or an instance that died before its lease ran out). 0 waits for
        /// the SYN's whole retransmission schedule (about two minutes, like TCP).
        #[arg(long, value_name = "SECS", default_value_t = 10.0)]
        connect_timeout: f64,
        /// Ask the server to move its end of the stream to the instance of the service whose
        /// migration agent is at AGENT (the client's choice of instance; `serval listen
        /// --admin` prints its agent). The stream goes on; one line on stderr says where it
        /// moved, or why not (cat then exits 1 at its end).
        #[arg(long, value_name = "AGENT")]
        move_to: Option<std::net::SocketAddr>,
        /// With --move-to: ask once this many bytes have come back.
        #[arg(long, value_name = "BYTES", default_value_t = 0, requires = "move_to")]
        move_after: u64,
    },
    /// Translator: accept ordinary TCP connections and carry each to a service by name.
    ///
    /// Each accepted TCP connection becomes one Serval stream to SERVICE; bytes, half-close
    /// and resets pass both ways. Serves until interrupted.
    Proxy(translate::ProxyArgs),
    /// Translator: register a service and carry each incoming stream to a TCP backend.
    ///
    /// Each accepted Serval stream becomes one TCP connection to --to; bytes, half-close and
    /// resets pass both ways. Serves until interrupted, or until a new `serval expose
    /// --take-over PATH` has taken every live connection over from its --handover-socket PATH
    /// (an upgrade or restart with nothing dropped; it then exits 0).
    Expose(translate::ExposeArgs),
    /// Probe a service by name with request/response echoes, like ping.
    ///
    /// Each probe is a new connection resolved by name, so the output shows which instance
    /// answered each one. Instances answer with `serval listen --echo` or `serval expose`.
    Ping(ping::PingArgs),
    /// Measure throughput and latency to a service by name.
    Bench(bench::BenchArgs),
    /// Show Serval working on loopback in one command: a router, instances and clients.
    ///
    /// Needs no root and no external service; exits 0 only if every step held.
    Demo(demo::DemoArgs),
    /// Run a service router: forward connections by name to the instances that register.
    ///
    /// Prints one line `READY ADDR…` to stdout once its sockets are bound, then serves until
    /// interrupted. Logs go to stderr (RUST_LOG sets the level; default info).
    Router(router::RouterArgs),
    /// Show a router's service table (one line per target) or edit its static rules, through
    /// its admin address.
    ///
    /// `serval table --admin ADDR` lists; `serval table --admin ADDR add PREFIX forward
    /// IP:PORT [--weight N] [--priority N]` (or `delay`, `drop`) adds a rule; `del` removes one.
    /// `delayed` lists the SYNs DELAY rules hold; `release ID resolve|drop` answers one.
    Table(table::TableArgs),
    /// List an instance's live flows, one per line, through its admin address.
    ///
    /// Each line: flowID, service, role, local and peer locator, state, stream bytes sent and
    /// received, smoothed RTT, and how many times the flow's server end moved between hosts.
    /// A flow on several paths (multipath: several --bind addresses) is followed by a line for
    /// each path: its ID, local and peer locator, state (active, backup, failed or joining),
    /// bytes sent on it (packets), RTT and congestion window.
    Flows {
        /// The instance's admin address (`serval listen … --admin ADDR`).
        #[arg(long, value_name = "ADDR")]
        admin: std::net::SocketAddr,
    },
    /// Move live flows from one instance to another, by their admin addresses.
    ///
    /// The application at FROM hands each stream over with its state; the snapshot travels
    /// encrypted to TO's migration agent (both must hold the service's --key); TO re-binds the
    /// flow toward the client, which sees only a locator change. Prints each flow's phase
    /// times; exits 0 only when every flow runs at TO.
    Migrate {
        /// The admin address of the instance the flows leave.
        #[arg(long, value_name = "FROM")]
        admin: std::net::SocketAddr,
        /// The admin address of the instance they move to.
        #[arg(long, value_name = "TO")]
        to: std::net::SocketAddr,
        /// A flow to move (its flowID as `serval flows` prints it); repeat for several.
        /// Without any (and without --share), every flow FROM serves moves.
        #[arg(long = "flow", value_name = "ID")]
        flows: Vec<String>,
        /// Move this share of the flows FROM serves (0 < F ≤ 1, rounded up, the first that
        /// `serval flows` lists): scale-out, when a new instance TO joins and should take
        /// part of the load.
        #[arg(long, value_name = "F", conflicts_with = "flows")]
        share: Option<f64>,
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
        /// Print the self-certifying serviceID of each NAME and this key instead: the first
        /// 128 bits of NAME's ID, then 128 bits committing to the key. PUBFILE holds the
        /// public key line `serval keygen` printed (or the private key file).
        #[arg(long, value_name = "PUBFILE")]
        key: Option<std::path::PathBuf>,
    },
    /// Write a new Ed25519 private key to FILE (mode 0600; never over an existing file) and
    /// print its public key line, for `serval router --authorize` and `listen --key`.
    Keygen {
        /// Where to write the private key.
        file: std::path::PathBuf,
    },
}

/// Exit status for bad input (flags, names, config), as for clap's own usage errors.
pub(crate) const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // Keep the matches: `serval router --config` needs to know which values were given.
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // The router logs at info by default; every other command only when RUST_LOG asks (its
    // output is its job's, and tests read it).
    if std::env::var_os("RUST_LOG").is_some() && !matches!(cli.command, Command::Router(_)) {
        init_logs("warn");
    }
    match cli.command {
        Command::Id { names, key: None } => id(&names),
        Command::Id {
            names,
            key: Some(pubfile),
        } => keygen::self_certifying(&pubfile, &names),
        Command::Keygen { file } => keygen::keygen(&file),
        Command::Listen {
            service,
            instance,
            backup,
            scheduler,
            echo,
            number,
            move_on_stop,
            discover,
            discover_port,
            lease_ms,
            exit_with_parent,
        } => match ServicePrefix::parse(&service) {
            Ok(prefix) => {
                let locals = match net::Locals::new(&instance.bind, &backup, scheduler) {
                    Ok(l) => l,
                    Err(e) => return usage(&e),
                };
                if exit_with_parent && let Err(e) = die_with_parent() {
                    return usage(&e);
                }
                let opts = net::ListenOptions {
                    mode: if number {
                        serve::Mode::Number
                    } else if echo {
                        serve::Mode::Echo
                    } else {
                        serve::Mode::Print
                    },
                    discover: discover.then(|| serval::DiscoveryConfig {
                        port: discover_port,
                        ..serval::DiscoveryConfig::default()
                    }),
                    lease: lease_ms.map(std::time::Duration::from_millis),
                    move_on_stop,
                    locals,
                };
                run(net::listen(&service, prefix, instance, opts))
            }
            Err(e) => usage(&e),
        },
        Command::Cat {
            service,
            hop,
            connect_timeout,
            move_to,
            move_after,
        } => match (
            ServiceId::parse(&service),
            Duration::try_from_secs_f64(connect_timeout),
            hop.locals(),
        ) {
            (Ok(id), Ok(limit), Ok(locals)) => {
                let limit = (!limit.is_zero()).then_some(limit);
                let move_to = move_to.map(|to| net::MoveTo {
                    to,
                    after: move_after,
                });
                run(net::cat(&service, id, &hop, &locals, limit, move_to))
            }
            (Err(e), _, _) => usage(&e),
            (_, Err(_), _) => usage(&format!(
                "--connect-timeout must be a number of seconds >= 0, not {connect_timeout}"
            )),
            (_, _, Err(e)) => usage(&e),
        },
        Command::Proxy(args) => translate::proxy(args),
        Command::Expose(args) => translate::expose(args),
        Command::Ping(args) => ping::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Table(args) => table::run(args),
        Command::Flows { admin } => instance::flows(admin),
        Command::Migrate {
            admin,
            to,
            flows,
            share,
        } => instance::migrate(admin, to, &flows, share),
        Command::Router(mut args) => {
            let sub = matches.subcommand_matches("router");
            if let Some(Err(e)) = sub.map(|m| router::apply_config_file(&mut args, m)) {
                return usage(&e);
            }
            if let Err(e) = router::validate(&args) {
                return usage(&e);
            }
            init_logs("info");
            match run_router(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(router::Failure::Usage(e)) => usage(&e),
                Err(router::Failure::Runtime(e)) => {
                    note!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Asks the kernel to SIGKILL this process when its parent dies (`PR_SET_PDEATHSIG`), then
/// checks the parent did not die before that took effect.
fn die_with_parent() -> Result<(), String> {
    let parent = nix::unistd::getppid();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("--exit-with-parent: {e}"))?;
    if nix::unistd::getppid() != parent {
        return Err("--exit-with-parent: the parent process is already gone".into());
    }
    Ok(())
}

/// Logs (tracing) to stderr, at `default` unless RUST_LOG says otherwise.
pub(crate) fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Stderr for the logs, dropping what cannot be written: tracing-subscriber reports a failed
/// write with `eprintln!`, which panics when stderr is closed.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Runs the router on its own runtime.
fn run_router(args: router::RouterArgs) -> Result<(), router::Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| router::Failure::Runtime(format!("cannot start the runtime: {e}")))?;
    rt.block_on(router::run(args))
}

/// Reports a failure as one line, exit status 1.
pub(crate) fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    note!("error: {e}");
    ExitCode::FAILURE
}

/// Reports bad input as one line, exit status 2.
pub(crate) fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    note!("error: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// Runs a network command on a tokio runtime; a failure is one line on stderr, exit status 1.
pub(crate) fn run(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let code = block_on(&rt, fut);
    // A read of stdin blocked in the runtime's thread pool cannot be cancelled: do not wait
    // for it (`cat` ending on a dead connection while its input is still open).
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

/// How long a finished command waits for its runtime's blocking work (reads of stdin).
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(200);

/// [`run`] on a single-threaded runtime: every task (sockets, timers, the endpoint's driver)
/// on one thread, so handing work from one task to another never wakes another thread.
pub(crate) fn run_single(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => block_on(&rt, fut),
        Err(e) => {
            note!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn block_on(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    // Daemons serve for days: give the memory of finished connections back to the system.
    rt.spawn(sys::trim_heap_periodically());
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The tokio runtime of a network command (two workers); `None`, with the reason printed,
/// if it cannot be started.
pub(crate) fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            note!("error: cannot start the runtime: {e}");
            None
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
            note!("{} (see 'serval --help')", message.join(" "));
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
                note!("error: {e}");
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
