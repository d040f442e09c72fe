//! An instance's admin API and migration agent (`serval listen`/`expose --admin`), and the
//! operator's side of them: `serval flows` and `serval migrate`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serval::{ConnectionState, Endpoint, FlowId, Locator, MigrationConfig, Migrator, PublicKey};
use serval_admin::instance::{
    FlowMoveView, FlowView, InstanceSource, InstanceView, MigrateFuture, MigrateReport,
    MigrateRequest, PathView,
};
use serval_admin::{Client, Metric};

/// Whether an instance's streams can move to another host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moves {
    /// Its application hands streams over (`serval listen`).
    Supported,
    /// They cannot move, and why (`serval expose`: the TCP side stays on this host).
    Unsupported(&'static str),
    /// They cannot move (why), but a hot standby on this host may hold them: the migration
    /// agent runs for its session and takes no flows moved in (`serval expose
    /// --standby-socket`).
    StandbyOnly(&'static str),
}

impl Moves {
    /// Why flows cannot move here or from here, if they cannot.
    fn refusal(self) -> Option<&'static str> {
        match self {
            Moves::Supported => None,
            Moves::Unsupported(why) | Moves::StandbyOnly(why) => Some(why),
        }
    }
}

/// Starts the admin API on `--admin` (if given) and, with `--key`, the migration agent.
/// Returns the agent, for the caller to keep. `standby_socket` is what `GET /instance`
/// shows as `serval expose`'s `--standby-socket`.
pub async fn start(
    ep: &Endpoint,
    args: &crate::net::InstanceArgs,
    service: &str,
    moves: Moves,
    standby_socket: Option<&std::path::Path>,
) -> Result<Option<Migrator>, String> {
    let Some(admin) = args.admin else {
        return Ok(None);
    };
    let migrator = match (&args.key, moves) {
        (Some(key), Moves::Supported | Moves::StandbyOnly(_)) => {
            let bind = match args.migrate_bind {
                Some(b) => b,
                None => SocketAddr::new(
                    args.bind
                        .first()
                        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), SocketAddr::ip),
                    0,
                ),
            };
            let m = Migrator::start(
                ep,
                MigrationConfig {
                    key: key.clone(),
                    allowed: args.allow_moves_from.clone(),
                    bind,
                    refuse_moves_in: moves.refusal().map(str::to_owned),
                },
            )
            .await
            .map_err(|e| format!("cannot start the migration agent on {bind}: {e}"))?;
            Some(m)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(admin)
        .await
        .map_err(|e| format!("cannot bind --admin {admin}: {e}"))?;
    // Where it listens: the port the system picked for `--admin ADDR:0`.
    let admin = listener.local_addr().unwrap_or(admin);
    let source = Arc::new(Source {
        ep: ep.clone(),
        service: service.to_owned(),
        prefix: serval::ServicePrefix::parse(service).ok(),
        migrator: migrator.clone(),
        moves,
        standby_socket: standby_socket.map(|p| p.display().to_string()),
        has_key: args.key.is_some(),
        moved_out: Arc::default(),
        failed_moves: Arc::default(),
    });
    tokio::spawn(async move {
        if let Err(e) = serval_admin::instance::serve_instance(listener, source).await {
            note!("serval: admin API stopped: {e}");
        }
    });
    note!(
        "serval: admin API on http://{admin}{}",
        match &migrator {
            Some(m) => format!(" (migration agent on {})", m.locator()),
            None => String::new(),
        }
    );
    Ok(migrator)
}

struct Source {
    ep: Endpoint,
    /// The service as the operator typed it, and what it covers.
    service: String,
    prefix: Option<serval::ServicePrefix>,
    migrator: Option<Migrator>,
    moves: Moves,
    /// `serval expose --standby-socket`, for `GET /instance`.
    standby_socket: Option<String>,
    has_key: bool,
    moved_out: Arc<AtomicU64>,
    failed_moves: Arc<AtomicU64>,
}

fn state_name(state: ConnectionState, exported: bool) -> &'static str {
    if exported {
        return "exported";
    }
    match state {
        ConnectionState::SynSent => "syn-sent",
        ConnectionState::SynRcvd => "syn-received",
        ConnectionState::Established => "established",
        ConnectionState::TimeWait => "time-wait",
        ConnectionState::Closed => "closed",
    }
}

impl InstanceSource for Source {
    fn instance(&self) -> InstanceView {
        InstanceView {
            service: self.service.clone(),
            locators: self
                .ep
                .local_locators()
                .iter()
                .map(ToString::to_string)
                .collect(),
            agent: self.migrator.as_ref().map(|m| m.locator().to_string()),
            key: self.migrator.as_ref().map(|m| m.public_key().to_line()),
            standby_socket: self.standby_socket.clone(),
        }
    }

    fn flows(&self) -> Vec<FlowView> {
        self.ep
            .flows()
            .into_iter()
            .map(|c| FlowView {
                flow: c.local_flow.to_string(),
                service: match self.prefix {
                    Some(p) if p.contains(&c.service) && !self.service.contains('*') => {
                        self.service.clone()
                    }
                    _ => c.service.to_string(),
                },
                role: match c.role {
                    serval::Role::Client => "client".into(),
                    serval::Role::Server => "server".into(),
                },
                local: c.local.to_string(),
                peer: c.peer.to_string(),
                state: state_name(c.state, c.exported).into(),
                bytes_sent: c.stats.stream_bytes_sent,
                bytes_received: c.stats.stream_bytes_received,
                rtt_us: c.stats.srtt.as_micros() as u64,
                moves: c.moves,
                paths: self
                    .ep
                    .flow_paths(c.handle)
                    .into_iter()
                    .map(|p| {
                        let t = p.transport;
                        PathView {
                            id: p.id,
                            local: p.local.to_string(),
                            remote: p.remote.to_string(),
                            active: p.active,
                            backup: t.is_some_and(|t| t.backup),
                            failed: t.is_some_and(|t| t.failed),
                            rtt_us: t.map_or(0, |t| t.srtt.as_micros() as u64),
                            cwnd: t.map_or(0, |t| t.cwnd),
                            bytes_sent: t.map_or(0, |t| t.bytes_sent),
                            copies_sent: t.map_or(0, |t| t.copies_sent),
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    fn metrics(&self) -> Vec<Metric> {
        let flows = self.ep.flows();
        vec![
            Metric::gauge("flows", "Live flows", flows.len() as u64),
            Metric::gauge(
                "flows_exported",
                "Flows frozen here for a move",
                flows.iter().filter(|c| c.exported).count() as u64,
            ),
            Metric::gauge(
                "standby_attached",
                "1 while a hot standby holds a copy of this instance's streams",
                u64::from(self.ep.has_standby()),
            ),
            Metric::counter(
                "flows_moved_out",
                "Flows moved to another instance",
                self.moved_out.load(Ordering::Relaxed),
            ),
            Metric::counter(
                "flows_moved_at_client_request",
                "Flows moved to another instance because their client asked (cat --move-to)",
                self.migrator.as_ref().map_or(0, |m| m.client_moves().0),
            ),
            Metric::counter(
                "client_move_requests_failed",
                "Clients' move requests that failed (the flow stayed, or was lost if the \
                 transfer broke)",
                self.migrator.as_ref().map_or(0, |m| m.client_moves().1),
            ),
            Metric::counter(
                "flow_moves_failed",
                "Flow moves that failed (the flow stayed, or was lost if the transfer broke)",
                self.failed_moves.load(Ordering::Relaxed),
            ),
        ]
    }

    fn migrate(&self, request: MigrateRequest) -> MigrateFuture {
        let migrator = match (&self.migrator, self.moves.refusal()) {
            (_, Some(why)) => return Box::pin(async move { Err(why.to_owned()) }),
            (None, _) if !self.has_key => {
                return Box::pin(async {
                    Err(
                        "this instance has no --key: a move needs the service's key on both \
                         instances"
                            .to_owned(),
                    )
                });
            }
            (None, _) => return Box::pin(async { Err("no migration agent".to_owned()) }),
            (Some(m), _) => m.clone(),
        };
        let parsed = parse_request(&request);
        let (ok, failed) = (self.moved_out.clone(), self.failed_moves.clone());
        let fut = async move {
            let (to, key, flows) = parsed?;
            let moved = migrator
                .move_flows(&flows, to, key)
                .await
                .map_err(|e| format!("cannot reach the migration agent at {to}: {e}"))?;
            let flows = moved
                .into_iter()
                .map(|m| {
                    let mut v = FlowMoveView {
                        flow: m.flow.to_string(),
                        ..FlowMoveView::default()
                    };
                    match m.result {
                        Ok(p) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            v.handover_us = p.handover.as_micros() as u64;
                            v.export_us = p.export.as_micros() as u64;
                            v.drain_us = p.drain.as_micros() as u64;
                            v.transfer_us = p.transfer.as_micros() as u64;
                            v.import_us = p.import.as_micros() as u64;
                            v.rebind_us = p.rebind.as_micros() as u64;
                            v.frozen_us = p.frozen.as_micros() as u64;
                            v.snapshot_bytes = p.snapshot_bytes as u64;
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            v.error = Some(e);
                        }
                    }
                    v
                })
                .collect();
            Ok(MigrateReport { flows })
        };
        // On a task of its own: an operator's `serval migrate` interrupted mid-move (the
        // HTTP request dropped) must not cancel a move half way, which would lose the flow
        // (an exported stream dropped unended is released, never thawed).
        let task = tokio::spawn(fut);
        Box::pin(async move {
            task.await
                .map_err(|e| format!("the move task failed: {e}"))?
        })
    }
}

fn parse_request(r: &MigrateRequest) -> Result<(Locator, PublicKey, Vec<FlowId>), String> {
    let to: Locator = r
        .agent
        .parse()
        .map_err(|e| format!("agent {:?}: {e}", r.agent))?;
    let key = PublicKey::parse_line(&r.key).map_err(|e| format!("key {:?}: {e}", r.key))?;
    let flows = r
        .flows
        .iter()
        .map(|f| parse_flow(f))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((to, key, flows))
}

/// A flowID as `serval flows` prints it (16 hex digits).
pub fn parse_flow(text: &str) -> Result<FlowId, String> {
    u64::from_str_radix(text.trim(), 16)
        .ok()
        .filter(|v| *v != 0)
        .map(FlowId)
        .ok_or_else(|| {
            format!("{text:?} is not a flowID (16 hex digits, as `serval flows` prints)")
        })
}

/// `serval flows --admin ADDR`.
pub fn flows(admin: SocketAddr) -> ExitCode {
    let flows = match Client::new(admin).flows() {
        Ok(f) => f,
        Err(e) => return crate::fail(&e.to_string()),
    };
    println!(
        "{:<16}  {:<24}  {:<6}  {:<21}  {:<21}  {:<12}  {:>12}  {:>12}  {:>9}  {:>5}",
        "FLOW", "SERVICE", "ROLE", "LOCAL", "PEER", "STATE", "SENT", "RECEIVED", "RTT", "MOVES"
    );
    for f in &flows {
        let service: String = f.service.chars().take(24).collect();
        println!(
            "{:<16}  {:<24}  {:<6}  {:<21}  {:<21}  {:<12}  {:>12}  {:>12}  {:>9}  {:>5}",
            f.flow,
            service,
            f.role,
            f.local,
            f.peer,
            f.state,
            f.bytes_sent,
            f.bytes_received,
            format!("{:.2}ms", f.rtt_us as f64 / 1000.0),
            f.moves
        );
        // A flow on several paths: a line for each, under the flow's.
        if f.paths.len() > 1 {
            for p in &f.paths {
                println!("{}", path_line(p));
            }
        }
    }
    ExitCode::SUCCESS
}

/// One path of a flow as `serval flows` shows it, under the flow's line: its ID, locators
/// (under LOCAL and PEER), state (under STATE), bytes sent on it (packets, headers included;
/// under SENT), round-trip time (under RTT), congestion window and, if it sent any, the
/// copies of other paths' packets it carried (the redundant scheduler).
fn path_line(p: &PathView) -> String {
    let copies = if p.copies_sent > 0 {
        format!("  copies {}", p.copies_sent)
    } else {
        String::new()
    };
    format!(
        "{:<16}  {:<24}  {:<6}  {:<21}  {:<21}  {:<12}  {:>12}  {:>12}  {:>9}  cwnd {}{copies}",
        format!("  path {}", p.id),
        "",
        "",
        p.local,
        p.remote,
        p.state(),
        p.bytes_sent,
        "",
        format!("{:.2}ms", p.rtt_us as f64 / 1000.0),
        p.cwnd
    )
    .trim_end()
    .to_string()
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// Where the instance with admin address `to` takes moved flows: its agent's locator (at
/// the admin's IP if the agent is bound to the wildcard address) and key.
fn agent_of(to: SocketAddr) -> Result<(String, String), String> {
    let target = Client::new(to).instance().map_err(|e| e.to_string())?;
    let (Some(agent), Some(key)) = (target.agent, target.key) else {
        return Err(format!(
            "the instance at {to} takes no moved flows (start it with --admin and --key)"
        ));
    };
    let agent = match agent.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => SocketAddr::new(to.ip(), a.port()).to_string(),
        _ => agent,
    };
    Ok((agent, key))
}

/// Moves every movable flow of this instance to the one with admin address `to` (`listen
/// --move-on-stop`): how many moved, and why the others did not.
pub async fn move_all(agent: &Migrator, to: SocketAddr) -> Result<(usize, Vec<String>), String> {
    let (locator, key) = tokio::task::spawn_blocking(move || agent_of(to))
        .await
        .map_err(|e| e.to_string())??;
    let (to_agent, to_key, _) = parse_request(&MigrateRequest {
        agent: locator,
        key,
        flows: Vec::new(),
    })?;
    let report = agent
        .move_flows(&[], to_agent, to_key)
        .await
        .map_err(|e| e.to_string())?;
    let moved = report.iter().filter(|m| m.result.is_ok()).count();
    let failed = report
        .into_iter()
        .filter_map(|m| m.result.err().map(|e| format!("{}: {e}", m.flow)))
        .collect();
    Ok((moved, failed))
}

/// Starts `ep` as the hot standby of the instance whose admin address is `primary` (`listen
/// --standby-of`): the task ends when it took the primary's streams over (or could not stand
/// by at all).
pub async fn start_standby(
    ep: &Endpoint,
    args: &crate::net::InstanceArgs,
    primary: SocketAddr,
) -> Result<tokio::task::JoinHandle<std::io::Result<serval::Takeover>>, String> {
    let key = args
        .key
        .clone()
        .ok_or("--standby-of needs --key (the key the primary's agent allows)")?;
    let (locator, agent_key) = tokio::task::spawn_blocking(move || agent_of(primary))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot stand by for the instance at {primary}: {e}"))?;
    let (agent, agent_key, _) = parse_request(&MigrateRequest {
        agent: locator,
        key: agent_key,
        flows: Vec::new(),
    })?;
    note!(
        "serval: hot standby of the instance at {primary} (its agent {agent}): holding its \
         streams, taking them over after {} ms of silence",
        args.standby_detect
    );
    let config = serval::StandbyConfig {
        key,
        primary: agent,
        primary_key: agent_key,
        detect: std::time::Duration::from_millis(args.standby_detect),
    };
    let ep = ep.clone();
    Ok(tokio::spawn(async move {
        serval::run_standby(&ep, config).await
    }))
}

/// A standby's task (from [`start_standby`]) as a future for a `select!`: its takeover, or
/// why it could not stand by; never ready without one.
pub async fn takeover(
    task: Option<tokio::task::JoinHandle<std::io::Result<serval::Takeover>>>,
) -> Result<serval::Takeover, String> {
    match task {
        Some(t) => match t.await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(format!("standby: {e}")),
            Err(e) => Err(format!("standby: {e}")),
        },
        None => std::future::pending().await,
    }
}

/// One line on a standby's takeover.
pub fn describe_takeover(t: &serval::Takeover) -> String {
    let mut line = format!(
        "serval: took over {} stream(s) from the primary ({}; {} checkpoints held; imported in \
         {})",
        t.streams,
        t.reason,
        t.checkpoints,
        ms(t.import.as_micros() as u64)
    );
    for (flow, why) in &t.failed {
        line.push_str(&format!("; {flow} not taken: {why}"));
    }
    line
}

/// `serval migrate --admin FROM --to TO [--flow ID]... [--share F]`.
pub fn migrate(from: SocketAddr, to: SocketAddr, flows: &[String], share: Option<f64>) -> ExitCode {
    for f in flows {
        if let Err(e) = parse_flow(f) {
            return crate::usage(&format!("--flow {e}"));
        }
    }
    let mut flows = flows.to_vec();
    if let Some(share) = share {
        if !(share > 0.0 && share <= 1.0) {
            return crate::usage(&format!("--share {share}: expected a number in (0, 1]"));
        }
        let served: Vec<String> = match Client::new(from).flows() {
            Ok(f) => f
                .into_iter()
                .filter(|f| f.role == "server" && f.state == "established")
                .map(|f| f.flow)
                .collect(),
            Err(e) => return crate::fail(&e.to_string()),
        };
        let n = (served.len() as f64 * share).ceil() as usize;
        if n == 0 {
            println!("no flow to move at {from}");
            return ExitCode::SUCCESS;
        }
        flows = served.into_iter().take(n).collect();
    }
    let (agent, key) = match agent_of(to) {
        Ok(a) => a,
        Err(e) => return crate::fail(&e),
    };
    let started = std::time::Instant::now();
    let report = match Client::new(from).migrate(&MigrateRequest { agent, key, flows }) {
        Ok(r) => r,
        Err(e) => return crate::fail(&e.to_string()),
    };
    let took = started.elapsed();
    if report.flows.is_empty() {
        println!("no flow to move at {from}");
        return ExitCode::SUCCESS;
    }
    // Every moved flow must now be listed at TO (its flowID stays the same).
    let at_to: Vec<String> = match Client::new(to).flows() {
        Ok(f) => f.into_iter().map(|f| f.flow).collect(),
        Err(e) => return crate::fail(&e.to_string()),
    };
    let mut failed = 0;
    for f in &report.flows {
        match &f.error {
            None if at_to.contains(&f.flow) => println!(
                "flow {}: moved to {to}: frozen {} (drain before it {}, hand-over {}, export {}, \
                 transfer {}, import {}, re-bind {}; snapshot {} KiB)",
                f.flow,
                ms(f.frozen_us),
                ms(f.drain_us),
                ms(f.handover_us),
                ms(f.export_us),
                ms(f.transfer_us),
                ms(f.import_us),
                ms(f.rebind_us),
                f.snapshot_bytes.div_ceil(1024),
            ),
            None => {
                failed += 1;
                println!("flow {}: reported moved, but {to} does not list it", f.flow);
            }
            Some(e) => {
                failed += 1;
                println!("flow {}: not moved: {e}", f.flow);
            }
        }
    }
    println!(
        "{} of {} flow(s) moved from {from} to {to} in {:.1} ms",
        report.flows.len() - failed,
        report.flows.len(),
        took.as_secs_f64() * 1000.0
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
