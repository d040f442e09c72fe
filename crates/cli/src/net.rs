//! `serval listen` and `serval cat`, and the client flags and connect step the other client
//! commands share.

use std::net::SocketAddr;
use std::time::Duration;

use serval::{Endpoint, RegistrarEvent, ServiceId, ServiceListener, ServicePrefix, Stream};
use tokio::io::AsyncWriteExt;

/// Where and how an instance serves, as flags shared by `listen` and `expose`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstanceArgs {
    /// Local UDP address to bind; repeat for several (IPv4 and IPv6).
    #[arg(
        long = "bind",
        value_name = "ADDR",
        env = "SERVAL_BIND",
        value_delimiter = ',',
        default_value = "0.0.0.0:54324"
    )]
    pub bind: Vec<SocketAddr>,
    /// Register the service with this service router (kept alive while serving, withdrawn on
    /// exit), so clients reach it by name through the router. Give it several times (or
    /// comma-separated) for routers that share one registry: the registration goes through
    /// the first and moves to the next within a lease if it stops answering.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SERVAL_ROUTER",
        value_delimiter = ','
    )]
    pub router: Vec<SocketAddr>,
    /// Share of new connections among instances of the same priority (at least 1).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: u32,
    /// Priority: only the instances of the highest priority registered get connections.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub priority: u32,
    /// Accept clients that ask for plaintext: their packets stay authenticated (and replays
    /// refused) but are not encrypted. For measurements and debugging; a client that does
    /// not ask for it is encrypted anyway.
    #[arg(long, env = "SERVAL_PLAINTEXT")]
    pub plaintext: bool,
    /// Sign registrations with this private key (from `serval keygen`), as a router that
    /// authorises the key for the service's prefix requires (`router --authorize`).
    #[arg(long, value_name = "FILE", env = "SERVAL_KEY", value_parser = crate::keygen::read_private_key)]
    pub key: Option<serval_router::keys::PrivateKey>,
    /// Send this certificate chain (PEM, leaf first, the root left out) to clients that check
    /// certificates (`cat --ca`): its leaf must certify --key's public key for the service's
    /// name, and the chain must fit in a handshake (Ed25519 certificates: at most 4, about
    /// 990 bytes).
    #[arg(long, value_name = "FILE", env = "SERVAL_CERT", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// Do not follow the host's address and link changes: by default a flow whose local
    /// address or link goes away moves by itself to another address of the host, and a
    /// wildcard --bind serves the host's new addresses at once.
    #[arg(long, env = "SERVAL_NO_AUTO_MIGRATE")]
    pub no_auto_migrate: bool,
    /// Serve an admin API on this TCP address: the live flows (`serval flows`), metrics, and
    /// moves of flows to another instance (`serval migrate`). With --key, also run the
    /// migration agent that takes flows moved here from instances holding the same key.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Where the migration agent binds (default: the first --bind address, any port).
    #[arg(long, value_name = "ADDR", requires = "admin")]
    pub migrate_bind: Option<SocketAddr>,
    /// Also take moved flows from instances proving this key (as `serval keygen` printed
    /// it); instances holding this instance's own --key always may. Repeatable.
    #[arg(long, value_name = "PUBKEY", requires = "admin", value_parser = parse_public_key)]
    pub allow_moves_from: Vec<serval::PublicKey>,
    /// Run as the hot standby of the instance whose admin address is PRIMARY_ADMIN: hold a
    /// copy of its streams (it sends each step as it happens, and waits for this standby to
    /// hold it before the client sees it) and take them all over when it dies; only then
    /// register with the router. Needs --admin and --key (the primary's agent must allow it).
    #[arg(long, value_name = "PRIMARY_ADMIN", requires_all = ["admin", "key"])]
    pub standby_of: Option<SocketAddr>,
    /// With --standby-of: how long without a word from the primary before taking over, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = serval::DEFAULT_DETECT.as_millis() as u64,
          requires = "standby_of", value_parser = clap::value_parser!(u64).range(1..))]
    pub standby_detect: u64,
}

impl InstanceArgs {
    /// Binds the endpoint and, with `--router`, starts registering there (with `lease`, or
    /// the default lease of 3 s). With `locals` (`serval listen`: its `--bind` addresses
    /// and `--backup`s, [`Locals`]) several addresses make the endpoint multipath; without
    /// (`serval expose`, whose streams move by export, one path each) it binds `--bind` as
    /// given, one path per flow.
    pub async fn endpoint(
        &self,
        lease: Option<Duration>,
        locals: Option<&Locals>,
    ) -> Result<Endpoint, String> {
        let config = serval::EndpointConfig {
            // The instance key that signs registrations also proves the instance's identity
            // to clients that ask (--peer-key, --self-certifying, --ca).
            identity: self.key.clone(),
            certificate: self.certificate()?,
            ..endpoint_config(self.plaintext)
        };
        let follow = if self.no_auto_migrate {
            serval::FollowHost::Off
        } else {
            serval::FollowHost::Flows
        };
        let ep = match locals {
            Some(locals) => locals.bind(config, follow).await?,
            None => Endpoint::bind_following(&self.bind, config, follow)
                .await
                .map_err(|e| format!("cannot bind {}: {e}", list(&self.bind)))?,
        };
        if let Some(key) = &self.key {
            ep.set_registration_key(Some(key.clone()));
        }
        // A standby registers only once it took over.
        if self.standby_of.is_none() {
            self.register(&ep, lease);
        }
        Ok(ep)
    }

    /// The chain of `--cert`, checked against `--key` (clap requires the key with it).
    fn certificate(&self) -> Result<Option<serval::CertificateChain>, String> {
        let (Some(path), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read certificate file {}: {e}", path.display()))?;
        serval::CertificateChain::from_pem(&pem, &key.public_key())
            .map(Some)
            .map_err(|e| format!("certificate file {}: {e}", path.display()))
    }

    /// Starts registering with `--router` (if given), with `lease` or the default lease.
    pub fn register(&self, ep: &Endpoint, lease: Option<Duration>) {
        if !self.router.is_empty() {
            let routers = self.router.clone();
            let lease = match lease {
                Some(ttl) => serval::LeaseConfig {
                    ttl,
                    refresh: ttl / 3,
                    ..serval::LeaseConfig::default()
                },
                None => serval::LeaseConfig::default(),
            };
            ep.set_routers_with(routers, lease);
        }
    }

    /// Listens for `prefix` (typed by the user as `name`) with this weight and priority.
    pub fn listen(
        &self,
        ep: &Endpoint,
        name: &str,
        prefix: ServicePrefix,
    ) -> Result<ServiceListener, String> {
        ep.listen_weighted(prefix, self.priority, self.weight)
            .map_err(|e| format!("cannot listen on {name}: {e}"))
    }

    /// `, registering with router R (weight W)` for a startup line (`routers R1, R2` with
    /// several), or nothing.
    pub fn registering(&self) -> String {
        match self.router.as_slice() {
            [] => String::new(),
            [r] => format!(", registering with router {r} (weight {})", self.weight),
            rs => format!(
                ", registering with routers {} (weight {})",
                list(rs),
                self.weight
            ),
        }
    }
}

/// How `serval listen` serves, beyond [`InstanceArgs`].
pub struct ListenOptions {
    /// What to do with each stream.
    pub mode: crate::serve::Mode,
    /// Routerless mode: answer SYNs multicast on the local network.
    pub discover: Option<serval::DiscoveryConfig>,
    /// Lease to ask the router for (default: [`serval::LeaseConfig`]'s, 3 s).
    pub lease: Option<Duration>,
    /// On a stop, move open streams to the instance with this admin address.
    pub move_on_stop: Option<SocketAddr>,
    /// The `--bind` addresses and which are `--backup`s.
    pub locals: Locals,
}

/// The local addresses a command binds (`--bind`, repeatable) and those of them whose paths
/// are backups (`--backup`), checked. With several, the endpoint is multipath: a client
/// joins a path from each of its addresses to its server, a server tells its clients its
/// other addresses.
#[derive(Debug, Clone, Default)]
pub struct Locals {
    /// What to bind, the regular addresses first: a connection's first path runs from the
    /// first address of its family, and that path is never a backup.
    addrs: Vec<SocketAddr>,
    /// Which of `addrs` are backups.
    backup: Vec<SocketAddr>,
    /// How each connection spreads its data over its paths (`--scheduler`).
    scheduler: serval::Scheduler,
}

impl Locals {
    /// `--bind`, `--backup` and `--scheduler` as given; an error (for [`crate::usage`]) when
    /// a `--backup` is not one of the `--bind` addresses, is a wildcard, or leaves no regular
    /// address, or when a scheduler is asked for with fewer than two addresses (one path:
    /// nothing to schedule).
    pub fn new(
        bind: &[SocketAddr],
        backup: &[SocketAddr],
        scheduler: Option<serval::Scheduler>,
    ) -> Result<Locals, String> {
        if let Some(s) = scheduler
            && bind.len() < 2
        {
            return Err(format!(
                "--scheduler {s} needs several --bind addresses (a connection runs one path \
                 per address)"
            ));
        }
        for b in backup {
            if !bind.contains(b) {
                return Err(format!(
                    "--backup {b} is not one of the --bind addresses ({})",
                    if bind.is_empty() {
                        "none given".to_string()
                    } else {
                        list(bind)
                    }
                ));
            }
            if b.ip().is_unspecified() {
                return Err(format!(
                    "--backup {b}: a backup needs a specific local address, not a wildcard"
                ));
            }
        }
        let (backups, mut addrs): (Vec<SocketAddr>, Vec<SocketAddr>) =
            bind.iter().partition(|a| backup.contains(a));
        if addrs.is_empty() && !backups.is_empty() {
            return Err(format!(
                "every --bind address is a --backup ({}): leave at least one for regular \
                 traffic",
                list(&backups)
            ));
        }
        addrs.extend(&backups);
        Ok(Locals {
            addrs,
            backup: backups,
            scheduler: scheduler.unwrap_or_default(),
        })
    }

    /// The addresses to bind, regular ones first (none: the command's default).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Whether the endpoint runs several paths per connection: more than one address.
    pub fn multipath(&self) -> bool {
        self.addrs.len() > 1
    }

    /// Binds an endpoint on these addresses (at least one) with `config`, multipath with
    /// several and their backups as [`serval::EndpointConfig::backup_locals`] (one bound on
    /// port 0 stands for whatever port its socket gets).
    pub async fn bind(
        &self,
        mut config: serval::EndpointConfig,
        follow: serval::FollowHost,
    ) -> Result<Endpoint, String> {
        config.multipath = self.multipath();
        config.backup_locals = self.backup.clone();
        config.transport.scheduler = self.scheduler;
        Endpoint::bind_following(&self.addrs, config, follow)
            .await
            .map_err(|e| format!("cannot bind {}: {e}", list(&self.addrs)))
    }
}

/// Where `serval cat` sends its SYN.
#[derive(Clone)]
pub enum NextHop {
    /// A router or the instance.
    Via(SocketAddr),
    /// Routers that share one registry, tried in order: the next gets the SYN when the one
    /// before does not answer within [`ROUTER_TRY`].
    Routers(Vec<SocketAddr>),
    /// The discovery group: whichever instance on the local network answers first.
    Discover(serval::DiscoveryConfig),
}

/// Serves `prefix` (typed by the user as `name`) until interrupted.
pub async fn listen(
    name: &str,
    prefix: ServicePrefix,
    instance: InstanceArgs,
    opts: ListenOptions,
) -> Result<(), String> {
    let mode = opts.mode;
    let ep = instance.endpoint(opts.lease, Some(&opts.locals)).await?;
    // Kept for the life of the loop: the agent takes flows moved here.
    let agent = crate::instance::start(
        &ep,
        &instance,
        name,
        crate::instance::Moves::Supported,
        None,
    )
    .await?;
    let mut events = ep.registrar_events();
    if let Some(d) = &opts.discover {
        ep.enable_discovery(d.clone())
            .map_err(|e| format!("cannot join the discovery group: {e}"))?;
    }
    let mut listener = instance.listen(&ep, name, prefix)?;
    note!(
        "serval: serving {name} ({prefix}) on {}{}{}",
        list(&ep.local_locators()),
        match mode {
            crate::serve::Mode::Print => "",
            crate::serve::Mode::Echo => " (echo)",
            crate::serve::Mode::Number => " (numbering lines)",
        },
        instance.registering()
            + &opts
                .discover
                .as_ref()
                .map(|d| {
                    format!(
                        ", answering discovery on {} and {}",
                        d.locator(),
                        d.locator_v6()
                    )
                })
                .unwrap_or_default()
    );
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    // As a standby: hold the primary's streams until it dies, then take them over (they
    // come out of `accept`) and only then register.
    let standby = match instance.standby_of {
        Some(primary) => Some(crate::instance::start_standby(&ep, &instance, primary).await?),
        None => None,
    };
    let mut standing_by = standby.is_some();
    let standby = crate::instance::takeover(standby);
    tokio::pin!(standby);
    // Open connections, so that a stop lets them finish (graceful drain).
    let mut open = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Ok(ev) = events.recv() => note!("{}", describe_event(name, &ev)),
            took = &mut standby, if standing_by => {
                standing_by = false;
                note!("{}", crate::instance::describe_takeover(&took?));
                instance.register(&ep, opts.lease);
            }
            accepted = listener.accept() => {
                let stream = accepted.map_err(|e| format!("accept failed: {e}"))?;
                open.spawn(async move {
                    let peer = stream.peer_locator().map_or_else(|_| "?".into(), |p| p.to_string());
                    let r = crate::serve::serve(stream, mode).await;
                    if let Err(e) = r {
                        note!("serval: connection from {peer}: {e}");
                    }
                });
            }
            Some(_) = open.join_next(), if !open.is_empty() => {}
            () = &mut stop => break,
        }
    }
    // Stop accepting: dropping the listener unregisters the service at once, so the router
    // sends new connections elsewhere, while the open ones finish (up to DRAIN_LIMIT, or
    // until a second signal).
    drop(listener);
    if !instance.router.is_empty() {
        // Make "withdrawn" true before saying it: the UNREGISTER may need a cookie round
        // (a restarted router) or a retransmission, which an exiting process would cut short.
        ep.unregistered_within(UNREGISTER_LIMIT).await;
    }
    if let (Some(to), Some(agent)) = (opts.move_on_stop, &agent)
        && !open.is_empty()
    {
        note!(
            "serval: stopping: moving {} open stream(s) to the instance at {to}",
            open.len()
        );
        match crate::instance::move_all(agent, to).await {
            Ok((moved, failed)) => note!(
                "serval: {moved} stream(s) moved to {to}{}",
                if failed.is_empty() {
                    String::new()
                } else {
                    format!("; not moved: {}", failed.join("; "))
                }
            ),
            Err(e) => note!("serval: cannot move the open streams to {to}: {e}"),
        }
    }
    let stopping = if !instance.router.is_empty() {
        format!("serval: stopping: {name} withdrawn from the router, no new connections")
    } else {
        format!("serval: stopping: no new connections to {name}")
    };
    drain(&mut open, &stopping, DRAIN_LIMIT).await;
    Ok(())
}

/// After a stop: says `stopping`, then lets the open connections finish, at most `limit` or
/// until a second signal; then drops (and so resets) what is left, and gives the endpoint a
/// moment to send those resets.
pub async fn drain(open: &mut tokio::task::JoinSet<()>, stopping: &str, limit: Duration) {
    if open.is_empty() {
        note!("{stopping}, none open");
        return;
    }
    note!(
        "{stopping}; waiting for {} open connection(s) to finish (up to {} s; signal again \
         to close them now)",
        open.len(),
        limit.as_secs()
    );
    let all_done = async { while open.join_next().await.is_some() {} };
    tokio::select! {
        () = all_done => note!("serval: every connection finished"),
        () = tokio::time::sleep(limit) => note!(
            "serval: {} connection(s) still open after {} s: closing them",
            open.len(),
            limit.as_secs()
        ),
        () = crate::router::wait_for_stop() => note!(
            "serval: second signal: closing {} open connection(s)",
            open.len()
        ),
    }
    if !open.is_empty() {
        open.shutdown().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a stopping instance waits for its router to acknowledge its withdrawal.
pub const UNREGISTER_LIMIT: Duration = Duration::from_secs(1);

/// How long a stopping `serval listen` lets open connections finish.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Waits (bounded) for the FIN exchange to complete, so that a stopping process does not
/// drop the endpoint while our FIN is still unacknowledged.
pub async fn finish(stream: &Stream) {
    let _ = tokio::time::timeout(CLOSE_WAIT, stream.closed()).await;
}

/// Where a client's SYN goes, as flags shared by `cat`, `proxy`, `ping` and `bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("next_hop").required(true).args(["via", "router", "discover"])))]
pub struct HopArgs {
    /// Next hop for the SYN: a service router, or the instance itself.
    #[arg(long, value_name = "ADDR", env = "SERVAL_VIA")]
    pub via: Option<SocketAddr>,
    /// The service router to resolve the name (the SYN's next hop; same as --via ADDR).
    /// Give it several times (or comma-separated) for routers that share one registry: each
    /// connection's SYN goes to the first, and to the next if it does not answer.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SERVAL_ROUTER",
        value_delimiter = ','
    )]
    pub router: Vec<SocketAddr>,
    /// Local UDP address to bind (default: any address of the next hop's family). Repeat
    /// it (or comma-separate) to use several: each connection then runs a path from each
    /// (multipath), and carries on over the others when one dies.
    #[arg(
        long = "bind",
        value_name = "ADDR",
        env = "SERVAL_BIND",
        value_delimiter = ','
    )]
    pub bind: Vec<SocketAddr>,
    /// A --bind address whose paths are backups: they carry data only while no other path
    /// works. Repeatable.
    #[arg(long, value_name = "ADDR")]
    pub backup: Vec<SocketAddr>,
    /// How a connection with several paths (several --bind) spreads its data: lowest-rtt
    /// (default; the fastest path with room, then the next) or redundant (every packet of
    /// data on every path that has room: small latency-sensitive writes ride out a lossy or
    /// dying path).
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<serval::Scheduler>,
    /// Routerless mode: find the service on the local network by multicasting the SYN
    /// (group 239.255.86.76); fails after --discover-timeout if no instance answers. Bind
    /// a specific address to choose the interface.
    #[arg(long)]
    pub discover: bool,
    /// UDP port of the discovery group (with --discover).
    #[arg(long, value_name = "PORT", env = "SERVAL_DISCOVER_PORT", default_value_t = serval::DEFAULT_DISCOVERY_PORT)]
    pub discover_port: u16,
    /// How long to wait for an instance to answer (with --discover), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub discover_timeout: u64,
    /// Ask for plaintext: packets stay authenticated (and replays refused) but are not
    /// encrypted, if the instance allows it too (its own --plaintext); otherwise the flow is
    /// encrypted. For measurements and debugging.
    #[arg(long, env = "SERVAL_PLAINTEXT")]
    pub plaintext: bool,
    /// Require the instance to prove it holds this key (as `serval keygen` printed it; the
    /// instance's --key): otherwise the connect fails. Without --peer-key, --self-certifying
    /// or --ca the flow is encrypted, but whoever answers the SYN is accepted.
    #[arg(long, value_name = "PUBKEY", conflicts_with_all = ["self_certifying", "ca"], value_parser = parse_public_key)]
    pub peer_key: Option<serval::PublicKey>,
    /// Require the instance to prove its right to the service's name with a certificate
    /// (its --cert) issued by one of the CAs in this PEM file, valid now, for server
    /// authentication, and certifying the key it proves: otherwise the connect fails. Connect
    /// by name (not by serviceID): the name is what the certificate must name.
    #[arg(long, value_name = "FILE", env = "SERVAL_CA", conflicts_with = "self_certifying", value_parser = read_trust_anchors)]
    pub ca: Option<serval::TrustAnchors>,
    /// With --ca: certificate revocation lists (PEM "X509 CRL" blocks, the current one of each
    /// CA) to check the instance's chain against. A certificate its issuer revoked fails the
    /// connect, and so does a list past its nextUpdate; a certificate whose issuer has no list
    /// here is accepted.
    #[arg(long, value_name = "FILE", requires = "ca", value_parser = read_revocation_lists)]
    pub crl: Option<serval::RevocationLists>,
    /// Require the instance to prove it holds the key the serviceID commits to (a
    /// self-certifying ID, as `serval id --key` prints it): no CA and no pinned key needed.
    #[arg(long)]
    pub self_certifying: bool,
    /// Do not follow the host's address and link changes: by default a flow whose local
    /// address or link goes away (a link down, the host renumbered) moves by itself to
    /// another address of the host.
    #[arg(long, env = "SERVAL_NO_AUTO_MIGRATE")]
    pub no_auto_migrate: bool,
}

/// `--ca`'s value: the CA certificates of a PEM file.
fn read_trust_anchors(file: &str) -> Result<serval::TrustAnchors, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read CA file {file}: {e}"))?;
    serval::TrustAnchors::from_pem(&pem).map_err(|e| format!("CA file {file}: {e}"))
}

/// `--crl`'s value: the revocation lists of a PEM file.
fn read_revocation_lists(file: &str) -> Result<serval::RevocationLists, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read CRL file {file}: {e}"))?;
    serval::RevocationLists::from_pem(&pem).map_err(|e| format!("CRL file {file}: {e}"))
}

/// `--peer-key`'s value: a public key line.
fn parse_public_key(text: &str) -> Result<serval::PublicKey, String> {
    serval::PublicKey::parse_line(text).map_err(|e| e.to_string())
}

impl HopArgs {
    /// The client endpoint's configuration these flags ask for: plaintext, and the server
    /// identity to require.
    pub fn endpoint_config(&self) -> serval::EndpointConfig {
        let peer_identity = match (self.peer_key, self.self_certifying, &self.ca) {
            (Some(key), _, _) => Some(serval::PeerIdentity::Key(key)),
            (None, true, _) => Some(serval::PeerIdentity::SelfCertifying),
            (None, false, Some(anchors)) => Some(serval::PeerIdentity::Ca(match &self.crl {
                Some(lists) => anchors.clone().with_revocations(lists.clone()),
                None => anchors.clone(),
            })),
            (None, false, None) => None,
        };
        serval::EndpointConfig {
            peer_identity,
            ..endpoint_config(self.plaintext)
        }
    }

    /// `--bind`, `--backup` and `--scheduler`, checked ([`Locals::new`]).
    pub fn locals(&self) -> Result<Locals, String> {
        Locals::new(&self.bind, &self.backup, self.scheduler)
    }

    /// Whether the endpoint follows the host's changes (`--no-auto-migrate` says not).
    pub fn follow(&self) -> serval::FollowHost {
        if self.no_auto_migrate {
            serval::FollowHost::Off
        } else {
            serval::FollowHost::Flows
        }
    }

    /// The next hop the flags name (clap requires one of them).
    pub fn next_hop(&self) -> NextHop {
        match (self.via, self.router.as_slice()) {
            (Some(hop), _) | (None, &[hop]) => NextHop::Via(hop),
            (None, [_, _, ..]) => NextHop::Routers(self.router.clone()),
            (None, []) => NextHop::Discover(serval::DiscoveryConfig {
                port: self.discover_port,
                connect_timeout: Duration::from_millis(self.discover_timeout),
                ..serval::DiscoveryConfig::default()
            }),
        }
    }
}

/// The endpoint configuration of a command: the defaults, with plaintext if asked for.
pub fn endpoint_config(plaintext: bool) -> serval::EndpointConfig {
    serval::EndpointConfig {
        protection: if plaintext {
            serval::Protection::Plaintext
        } else {
            serval::Protection::Encrypted
        },
        ..serval::EndpointConfig::default()
    }
}

/// A client endpoint for reaching services through `hop`: bound to `locals` (default: any
/// address of the next hop's family; several make it multipath), in the discovery group if
/// `hop` says so, configured by `config` ([`HopArgs::endpoint_config`]), following the
/// host's changes as `follow` says ([`HopArgs::follow`]).
pub async fn client(
    hop: &NextHop,
    locals: &Locals,
    config: serval::EndpointConfig,
    follow: serval::FollowHost,
) -> Result<Endpoint, String> {
    let v4 = match hop {
        NextHop::Via(via) => via.is_ipv4(),
        NextHop::Routers(rs) => rs.first().is_none_or(SocketAddr::is_ipv4),
        NextHop::Discover(_) => true,
    };
    let ep = if locals.addrs().is_empty() {
        let local = if v4 {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        Endpoint::bind_following(&[local], config, follow)
            .await
            .map_err(|e| format!("cannot bind {local}: {e}"))?
    } else {
        locals.bind(config, follow).await?
    };
    if let NextHop::Discover(d) = hop {
        ep.enable_discovery(d.clone())
            .map_err(|e| format!("cannot join the discovery group: {e}"))?;
    }
    Ok(ep)
}

/// Opens a stream to `service` (typed by the user as `name`) from `ep` through `hop`; a
/// failure is one readable line.
pub async fn connect(
    ep: &Endpoint,
    name: &str,
    service: ServiceId,
    hop: &NextHop,
) -> Result<Stream, String> {
    // Connect by name when the user typed one, so that a certificate can be checked (--ca).
    let named = serval::ServerName::new(name)
        .ok()
        .filter(|n| n.service() == service);
    let connect_via = |via: SocketAddr| {
        let named = named.clone();
        async move {
            match &named {
                Some(n) => ep.connect_name_via(n, via).await,
                None => ep.connect_via(service, via).await,
            }
        }
    };
    let (connected, hop) = match hop {
        NextHop::Via(via) => (connect_via(*via).await, hop.clone()),
        NextHop::Routers(routers) => {
            // Each router but the last gets ROUTER_TRY to answer (a NACK is an answer: they
            // share one registry, so the next would say the same); the last, the whole SYN
            // schedule.
            let mut routers = routers.iter().peekable();
            loop {
                let Some(router) = routers.next() else {
                    return Err(format!("connect to service {name}: no router given"));
                };
                let connecting = connect_via(*router);
                if routers.peek().is_none() {
                    break (connecting.await, NextHop::Via(*router));
                }
                if let Ok(done) = tokio::time::timeout(ROUTER_TRY, connecting).await {
                    break (done, NextHop::Via(*router));
                }
                note!("serval: router {router} does not answer; trying the next");
            }
        }
        NextHop::Discover(_) => {
            let connected = match &named {
                Some(n) => ep.connect_name(n).await,
                None => ep.connect(service).await,
            };
            (connected, hop.clone())
        }
    };
    connected.map_err(|e| match (&hop, e.kind()) {
        (NextHop::Discover(_), std::io::ErrorKind::HostUnreachable) => {
            format!("no route to service {name} (no instance answered on the local network)")
        }
        (NextHop::Discover(d), _) => format!(
            "connect to service {name} through discovery group {}: {e}",
            d.locator()
        ),
        (NextHop::Via(via), std::io::ErrorKind::HostUnreachable) => {
            format!("no route to service {name} (via {via})")
        }
        (NextHop::Via(via), std::io::ErrorKind::TimedOut) => {
            format!("connect to service {name} via {via} timed out")
        }
        (NextHop::Via(via), _) => format!("connect to service {name} via {via}: {e}"),
        (NextHop::Routers(rs), _) => format!("connect to service {name} via {}: {e}", list(rs)),
    })
}

/// How long a router has to answer a SYN before the next of several gets it: the first SYN
/// and one retransmission (the control RTO starts at 1 s).
pub const ROUTER_TRY: Duration = Duration::from_millis(1500);

/// `serval cat --move-to`: the client asks its server to move the stream's other end.
#[derive(Clone, Copy, Debug)]
pub struct MoveTo {
    /// The migration agent of the instance to move to.
    pub to: SocketAddr,
    /// Ask once this many bytes came back.
    pub after: u64,
}

/// Connects to `service` (typed by the user as `name`) through `hop` from `locals` (several:
/// a path from each), giving up after `connect_timeout` without an answer, sends stdin,
/// prints what comes back; with `move_to`, asks the server to move its end of the stream
/// part way.
pub async fn cat(
    name: &str,
    service: ServiceId,
    hop: &HopArgs,
    locals: &Locals,
    connect_timeout: Option<Duration>,
    move_to: Option<MoveTo>,
) -> Result<(), String> {
    let next = hop.next_hop();
    let ep = client(&next, locals, hop.endpoint_config(), hop.follow()).await?;
    let connecting = connect(&ep, name, service, &next);
    let stream = match connect_timeout {
        None => connecting.await?,
        Some(limit) => tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| {
                let hop = match &next {
                    NextHop::Via(via) => format!("via {via}"),
                    NextHop::Routers(rs) => format!("via {}", list(rs)),
                    NextHop::Discover(d) => format!("through discovery group {}", d.locator()),
                };
                format!(
                    "connect to service {name} {hop}: no answer within {limit:?} (nothing \
                     listening there, or the instance died; --connect-timeout waits longer)"
                )
            })??,
    };
    let (received_tx, mut received) = tokio::sync::watch::channel(0u64);
    let moved = {
        let (mut r, mut w) = (&stream, &stream);
        let send = async {
            let mut stdin = tokio::io::stdin();
            let sent = async {
                tokio::io::copy(&mut stdin, &mut w).await?;
                w.shutdown().await
            };
            sent.await.map_err(|e| format!("sending: {e}"))
        };
        let receive = async {
            // Dropped when receiving ends, which tells a mover still waiting for bytes.
            let received_tx = received_tx;
            let mut stdout = tokio::io::stdout();
            let mut buf = vec![0u8; 64 * 1024];
            let received = async {
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut r, &mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    stdout.write_all(&buf[..n]).await?;
                    if move_to.is_some() {
                        received_tx.send_modify(|total| *total += n as u64);
                    }
                }
                stdout.flush().await
            };
            received.await.map_err(|e| format!("receiving: {e}"))
        };
        // The move runs beside both directions and never ends them.
        let mover = async {
            let Some(m) = move_to else {
                return Ok(None);
            };
            if received.wait_for(|n| *n >= m.after).await.is_err() {
                return Ok(Some(Err(format!(
                    "the stream ended before {} bytes came back: not moved",
                    m.after
                ))));
            }
            let asked = std::time::Instant::now();
            let r = match stream.request_move(m.to).await {
                Ok(at) => {
                    note!(
                        "serval: the stream moved to {at} (the instance whose agent is {}) in {:.1} ms",
                        m.to,
                        asked.elapsed().as_secs_f64() * 1e3
                    );
                    Ok(())
                }
                Err(e) => {
                    let e = format!("the move to {} failed: {e}", m.to);
                    note!("serval: {e}");
                    Err(e)
                }
            };
            Ok::<_, String>(Some(r))
        };
        // Each direction ends on its own (the peer's FIN does not end what we send), but a
        // failure of either ends both: a dead connection must not wait for stdin's end.
        let (_, _, moved) = tokio::try_join!(send, receive, mover)?;
        moved
    };
    // Both directions ended: let the FIN exchange finish so the peer sees a clean close.
    match tokio::time::timeout(CLOSE_WAIT, stream.closed()).await {
        Ok(serval::CloseReason::Finished) | Err(_) => moved.unwrap_or(Ok(())),
        Ok(other) => Err(format!("connection ended badly: {other}")),
    }
}

/// How long `cat` waits for the FIN exchange after both directions ended.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Addresses as one comma-separated list.
pub fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line telling what the registrar did with the registration of `name`.
pub fn describe_event(name: &str, ev: &RegistrarEvent) -> String {
    match ev {
        RegistrarEvent::Registered { router, ttl, .. } => format!(
            "serval: registered {name} with router {router} (lease {} ms)",
            ttl.as_millis()
        ),
        RegistrarEvent::Rejected {
            router,
            reason: serval::RejectReason::UNAUTHORIZED,
            prefix,
        } => format!(
            "serval: router {router} refused the registration of {name}: not signed by the key \
             authorized for {prefix} (or a prefix covering it; --key FILE signs)"
        ),
        RegistrarEvent::Rejected { router, reason, .. } => {
            format!("serval: router {router} rejected {name}: {reason}")
        }
        RegistrarEvent::Unreachable { router, .. } => {
            format!("serval: router {router} does not answer; still trying")
        }
        RegistrarEvent::FailedOver { from, to } => {
            format!("serval: router {from} stopped answering; registering {name} with router {to}")
        }
    }
}
