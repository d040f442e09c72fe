//! `serval router`: a service router on this host.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;
use serval::ServicePrefix;
use serval_registry::{Registry, RegistryError};
use serval_router::{Policy, Router, RouterConfig};

/// Flags of `serval router`.
#[derive(Debug, Args)]
pub struct RouterArgs {
    /// UDP address to listen on; repeat for several (IPv4 and IPv6).
    #[arg(
        long = "listen",
        value_name = "ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:54324"
    )]
    listen: Vec<SocketAddr>,
    /// Where registrations are kept: `memory://` (this process) or
    /// `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]` (shared by routers).
    #[arg(
        long,
        value_name = "URL",
        env = "SERVAL_REGISTRY",
        default_value = "memory://"
    )]
    registry: String,
    /// With an etcd registry: a local file the registrations are saved to and started from.
    /// A restart loads it and catches up by watching etcd from the saved revision instead of
    /// listing everything (it lists only if etcd no longer has that history).
    #[arg(long, value_name = "FILE", env = "SERVAL_REGISTRY_CACHE")]
    registry_cache: Option<std::path::PathBuf>,
    /// Accept registrations only for names under this prefix (a name, `NAME/*`, a hex ID,
    /// `HEX/LEN` or `*`); repeat for several. Default: every prefix.
    #[arg(long = "accept", value_name = "PREFIX")]
    accept: Vec<String>,
    /// Accept registrations under PREFIX (a name, `NAME/*`, a hex ID or `HEX/LEN`) only when
    /// signed by PUBKEY (the line `serval keygen` printed); split at the first `=`. Repeat
    /// for several. Prefixes without one stay open. With etcd, every router on it enforces
    /// every router's authorisations.
    #[arg(long = "authorize", value_name = "PREFIX=PUBKEY", value_parser = parse_authorize)]
    authorize: Vec<(ServicePrefix, serval_router::keys::PublicKey)>,
    /// Shortest lease granted to a registration, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    min_ttl_ms: u64,
    /// Longest lease granted to a registration, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_ttl_ms: u64,
    /// Most registrations held; new ones beyond it are rejected.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    max_registrations: usize,
    /// TCP address of the HTTP admin API: the table as JSON (`/table`), Prometheus metrics
    /// (`/metrics`), `/health`, and rule edits (`serval table --admin ADDR`). Off by default.
    #[arg(long, value_name = "ADDR", env = "SERVAL_ADMIN")]
    admin: Option<SocketAddr>,
    /// A parent router (hierarchy): this router registers the prefixes it serves there
    /// (`--announce`, by default its `--accept` prefixes) and sends it SYNs for names it has
    /// no rule for. Give it several times (or comma-separated) for parents sharing one
    /// registry: the announcements move to the next when one stops answering.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SERVAL_PARENT",
        value_delimiter = ','
    )]
    parent: Vec<SocketAddr>,
    /// A prefix this router serves and announces to its `--parent` (same syntax as
    /// `--accept`); repeat for several. SYNs for names under it that no instance serves are
    /// NACKed here. Default: the `--accept` prefixes.
    #[arg(long = "announce", value_name = "PREFIX")]
    announce: Vec<String>,
    /// Most SYNs DELAY rules hold at once (waiting for `serval table release`); more are
    /// dropped and counted.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    delay_queue: u64,
    /// How long a SYN held by a DELAY rule waits for a verdict before its client is NACKed,
    /// in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    delay_timeout_ms: u64,
    /// SYNs a second each client address may send through this router (bursts of twice as
    /// many); more are dropped and counted (`router_syns_rate_limited`). 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    syn_rate: u32,
    /// Keep an index of the service table by each ID's first 64 bits: lookups in tables of
    /// about a million rules 2–3× faster, for up to about 65 bytes more memory per rule.
    #[arg(long)]
    anchor_index: bool,
    /// A TOML file whose keys are these flags' long names (`listen = ["0.0.0.0:54324"]`,
    /// `registry = "etcd://…"`, `min-ttl-ms = 2000`, …). Flags and environment variables given
    /// as well take precedence over it.
    #[arg(long, value_name = "FILE", env = "SERVAL_ROUTER_CONFIG")]
    config: Option<std::path::PathBuf>,
}

/// The `--config` file: every key is optional and mirrors a flag; an unknown key is an error
/// (a typo must not be silently ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RouterFile {
    listen: Option<Vec<SocketAddr>>,
    registry: Option<String>,
    registry_cache: Option<std::path::PathBuf>,
    accept: Option<Vec<String>>,
    authorize: Option<Vec<String>>,
    min_ttl_ms: Option<u64>,
    max_ttl_ms: Option<u64>,
    max_registrations: Option<usize>,
    admin: Option<SocketAddr>,
    parent: Option<OneOrMany>,
    announce: Option<Vec<String>>,
    delay_queue: Option<u64>,
    delay_timeout_ms: Option<u64>,
    syn_rate: Option<u32>,
    anchor_index: Option<bool>,
}

/// `parent = "ADDR"` or `parent = ["ADDR", …]` in the config file.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(SocketAddr),
    Many(Vec<SocketAddr>),
}

/// Reads `--config` (if given) into `args`: a key of the file sets a value that was neither
/// given as a flag nor in the environment (`matches` tells which). A bad file is one line.
pub fn apply_config_file(args: &mut RouterArgs, matches: &ArgMatches) -> Result<(), String> {
    let Some(path) = args.config.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?;
    let file: RouterFile = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1);
        let at = line.map_or(String::new(), |l| format!(" line {l}:"));
        format!("--config {}:{at} {}", path.display(), e.message().trim())
    })?;
    // Only values that came from a default may be replaced.
    let unset = |id: &str| {
        !matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let positive = |key: &str, v: u64| -> Result<u64, String> {
        if v == 0 {
            Err(format!(
                "--config {}: {key} must be at least 1",
                path.display()
            ))
        } else {
            Ok(v)
        }
    };
    if let Some(v) = file.listen.filter(|_| unset("listen")) {
        args.listen = v;
    }
    if let Some(v) = file.registry.filter(|_| unset("registry")) {
        args.registry = v;
    }
    if let Some(v) = file.registry_cache.filter(|_| unset("registry_cache")) {
        args.registry_cache = Some(v);
    }
    if let Some(v) = file.accept.filter(|_| unset("accept")) {
        args.accept = v;
    }
    if let Some(v) = file.authorize.filter(|_| unset("authorize")) {
        args.authorize = v
            .iter()
            .map(|a| {
                parse_authorize(a)
                    .map_err(|e| format!("--config {}: authorize {a:?}: {e}", path.display()))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(v) = file.min_ttl_ms.filter(|_| unset("min_ttl_ms")) {
        args.min_ttl_ms = positive("min-ttl-ms", v)?;
    }
    if let Some(v) = file.max_ttl_ms.filter(|_| unset("max_ttl_ms")) {
        args.max_ttl_ms = positive("max-ttl-ms", v)?;
    }
    if let Some(v) = file
        .max_registrations
        .filter(|_| unset("max_registrations"))
    {
        args.max_registrations = v;
    }
    if let Some(v) = file.admin.filter(|_| unset("admin")) {
        args.admin = Some(v);
    }
    if let Some(v) = file.parent.filter(|_| unset("parent")) {
        args.parent = match v {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(v) => v,
        };
    }
    if let Some(v) = file.announce.filter(|_| unset("announce")) {
        args.announce = v;
    }
    if let Some(v) = file.delay_queue.filter(|_| unset("delay_queue")) {
        args.delay_queue = positive("delay-queue", v)?;
    }
    if let Some(v) = file.delay_timeout_ms.filter(|_| unset("delay_timeout_ms")) {
        args.delay_timeout_ms = positive("delay-timeout-ms", v)?;
    }
    if let Some(v) = file.anchor_index.filter(|_| unset("anchor_index")) {
        args.anchor_index = v;
    }
    if let Some(v) = file.syn_rate.filter(|_| unset("syn_rate")) {
        args.syn_rate = v;
    }
    Ok(())
}

/// One `--authorize PREFIX=PUBKEY`.
fn parse_authorize(text: &str) -> Result<(ServicePrefix, serval_router::keys::PublicKey), String> {
    let (prefix, key) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not PREFIX=PUBKEY"))?;
    let prefix = ServicePrefix::parse(prefix).map_err(|e| format!("prefix {prefix:?}: {e}"))?;
    let key = serval_router::keys::PublicKey::parse_line(key).map_err(|e| e.to_string())?;
    Ok((prefix, key))
}

/// The `--announce` prefixes.
fn announce(args: &RouterArgs) -> Result<Vec<ServicePrefix>, String> {
    args.announce
        .iter()
        .map(|text| {
            ServicePrefix::parse(text).map_err(|e| format!("invalid --announce {text:?}: {e}"))
        })
        .collect()
}

/// The router configuration the flags describe.
fn config(args: &RouterArgs, policy: Policy) -> Result<RouterConfig, String> {
    let mut config = RouterConfig::new(args.listen.clone());
    config.policy = policy;
    config.authorize = args.authorize.clone();
    config.anchor_index = args.anchor_index;
    config.endpoint.delay_queue = usize::try_from(args.delay_queue).unwrap_or(usize::MAX);
    config.endpoint.delay_timeout = Duration::from_millis(args.delay_timeout_ms);
    config.endpoint.syn_rate_limit = (args.syn_rate > 0).then(|| serval::SynRateLimit {
        rate: args.syn_rate,
        burst: args.syn_rate.saturating_mul(2),
        ..serval::SynRateLimit::default()
    });
    let announce = announce(args)?;
    if args.parent.is_empty() {
        config.announce = announce;
        Ok(config)
    } else {
        config
            .with_parents(args.parent.clone(), announce)
            .map_err(|e| e.to_string())
    }
}

/// The policy the flags describe, or a one-line reason they are bad.
fn policy(args: &RouterArgs) -> Result<Policy, String> {
    let mut accept = Vec::with_capacity(args.accept.len());
    for text in &args.accept {
        accept.push(
            ServicePrefix::parse(text).map_err(|e| format!("invalid --accept {text:?}: {e}"))?,
        );
    }
    if args.min_ttl_ms > args.max_ttl_ms {
        return Err(format!(
            "--min-ttl-ms ({}) is above --max-ttl-ms ({})",
            args.min_ttl_ms, args.max_ttl_ms
        ));
    }
    let (min_ttl, max_ttl) = (
        Duration::from_millis(args.min_ttl_ms),
        Duration::from_millis(args.max_ttl_ms),
    );
    Ok(Policy {
        accept,
        min_ttl,
        max_ttl,
        default_ttl: Policy::default().default_ttl.clamp(min_ttl, max_ttl),
        max_registrations: args.max_registrations,
    })
}

/// Checks the flags that can be checked without a runtime; a bad one is a usage error.
pub fn validate(args: &RouterArgs) -> Result<(), String> {
    config(args, policy(args)?).map(|_| ())
}

/// Why the router stopped.
pub enum Failure {
    /// Bad input (exit status 2).
    Usage(String),
    /// Anything else (exit status 1).
    Runtime(String),
}

/// Runs the router until interrupted (SIGINT or SIGTERM).
pub async fn run(args: RouterArgs) -> Result<(), Failure> {
    let policy = policy(&args).map_err(Failure::Usage)?;
    let connected = match &args.registry_cache {
        None => Registry::connect(&args.registry).await,
        Some(cache) => {
            if !args.registry.starts_with("etcd://") {
                return Err(Failure::Usage(
                    "--registry-cache needs an etcd registry (--registry etcd://…)".into(),
                ));
            }
            match serval_registry::EtcdConfig::from_url(&args.registry) {
                Ok(mut config) => {
                    config.cache = Some(cache.clone());
                    Registry::etcd(config).await
                }
                Err(e) => Err(e),
            }
        }
    };
    let registry = connected.map_err(|e| match e {
        RegistryError::BadUrl(_) => Failure::Usage(e.to_string()),
        other => Failure::Runtime(format!("registry {}: {other}", args.registry)),
    })?;
    let mut config = config(&args, policy).map_err(Failure::Usage)?;
    config.registry = registry;
    let router = std::sync::Arc::new(
        Router::bind(config)
            .await
            .map_err(|e| Failure::Runtime(e.to_string()))?,
    );
    let admin = match args.admin {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failure::Runtime(format!("cannot bind admin address {addr}: {e}")))?;
            let bound = listener.local_addr().unwrap_or(addr);
            let source: std::sync::Arc<dyn serval_admin::AdminSource> = router.clone();
            Some((bound, tokio::spawn(serval_admin::serve(listener, source))))
        }
        None => None,
    };
    // One line for scripts and tests to wait on: the locators, as bound (port 0 resolved).
    let ready = router
        .locators()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY {ready}");
    let _ = out.flush();
    drop(out);
    note!(
        "serval: router on {ready}, registry {} ({}){}",
        args.registry,
        if args.accept.is_empty() {
            "accepting every prefix".to_owned()
        } else {
            format!("accepting {}", args.accept.join(", "))
        },
        admin
            .as_ref()
            .map_or(String::new(), |(a, _)| format!(", admin API on http://{a}"))
    );
    wait_for_stop().await;
    let st = router.stats();
    note!(
        "serval: router stopping: {} registrations, {} SYNs forwarded, {} NACKed",
        st.registrations,
        st.syns_forwarded,
        st.syns_nacked
    );
    if let Some((_, task)) = admin {
        task.abort();
        let _ = task.await;
    }
    match std::sync::Arc::try_unwrap(router) {
        Ok(router) => router.shutdown(),
        // Dropping the last handle stops it too.
        Err(router) => drop(router),
    }
    Ok(())
}

/// Returns on SIGINT or SIGTERM (so that a service manager's stop unregisters cleanly).
pub async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
