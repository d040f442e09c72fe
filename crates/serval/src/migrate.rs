//! The migration agent: moves live streams between instances of a service on different
//! hosts (issue 10; docs/moving-flows.md §3.2, the transfer in docs/protocol.md §4.1).
//!
//! Each instance that takes part runs a [`Migrator`] beside its endpoint. A move of flow F
//! from instance A to instance B:
//!
//! 1. **Connect** (A → B): A opens a Serval stream to B's agent, to the service
//!    [`MIGRATE_SERVICE`], requiring B to prove it holds the key A was given for it (the
//!    handshake's identity, as `--peer-key`); the stream is encrypted like every other.
//! 2. **Authenticate A**: B sends a random challenge; A answers with its public key and its
//!    signature over the challenge and B's key. B accepts keys from its allow list (its own
//!    key by default: instances of one service share the key their registrations are signed
//!    with) and says so; only then is any flow touched. A snapshot carries a flow's keys, so
//!    both ends of the transfer are proven.
//! 3. **Hand-over** (A): the application holding F is asked to move it
//!    ([`Stream::move_requested`]); it calls [`Stream::hand_over`] with its state for the
//!    stream, which freezes and exports the connection.
//! 4. **Transfer and check** (A → B): the snapshot goes over the stream; B checks that it
//!    would import it (served here, flow not live, not a replay, well formed) without
//!    importing, and answers READY, or REFUSED with the reason, in which case A thaws F and
//!    it continues at A.
//! 5. **Commit** (A → B): on READY, A forgets F and says COMMIT; only then does B import it
//!    (its application gets the stream and the state from `accept`) and re-bind it toward the
//!    client with an authenticated RSYN; B answers REBOUND once the client answered (or
//!    REBIND_FAILED after [`REBIND_LIMIT`]). Stray packets for F at A get no answer.
//!
//! A failure before READY reaches A (B refuses, dies, or goes silent) leaves F running at A:
//! B never imports without COMMIT, so no two hosts ever continue one flow. Only a break
//! between A's COMMIT and B's receipt of it loses F (reported as such).
//!
//! Every phase is timed ([`Phases`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use serval_engine::connection::{Role, State as ConnState};
use serval_engine::endpoint::{EndpointConfig, PeerIdentity};
use serval_engine::frame::MoveRefusal;
use serval_keys::{PrivateKey, PublicKey};
use serval_wire::{FlowId, Locator, ServiceId, ServicePrefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::endpoint::Endpoint;
use crate::moving::Handover;
use crate::stream::Stream;

/// The service name migration agents listen on (on their own sockets, registered nowhere).
pub const MIGRATE_SERVICE: &str = "migrate.serval";

/// How long the application has to hand a stream over once asked.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(5);

/// How long the importer waits for the client to answer the re-binding RSYN.
pub const REBIND_LIMIT: Duration = Duration::from_secs(10);

/// How long connecting to, and each answer of, the other agent may take.
pub const AGENT_LIMIT: Duration = Duration::from_secs(5);

/// The largest snapshot accepted over the agent stream.
const MAX_SNAPSHOT: usize = 64 << 20;

const MAGIC: &[u8; 4] = b"SVMG";
const VERSION: u8 = 1;
const SIGNED_CONTEXT: &[u8] = b"serval migrate v1";

/// The importing agent's verdict on the other's proof.
const ACCEPTED: u8 = 0xac;
const REFUSED: u8 = 0xde;

/// Exporter → importer: a snapshot, then the commit of that move.
const MSG_SNAPSHOT: u8 = 1;
const MSG_COMMIT: u8 = 2;
/// A standby asks for the replication session (docs/protocol.md §4.3), as its first message.
pub(crate) const MSG_STANDBY: u8 = 3;
/// Exporter → importer: is this (kept) agent stream still alive? Answered PONG.
const MSG_PING: u8 = 4;

/// Importer → exporter.
const MSG_READY: u8 = 1;
const MSG_REFUSED: u8 = 2;
const MSG_REBOUND: u8 = 3;
const MSG_REBIND_FAILED: u8 = 4;
const MSG_PONG: u8 = 5;

/// How long a kept agent stream has to answer a PING before a move uses a new one.
const PING_LIMIT: Duration = Duration::from_secs(1);

/// Agent streams a migrator keeps open for later moves (to as many other agents); the oldest
/// goes when more are opened.
const KEPT_LINKS: usize = 16;

/// How a migration agent is set up.
#[derive(Clone, Debug)]
pub struct MigrationConfig {
    /// The agent's key: proves this instance to the others, in both directions.
    pub key: PrivateKey,
    /// Other keys allowed to move flows here (this instance's own key always is).
    pub allowed: Vec<PublicKey>,
    /// Where the agent's socket binds (port 0 picks one).
    pub bind: Locator,
    /// Why this instance takes no flows moved in, if it takes none (`serval expose`: each
    /// of its streams needs a TCP connection to the backend, which a snapshot does not
    /// carry). The agent still serves standby sessions and moves flows out.
    pub refuse_moves_in: Option<String>,
}

/// The time each phase of one flow's move took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// From the request until the application handed the stream over (includes `drain`
    /// and `export`).
    pub handover: Duration,
    /// Letting the stream send what it held before the freeze (the client still receives
    /// meanwhile: no pause).
    pub drain: Duration,
    /// Freezing and exporting the connection (part of `handover`).
    pub export: Duration,
    /// Sending the snapshot and hearing the new host would take it (includes its check).
    pub transfer: Duration,
    /// Importing it at the new host, after the commit.
    pub import: Duration,
    /// From the import until the client answered the new host's RSYN.
    pub rebind: Duration,
    /// From the freeze until the old host heard that the flow runs at the new one: an upper
    /// bound (by one trip between the agents) on the pause the client saw.
    pub frozen: Duration,
    /// The snapshot's size in bytes (mostly data sent and not acknowledged, and data
    /// received and not yet read by the application).
    pub snapshot_bytes: usize,
}

/// How one flow's move ended.
#[derive(Debug)]
pub struct FlowMove {
    /// The flow (its flowID at the old host).
    pub flow: FlowId,
    /// The phases, or why it did not move (the flow then runs where it was, unless the error
    /// says it was lost).
    pub result: Result<Phases, String>,
}

/// An instance's migration agent: takes streams moved here, and moves this instance's
/// streams to other agents.
#[derive(Clone, Debug)]
pub struct Migrator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ep: Endpoint,
    key: PrivateKey,
    locator: Locator,
    task: tokio::task::JoinHandle<()>,
    /// Serves the clients' move requests ([`serve_asks`]).
    asks: tokio::task::JoinHandle<()>,
    /// Clients' move requests that moved their flow, and that failed.
    asked_moved: AtomicU64,
    asked_failed: AtomicU64,
    /// Agent streams kept open after a move (or opened by [`Migrator::prepare`]) for the next
    /// move to the same agent, oldest first.
    links: std::sync::Mutex<Vec<Link>>,
}

/// An authenticated agent stream to another agent, kept for later moves.
#[derive(Debug)]
struct Link {
    to: Locator,
    to_key: PublicKey,
    stream: Stream,
    /// Moves sent on it so far (their sequence numbers go on from here).
    seq: u32,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
        self.asks.abort();
    }
}

fn service() -> ServiceId {
    ServiceId::parse(MIGRATE_SERVICE).unwrap_or(ServiceId::ZERO)
}

impl Migrator {
    /// Starts the agent for the streams of `ep`: binds its socket and takes moves from the
    /// keys `config` allows.
    pub async fn start(ep: &Endpoint, config: MigrationConfig) -> io::Result<Migrator> {
        let agent = Endpoint::bind_with(
            &[config.bind],
            EndpointConfig {
                identity: Some(config.key.clone()),
                ..EndpointConfig::default()
            },
        )
        .await?;
        let locator = agent
            .local_locators()
            .first()
            .copied()
            .ok_or_else(|| io::Error::other("the agent's endpoint has no locator"))?;
        let prefix = ServicePrefix::parse(MIGRATE_SERVICE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = agent.listen(prefix)?;
        let mut allowed = config.allowed.clone();
        allowed.push(config.key.public_key());
        // The listener holds the agent's endpoint open for as long as the task runs.
        let task = tokio::spawn(serve(
            ep.clone(),
            config.key.clone(),
            allowed,
            config.refuse_moves_in.clone(),
            listener,
        ));
        let asks = ep.take_move_asks();
        Ok(Migrator {
            inner: Arc::new_cyclic(|me| Inner {
                ep: ep.clone(),
                key: config.key,
                locator,
                task,
                asks: tokio::spawn(serve_asks(me.clone(), asks)),
                asked_moved: AtomicU64::new(0),
                asked_failed: AtomicU64::new(0),
                links: std::sync::Mutex::default(),
            }),
        })
    }

    /// Where other agents reach this one.
    pub fn locator(&self) -> Locator {
        self.inner.locator
    }

    /// The key this agent proves itself with.
    pub fn public_key(&self) -> PublicKey {
        self.inner.key.public_key()
    }

    /// Moves its clients asked for (docs/protocol.md §4.5) so far: how many moved the flow,
    /// and how many failed (the flow stayed here, or was lost if the transfer broke).
    pub fn client_moves(&self) -> (u64, u64) {
        (
            self.inner.asked_moved.load(Ordering::Relaxed),
            self.inner.asked_failed.load(Ordering::Relaxed),
        )
    }

    /// The flows a move of "every flow" takes: established streams this instance serves.
    pub fn movable_flows(&self) -> Vec<FlowId> {
        self.inner
            .ep
            .flows()
            .into_iter()
            .filter(|c| {
                c.role == Role::Server
                    && c.state == ConnState::Established
                    && c.listener.is_some()
                    && !c.exported
            })
            .map(|c| c.local_flow)
            .collect()
    }

    /// Moves `flows` (every movable flow when empty) to the agent at `to`, which must prove
    /// it holds `to_key`. One result per flow, in order; a flow that did not move runs here
    /// as before. Fails as a whole only when the other agent cannot be reached or refuses
    /// this one.
    ///
    /// Not cancel-safe: dropping the future while a flow is between its hand-over and the
    /// other agent's answer releases that flow (an exported stream is never thawed unless the
    /// move is known to have failed, so that no two hosts continue it). Run it on a task of
    /// its own when its caller may go away.
    pub async fn move_flows(
        &self,
        flows: &[FlowId],
        to: Locator,
        to_key: PublicKey,
    ) -> io::Result<Vec<FlowMove>> {
        let flows = if flows.is_empty() {
            self.movable_flows()
        } else {
            flows.to_vec()
        };
        Ok(self
            .move_each(&flows, to, to_key)
            .await?
            .into_iter()
            .map(|(flow, result)| FlowMove {
                flow,
                result: result.map_err(|e| e.to_string()),
            })
            .collect())
    }

    /// [`move_flows`](Self::move_flows) of `flows`, with each failure's kind.
    async fn move_each(
        &self,
        flows: &[FlowId],
        to: Locator,
        to_key: PublicKey,
    ) -> io::Result<Vec<(FlowId, Result<Phases, MoveError>)>> {
        let mut link = self.link(to, to_key).await?;
        let mut out = Vec::with_capacity(flows.len());
        let mut broken = false;
        for &flow in flows {
            let seq = link.seq;
            link.seq = link.seq.wrapping_add(1);
            let result = self.move_one(&mut link.stream, seq, flow).await;
            broken = matches!(&result, Err(MoveError::Channel(_)));
            out.push((flow, result));
            if broken {
                break;
            }
        }
        if broken {
            link.stream.abort();
        } else {
            self.keep(link);
        }
        Ok(out)
    }

    /// Opens an agent stream to `to` (which must prove `to_key`) and proves this agent's key,
    /// then keeps it for the next move there: the handshake, the key proofs and a new
    /// endpoint are then out of the move (they cost the old host a burst of work while it
    /// still serves the stream). A move opens one itself when none is kept; one kept that
    /// stopped answering (the other agent restarted, or 30 s idle ended it) is replaced.
    pub async fn prepare(&self, to: Locator, to_key: PublicKey) -> io::Result<()> {
        let link = self.link(to, to_key).await?;
        self.keep(link);
        Ok(())
    }

    /// A live agent stream to `to`: a kept one that answers a PING, or a new one.
    async fn link(&self, to: Locator, to_key: PublicKey) -> io::Result<Link> {
        let kept = {
            let mut links = self.lock_links();
            links
                .iter()
                .position(|l| l.to == to && l.to_key == to_key)
                .map(|i| links.remove(i))
        };
        if let Some(mut link) = kept {
            let seq = link.seq;
            link.seq = link.seq.wrapping_add(1);
            let mut ping = vec![MSG_PING];
            ping.extend_from_slice(&seq.to_be_bytes());
            ping.extend_from_slice(&0u32.to_be_bytes());
            let alive = async {
                link.stream.write_all(&ping).await?;
                read_answer(&mut link.stream, seq, PING_LIMIT).await
            };
            match tokio::time::timeout(PING_LIMIT, alive).await {
                Ok(Ok(Answer { kind: MSG_PONG, .. })) => return Ok(link),
                _ => link.stream.abort(),
            }
        }
        Ok(Link {
            to,
            to_key,
            stream: connect_agent(&self.inner.key, to, to_key).await?,
            seq: 0,
        })
    }

    fn keep(&self, link: Link) {
        let mut links = self.lock_links();
        if links.len() >= KEPT_LINKS {
            let old = links.remove(0);
            old.stream.abort();
        }
        links.push(link);
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, Vec<Link>> {
        self.inner
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn move_one(
        &self,
        stream: &mut Stream,
        seq: u32,
        flow: FlowId,
    ) -> Result<Phases, MoveError> {
        let asked = StdInstant::now();
        let handover = self.inner.ep.request_move(flow).map_err(MoveError::Local)?;
        let handover = match tokio::time::timeout(HANDOVER_LIMIT, handover).await {
            Ok(Ok(h)) => h,
            Ok(Err(_)) => {
                return Err(MoveError::Local(io::Error::other(
                    "the connection closed before the application handed it over",
                )));
            }
            Err(_) => {
                self.inner.ep.cancel_move(flow);
                return Err(MoveError::Local(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the application did not hand the stream over (does it support moves?)",
                )));
            }
        };
        let mut phases = Phases {
            handover: asked.elapsed(),
            export: handover.exported.export_time(),
            drain: handover.exported.drain_time(),
            snapshot_bytes: handover.exported.snapshot().len(),
            ..Phases::default()
        };
        let frozen_at = StdInstant::now() - phases.export;
        let snapshot = handover.exported.snapshot();
        let mut frame = Vec::with_capacity(9 + snapshot.len());
        frame.push(MSG_SNAPSHOT);
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.extend_from_slice(&(snapshot.len() as u32).to_be_bytes());
        frame.extend_from_slice(snapshot);
        let sent = StdInstant::now();
        let answer = match timed(stream.write_all(&frame)).await {
            Ok(()) => read_answer(stream, seq, AGENT_LIMIT).await,
            Err(e) => Err(e),
        };
        let Handover { exported, reply } = handover;
        match answer {
            Ok(Answer {
                kind: MSG_READY, ..
            }) => {
                phases.transfer = sent.elapsed();
                // From here on the flow is the other host's.
                exported.release();
                let _ = reply.send(Ok(()));
                let mut commit = vec![MSG_COMMIT];
                commit.extend_from_slice(&seq.to_be_bytes());
                commit.extend_from_slice(&0u32.to_be_bytes());
                if let Err(e) = timed(stream.write_all(&commit)).await {
                    return Err(MoveError::Channel(format!(
                        "the commit did not reach the other agent ({e}); the flow is lost"
                    )));
                }
            }
            Ok(Answer { message, .. }) => {
                let error = io::Error::other(format!("the other instance refused it: {message}"));
                let msg = error.to_string();
                let _ = reply.send(Err((exported.thaw(), error)));
                return Err(MoveError::Refused(msg));
            }
            Err(e) => {
                // The other host never imports without our commit: the flow resumes here.
                let error = io::Error::new(e.kind(), format!("the transfer failed: {e}"));
                let msg = error.to_string();
                let _ = reply.send(Err((exported.thaw(), error)));
                return Err(MoveError::Channel(msg));
            }
        }
        match read_answer(stream, seq, REBIND_LIMIT + AGENT_LIMIT).await {
            Ok(Answer {
                kind: MSG_REBOUND,
                first,
                second,
                ..
            }) => {
                phases.import = first;
                phases.rebind = second;
                phases.frozen = frozen_at.elapsed();
                Ok(phases)
            }
            Ok(Answer { message, .. }) => Err(MoveError::Refused(format!(
                "moved, but the client did not answer the new host: {message}"
            ))),
            Err(e) => Err(MoveError::Channel(format!(
                "committed, but the other agent's last answer was lost: {e}"
            ))),
        }
    }
}

/// After a client's requested move of a flow failed, further requests for that flow wait
/// this long (a client cannot keep this agent connecting to one address after another).
pub const ASKED_MOVE_BACKOFF: Duration = Duration::from_secs(1);

/// Moves the flows their clients ask to move (docs/protocol.md §4.5), one move per flow at a
/// time, to the agent each names, which must prove this instance's key; a move that does not
/// happen is refused to the client with its reason (again, without a new attempt, for the
/// requests of that flow in the [`ASKED_MOVE_BACKOFF`] after it).
async fn serve_asks(
    me: std::sync::Weak<Inner>,
    mut asks: tokio::sync::mpsc::Receiver<crate::asked_move::MoveAsk>,
) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    // The flows moving at a client's request (`None`), and the flows whose last request
    // failed, with until when and why.
    type Busy = HashMap<FlowId, Option<(StdInstant, MoveRefusal)>>;

    fn lock(b: &Mutex<Busy>) -> std::sync::MutexGuard<'_, Busy> {
        b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    let busy: Arc<Mutex<Busy>> = Arc::default();
    while let Some(ask) = asks.recv().await {
        let Some(inner) = me.upgrade() else {
            return;
        };
        {
            let mut busy = lock(&busy);
            let now = StdInstant::now();
            busy.retain(|_, until| until.is_none_or(|(t, _)| t > now));
            match busy.get(&ask.flow) {
                Some(None) => continue,
                Some(Some((_, why))) => {
                    inner.ep.refuse_move(ask.flow, ask.to, *why);
                    continue;
                }
                None => {
                    busy.insert(ask.flow, None);
                }
            }
        }
        let migrator = Migrator { inner };
        let busy = busy.clone();
        tokio::spawn(async move {
            let key = migrator.public_key();
            let failed = match migrator.move_each(&[ask.flow], ask.to, key).await {
                Ok(moves) => match moves.into_iter().next().map(|(_, r)| r) {
                    Some(Ok(phases)) => {
                        tracing::info!(flow = %ask.flow, to = %ask.to, ?phases, "moved a flow at its client's request");
                        None
                    }
                    Some(Err(e)) => Some((e.refusal(), e.to_string())),
                    None => Some((MoveRefusal::NotMovable, "nothing was moved".to_owned())),
                },
                Err(e) => Some((MoveRefusal::Unreachable, e.to_string())),
            };
            let counter = match failed {
                None => &migrator.inner.asked_moved,
                Some(_) => &migrator.inner.asked_failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut busy = lock(&busy);
            match failed {
                Some((why, e)) => {
                    tracing::warn!(flow = %ask.flow, to = %ask.to, error = %e, "a client's move request failed; the flow stays here");
                    migrator.inner.ep.refuse_move(ask.flow, ask.to, why);
                    busy.insert(
                        ask.flow,
                        Some((StdInstant::now() + ASKED_MOVE_BACKOFF, why)),
                    );
                }
                None => {
                    busy.remove(&ask.flow);
                }
            }
        });
    }
}

/// Opens an agent stream to `to`, requiring it to prove `to_key`, and proves `key` to it.
pub(crate) async fn connect_agent(
    key: &PrivateKey,
    to: Locator,
    to_key: PublicKey,
) -> io::Result<Stream> {
    let bind: Locator = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let client = Endpoint::bind_with(
        &[bind],
        EndpointConfig {
            peer_identity: Some(PeerIdentity::Key(to_key)),
            ..EndpointConfig::default()
        },
    )
    .await?;
    let mut stream = tokio::time::timeout(AGENT_LIMIT, client.connect_via(service(), to))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no migration agent answered at {to}"),
            )
        })??;
    let mut hello = [0u8; 4 + 1 + 32];
    timed(stream.read_exact(&mut hello)).await?;
    if &hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{to} is not a migration agent of this version"),
        ));
    }
    let mut signed = SIGNED_CONTEXT.to_vec();
    signed.extend_from_slice(&hello[5..]);
    signed.extend_from_slice(to_key.as_bytes());
    let mut proof = key.public_key().as_bytes().to_vec();
    proof.extend_from_slice(&key.sign(&signed));
    timed(stream.write_all(&proof)).await?;
    // Nothing is asked of any flow until the other agent accepted this one.
    let mut verdict = [0u8; 1];
    match timed(stream.read_exact(&mut verdict)).await {
        Ok(_) if verdict[0] == ACCEPTED => Ok(stream),
        _ => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the migration agent at {to} refused this instance's key"),
        )),
    }
}

/// Why one flow did not move.
#[derive(Debug)]
enum MoveError {
    /// Here, before anything was sent.
    Local(io::Error),
    /// The other instance said no (the flow was thawed here), or the re-bind failed.
    Refused(String),
    /// The agent stream broke: no later flow can use it.
    Channel(String),
}

impl MoveError {
    /// What a client whose request this was is told.
    fn refusal(&self) -> MoveRefusal {
        match self {
            MoveError::Local(_) => MoveRefusal::NotMovable,
            MoveError::Refused(_) => MoveRefusal::RefusedThere,
            MoveError::Channel(_) => MoveRefusal::Failed,
        }
    }
}

impl std::fmt::Display for MoveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MoveError::Local(e) => write!(f, "{e}"),
            MoveError::Refused(s) | MoveError::Channel(s) => f.write_str(s),
        }
    }
}

async fn timed<T>(f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(AGENT_LIMIT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the other agent went silent"))?
}

/// One answer of the importing agent.
struct Answer {
    kind: u8,
    /// READY, REFUSED: the check's time; REBOUND: the import's.
    first: Duration,
    /// REBOUND: the re-bind's time.
    second: Duration,
    message: String,
}

/// Reads the importing agent's answer about move `seq`, waiting at most `wait`.
async fn read_answer(stream: &mut Stream, seq: u32, wait: Duration) -> io::Result<Answer> {
    let read = async {
        let mut head = [0u8; 1 + 4 + 8 + 8 + 2];
        stream.read_exact(&mut head).await?;
        let kind = head[0];
        let got = u32::from_be_bytes(field(&head, 1));
        let first = Duration::from_micros(u64::from_be_bytes(field(&head, 5)));
        let second = Duration::from_micros(u64::from_be_bytes(field(&head, 13)));
        let len = usize::from(u16::from_be_bytes(field(&head, 21)));
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        if got != seq || !(MSG_READY..=MSG_PONG).contains(&kind) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the other agent answered out of turn",
            ));
        }
        Ok(Answer {
            kind,
            first,
            second,
            message: String::from_utf8_lossy(&msg).into_owned(),
        })
    };
    tokio::time::timeout(wait, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the other agent went silent"))?
}

/// `N` bytes of `b` from `at` (in bounds by construction of the fixed headers read here).
fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

async fn answer(
    stream: &mut Stream,
    kind: u8,
    seq: u32,
    times: [Duration; 2],
    msg: &str,
) -> io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut out = Vec::with_capacity(23 + msg.len());
    out.push(kind);
    out.extend_from_slice(&seq.to_be_bytes());
    for t in times {
        out.extend_from_slice(&(t.as_micros() as u64).to_be_bytes());
    }
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    timed(stream.write_all(&out)).await
}

/// The importing side: accepts agent streams and imports what they carry.
async fn serve(
    ep: Endpoint,
    key: PrivateKey,
    allowed: Vec<PublicKey>,
    refuse: Option<String>,
    mut listener: crate::ServiceListener,
) {
    let allowed = Arc::new(allowed);
    let refuse: Option<Arc<str>> = refuse.map(Into::into);
    // Each agent stream's task, aborted with this one (when the Migrator goes): a kept stream
    // must not outlive the agent that answered it.
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => return,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let (ep, key, allowed, refuse) = (ep.clone(), key.clone(), allowed.clone(), refuse.clone());
        streams.spawn(async move {
            let peer = stream
                .peer_locator()
                .map_or_else(|_| "?".into(), |p| p.to_string());
            if let Err(e) = take_moves(ep, key, &allowed, refuse.as_deref(), stream).await {
                tracing::info!(%peer, error = %e, "migration agent stream ended");
            }
        });
    }
}

async fn take_moves(
    ep: Endpoint,
    key: PrivateKey,
    allowed: &[PublicKey],
    refuse: Option<&str>,
    mut stream: Stream,
) -> io::Result<()> {
    let mut challenge = [0u8; 32];
    getrandom::fill(&mut challenge).map_err(|e| io::Error::other(e.to_string()))?;
    let mut hello = MAGIC.to_vec();
    hello.push(VERSION);
    hello.extend_from_slice(&challenge);
    timed(stream.write_all(&hello)).await?;
    let mut proof = [0u8; 32 + 64];
    timed(stream.read_exact(&mut proof)).await?;
    let mut peer_key = [0u8; 32];
    peer_key.copy_from_slice(&proof[..32]);
    let peer_key = PublicKey(peer_key);
    let mut signed = SIGNED_CONTEXT.to_vec();
    signed.extend_from_slice(&challenge);
    signed.extend_from_slice(key.public_key().as_bytes());
    if !allowed.contains(&peer_key) || peer_key.verify(&signed, &proof[32..]).is_err() {
        let _ = timed(stream.write_all(&[REFUSED])).await;
        let _ = stream.shutdown().await;
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refused an agent with key {peer_key}: not allowed to move flows here"),
        ));
    }
    timed(stream.write_all(&[ACCEPTED])).await?;
    loop {
        let mut head = [0u8; 9];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if head[0] == MSG_STANDBY {
            return crate::standby::replicate_to(ep, stream).await;
        }
        let seq = u32::from_be_bytes(field(&head, 1));
        if head[0] == MSG_PING {
            answer(&mut stream, MSG_PONG, seq, [Duration::ZERO; 2], "").await?;
            continue;
        }
        let len = u32::from_be_bytes(field(&head, 5)) as usize;
        if head[0] != MSG_SNAPSHOT || len > MAX_SNAPSHOT {
            stream.abort();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected a snapshot of at most the agent's limit",
            ));
        }
        let mut snapshot = vec![0u8; len];
        timed(stream.read_exact(&mut snapshot)).await?;
        let started = StdInstant::now();
        let checked = match refuse {
            Some(why) => Err(why.to_owned()),
            None => ep.check_import(&snapshot).map_err(|e| e.to_string()),
        };
        let check = started.elapsed();
        if let Err(e) = checked {
            answer(
                &mut stream,
                MSG_REFUSED,
                seq,
                [check, Duration::ZERO],
                &e.to_string(),
            )
            .await?;
            continue;
        }
        answer(&mut stream, MSG_READY, seq, [check, Duration::ZERO], "").await?;
        // Nothing is imported until the exporter has let go of the flow.
        let mut commit = [0u8; 9];
        timed(stream.read_exact(&mut commit)).await?;
        if commit[0] != MSG_COMMIT || u32::from_be_bytes(field(&commit, 1)) != seq {
            stream.abort();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected the commit of the move just checked",
            ));
        }
        let started = StdInstant::now();
        let imported = ep.import_to_listener(&snapshot);
        let import = started.elapsed();
        let rebinding = StdInstant::now();
        let rebound = match imported {
            Ok((flow, rebound)) => {
                tracing::info!(%flow, ?import, "imported a moved stream");
                rebound
            }
            Err(e) => {
                // Checked a moment ago: only a listener closed meanwhile gets here.
                let why = format!("the import failed after the commit: {e}");
                answer(
                    &mut stream,
                    MSG_REBIND_FAILED,
                    seq,
                    [import, Duration::ZERO],
                    &why,
                )
                .await?;
                continue;
            }
        };
        let (kind, why) = match tokio::time::timeout(REBIND_LIMIT, rebound).await {
            Ok(Ok(_)) => (MSG_REBOUND, ""),
            Ok(Err(_)) => (MSG_REBIND_FAILED, "the connection closed"),
            Err(_) => (MSG_REBIND_FAILED, "no answer from the client"),
        };
        answer(&mut stream, kind, seq, [import, rebinding.elapsed()], why).await?;
    }
}
