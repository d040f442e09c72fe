//! Hot standby (issue 10; docs/moving-flows.md §3.3, the session in docs/protocol.md §4.3).
//!
//! A standby instance holds a copy of every replicated stream of its primary, so that when
//! the primary dies (SIGKILL, host gone) it takes each one over by RSYN and the client loses
//! nothing and gets nothing twice.
//!
//! **The application's part.** A replicated stream moves in *steps*: the application reads,
//! then calls [`Stream::commit`] with its state (what it did with every byte it read so far)
//! and the bytes that step produced. A standby resumes a stream exactly after a step: with
//! that state, at those stream positions, with whatever of the step's output had not been
//! sent yet. A stream is replicated from its first `commit`.
//!
//! **The runtime's part.** The primary checkpoints a stream (the engine's snapshot of the
//! connection, plus the state and the unsent output of the last step) at each `commit`, and
//! between steps whenever it holds output and the application is not half way through one.
//! Its engine holds every datagram of a replicated connection until the standby has
//! confirmed a checkpoint that covers it (the output-commit rule: nothing the client sees —
//! an acknowledgement, a byte — comes from state the standby does not hold). One checkpoint
//! per stream is on its way at a time; the next covers everything since.
//!
//! **The session.** The standby opens it to the primary's migration agent
//! ([`Migrator`](crate::Migrator)), both ends proving their keys as for a move. The primary
//! then sends checkpoints, FORGETs for streams that ended, and a heartbeat every
//! [`HEARTBEAT`] when it has nothing else to say; the standby confirms each checkpoint and
//! sends its own heartbeat. A standby that hears nothing for its detection time
//! ([`StandbyConfig::detect`]), or sees the session end, takes every stream over: it tells
//! the primary (in case it is alive after all: it then lets the streams go without a word)
//! and imports each stream's latest checkpoint. A primary that hears nothing from its
//! standby for [`STANDBY_LOST`] drops what it held (the standby may have taken over and be
//! sending those packet numbers), moves its packet numbers out of the standby's way and
//! continues unreplicated.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use serval_engine::connection::State as ConnState;
use serval_engine::endpoint::{Checkpoint, CommitMark, ConnectionHandle};
use serval_engine::snapshot::StreamCover;
use serval_engine::snapshot::delta::Replica;
use serval_keys::{PrivateKey, PublicKey};
use serval_wire::{FlowId, Locator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::endpoint::{Endpoint, State};
use crate::stream::Stream;

/// How often each end of a standby session speaks when it has nothing else to say.
pub const HEARTBEAT: Duration = Duration::from_millis(5);

/// A standby's default detection time: this long without a word from the primary, it takes
/// the streams over.
pub const DEFAULT_DETECT: Duration = Duration::from_millis(30);

/// A primary that hears nothing from its standby for this long stops replicating: it drops
/// what it held, moves its packet numbers out of the standby's way
/// (`serval_engine::endpoint::Endpoint::standby_lost`) and continues alone. Far longer than
/// any standby's detection time, so that a standby that took over has told the primary (or
/// is dead) by then.
pub const STANDBY_LOST: Duration = Duration::from_secs(1);

/// How long a standby waits for its primary's first word before giving up on the session
/// (it takes nothing over: it never held anything).
pub const SESSION_SETUP: Duration = Duration::from_secs(5);

/// How long a standby whose threshold just passed waits for words already on their way
/// before taking over: long enough for its runtime to read its sockets after a stall of its
/// own, and it adds that much to every true detection.
const RECHECK: Duration = Duration::from_millis(1);

/// The window over which a standby remembers the longest silence it has seen between two
/// words of a live primary.
const GAP_WINDOW: Duration = Duration::from_secs(1);

/// When a standby decides its primary is dead: after its detection time without a word, or
/// twice the longest silence a live primary kept in the last second or two if that is
/// longer (a loaded host's scheduling stalls are not deaths), never beyond half of
/// [`STANDBY_LOST`] (so that the primary, still waiting for its standby, hears of the
/// takeover before it would continue alone).
#[derive(Debug)]
struct Detector {
    detect: Duration,
    /// Whether the primary has said anything yet.
    spoke: bool,
    /// Its last word (the session's start before the first).
    last: StdInstant,
    /// The longest silence between two words in the current window and the one before.
    gaps: [Duration; 2],
    window: StdInstant,
}

impl Detector {
    fn new(detect: Duration, now: StdInstant) -> Detector {
        Detector {
            detect,
            spoke: false,
            last: now,
            gaps: [Duration::ZERO; 2],
            window: now,
        }
    }

    /// The primary spoke at `now`.
    fn heard(&mut self, now: StdInstant) {
        if now.duration_since(self.window) >= GAP_WINDOW {
            self.gaps = [Duration::ZERO, self.gaps[0]];
            self.window = now;
        }
        if self.spoke {
            self.gaps[0] = self.gaps[0].max(now.duration_since(self.last));
        }
        self.spoke = true;
        self.last = now;
    }

    /// How long the primary has been silent at `now`.
    fn silence(&self, now: StdInstant) -> Duration {
        now.duration_since(self.last)
    }

    /// The silence after which the primary is taken for dead; `None` before its first word
    /// (the session is not up yet).
    fn threshold(&self) -> Option<Duration> {
        if !self.spoke {
            return None;
        }
        let t = self.detect.max(2 * self.gaps[0].max(self.gaps[1]));
        Some(t.min(self.detect.max(STANDBY_LOST / 2)))
    }
}

/// The largest checkpoint a session carries.
const MAX_CHECKPOINT: usize = 64 << 20;

/// Primary → standby.
const P_CHECKPOINT: u8 = 1;
const P_FORGET: u8 = 2;
const P_HEARTBEAT: u8 = 3;
const P_REFUSED: u8 = 4;
/// Standby → primary.
const S_CONFIRM: u8 = 1;
const S_TAKEOVER: u8 = 2;
const S_HEARTBEAT: u8 = 3;

/// A replicated stream's runtime side (in its connection's slot).
#[derive(Debug, Default)]
pub(crate) struct StreamReplica {
    /// The application's state at its last [`Stream::commit`]; `None` before the first.
    pub(crate) state: Option<Vec<u8>>,
    /// The application read or wrote outside a step since its last commit: no checkpoint
    /// can be taken until the next one.
    pub(crate) dirty: bool,
    /// Output of the last steps not yet in the engine's send buffer.
    pub(crate) out: Vec<u8>,
    /// Steps (commits) made so far.
    pub(crate) steps: u64,
    /// Steps covered by a checkpoint the standby confirmed.
    pub(crate) confirmed: u64,
    /// Tasks waiting in [`Stream::replicated`].
    pub(crate) waiting: Vec<std::task::Waker>,
    /// The standby took this stream over and this end let it go ([`Stream::taken_over`]).
    pub(crate) taken_over: bool,
}

impl StreamReplica {
    /// Wakes the tasks waiting for a confirmation (one came, or the standby went away).
    pub(crate) fn wake_waiting(&mut self) {
        for w in self.waiting.drain(..) {
            w.wake();
        }
    }

    /// Moves what fits of the pending output into the connection's send buffer.
    pub(crate) fn drain(
        &mut self,
        engine: &mut serval_engine::endpoint::Endpoint,
        h: ConnectionHandle,
    ) {
        if self.out.is_empty() {
            return;
        }
        if let Ok(n) = engine.write(h, &self.out)
            && n > 0
        {
            self.out.drain(..n);
        }
    }

    /// The APP block of a checkpoint: the state's length, the state, then the unsent output.
    fn app_blob(&self) -> Vec<u8> {
        let state = self.state.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(4 + state.len() + self.out.len());
        out.extend_from_slice(&(state.len() as u32).to_be_bytes());
        out.extend_from_slice(state);
        out.extend_from_slice(&self.out);
        out
    }
}

/// Splits a standby checkpoint's APP block into the state and the unsent output.
pub(crate) fn split_app_blob(blob: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (len, rest) = blob.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    (rest.len() >= len).then(|| (rest[..len].to_vec(), rest[len..].to_vec()))
}

/// The primary's replication state, while a standby is attached.
#[derive(Debug)]
pub(crate) struct Primary {
    /// Wakes the session task: a checkpoint is ready, or output is held.
    pub(crate) notify: Arc<Notify>,
    /// Checkpoints taken at commits, for the session to send, with the steps each covers.
    ready: Vec<(ConnectionHandle, Checkpoint, u64)>,
    /// Streams with a checkpoint on its way.
    in_flight: HashSet<ConnectionHandle>,
    /// What the last checkpoint taken of each stream carried: the next is a delta since it
    /// (docs/snapshot.md §5). Checkpoints go out in the order taken, and the standby
    /// applies them in that order.
    covers: HashMap<ConnectionHandle, StreamCover>,
}

impl Primary {
    /// Whether stream `h` could use a checkpoint now: none on its way or waiting to go.
    fn free(&self, h: ConnectionHandle) -> bool {
        !self.in_flight.contains(&h) && !self.ready.iter().any(|(r, _, _)| *r == h)
    }
}

impl State {
    /// Wakes the standby session if a replicated stream held output since it last looked.
    pub(crate) fn held_output_news(&self) {
        if let Some(p) = &self.primary
            && self.engine.has_new_held()
        {
            p.notify.notify_one();
        }
    }

    /// Takes a checkpoint of stream `h` for the standby if one is attached, the stream has
    /// none on its way, and its application is between steps. Returns whether it did.
    pub(crate) fn checkpoint_for_standby(&mut self, h: ConnectionHandle) -> bool {
        let now = self.now();
        let State {
            engine,
            conns,
            primary,
            ..
        } = self;
        let (Some(p), Some(slot)) = (primary.as_mut(), conns.get(&h)) else {
            return false;
        };
        if slot.replica.state.is_none() || slot.replica.dirty || slot.exported || !p.free(h) {
            return false;
        }
        match engine.checkpoint(h, now, &slot.replica.app_blob(), p.covers.get(&h).copied()) {
            Ok(cp) => {
                p.covers.insert(h, cp.cover);
                p.ready.push((h, cp, slot.replica.steps));
                p.notify.notify_one();
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "no checkpoint of a stream (closed, or moving)");
                false
            }
        }
    }
}

impl Endpoint {
    /// Whether a hot standby is attached: it holds a copy of this endpoint's replicated
    /// streams, and their output waits for its confirmations. Stays true for up to
    /// [`STANDBY_LOST`] after the session broke (the standby may have taken over).
    pub fn has_standby(&self) -> bool {
        self.shared.lock().primary.is_some()
    }
}

impl Stream {
    /// One step of a replicated stream: `app_state` is what the application did with every
    /// byte it read from this stream so far, and `output` what that produced, to send. A hot
    /// standby that takes the stream over resumes right after the last step: its application
    /// gets `app_state` (from [`take_app_state`](Self::take_app_state)), and the stream sends
    /// whatever of `output` had not been sent. Returns once `output` is in the send buffer
    /// (at once when it is empty).
    ///
    /// Without a standby this is a `write_all` that also records the state (cheap). With one,
    /// a stream is replicated from its first commit (make it before reading anything), and
    /// reads or writes outside steps keep it from being checkpointed until the next commit.
    pub async fn commit(&self, app_state: &[u8], output: &[u8]) -> io::Result<()> {
        {
            let mut st = self.shared().lock();
            let h = self.handle();
            let State { engine, conns, .. } = &mut *st;
            let slot = conns
                .get_mut(&h)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
            if let Some(reason) = &slot.closed {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("the stream is closed ({reason:?})"),
                ));
            }
            slot.replica.state = Some(app_state.to_vec());
            slot.replica.dirty = false;
            slot.replica.steps += 1;
            slot.replica.out.extend_from_slice(output);
            slot.replica.drain(engine, h);
            st.checkpoint_for_standby(h);
        }
        self.shared().wake.notify_one();
        if output.is_empty() {
            // A step that only records state waits for no earlier step's output: an
            // application serving both directions records its reads while the other
            // direction's output is held back by the peer.
            return Ok(());
        }
        // Backpressure: wait until the step's output is in the send buffer.
        std::future::poll_fn(|cx| {
            let mut st = self.shared().lock();
            let h = self.handle();
            let State { engine, conns, .. } = &mut *st;
            let Some(slot) = conns.get_mut(&h) else {
                return std::task::Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            slot.replica.drain(engine, h);
            if slot.replica.out.is_empty() {
                return std::task::Poll::Ready(Ok(()));
            }
            if slot.closed.is_some() {
                return std::task::Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
            slot.write = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    /// Whether the hot standby took this stream over while this end was alive (it judged
    /// the primary dead): the stream then reads as reset here, and its application must
    /// leave whatever else the stream is tied to as it is, for the standby to continue
    /// (`serval expose` leaves the backend connection open rather than resetting it).
    pub fn taken_over(&self) -> bool {
        let st = self.shared().lock();
        st.conns
            .get(&self.handle())
            .is_some_and(|c| c.replica.taken_over)
    }

    /// How many steps ([`commit`](Self::commit)s) this stream has made: the number to give
    /// [`replicated`](Self::replicated).
    pub fn committed_steps(&self) -> u64 {
        let st = self.shared().lock();
        st.conns.get(&self.handle()).map_or(0, |c| c.replica.steps)
    }

    /// How many of this stream's steps the hot standby holds (a checkpoint it confirmed
    /// covers them); all of them when no standby is attached. See
    /// [`replicated`](Self::replicated).
    pub fn replicated_steps(&self) -> u64 {
        let st = self.shared().lock();
        let attached = st.primary.is_some();
        st.conns.get(&self.handle()).map_or(0, |c| {
            // A stream taken over is no longer attached either: none of its later steps
            // is this end's to act on.
            if attached || c.closed.is_some() {
                c.replica.confirmed
            } else {
                c.replica.steps
            }
        })
    }

    /// Waits until the hot standby holds this stream as of its first `step` steps (a
    /// checkpoint it confirmed covers them); at once when no standby is attached, or once it
    /// went away without taking the stream over. What a step produced may be acted on for
    /// good then (`serval expose` consumes a backend's bytes from the socket only once the
    /// step that sends them is replicated). Fails once the stream is closed (or taken over).
    pub async fn replicated(&self, step: u64) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared().lock();
            let attached = st.primary.is_some();
            let Some(slot) = st.conns.get_mut(&self.handle()) else {
                return std::task::Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            // Closed first: a stream the standby took over is no longer attached to it
            // either, and nothing of it may be acted on here any more.
            if let Some(reason) = &slot.closed {
                return std::task::Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("the stream is closed ({reason:?})"),
                )));
            }
            if !attached || slot.replica.confirmed >= step {
                return std::task::Poll::Ready(Ok(()));
            }
            // A task polled again before a confirmation came (a `select!` that loops) is
            // registered once.
            let waiting = &mut slot.replica.waiting;
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Frames of a session, read from a byte stream that may split them anywhere.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    /// Where the next frame starts: frames taken are dropped from the buffer at the next
    /// read, not one by one (each drop moves what is behind it).
    start: usize,
}

impl Frames {
    /// Reads more (cancel-safe: what was read stays in the buffer).
    async fn fill(&mut self, stream: &Stream) -> io::Result<()> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Straight into the buffer's spare room: no bytes are copied on their way in.
        self.buf.reserve(64 * 1024);
        let n = (&mut &*stream).read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other end closed the session",
            ));
        }
        Ok(())
    }

    /// The next whole frame, if the buffer holds one: its kind and where its body is (for
    /// [`body`](Self::body), until the next [`fill`](Self::fill)). `len` tells, for a kind
    /// and the bytes after it, how long the frame is (`None`: not known yet).
    fn next(
        &mut self,
        len: impl Fn(u8, &[u8]) -> io::Result<Option<usize>>,
    ) -> io::Result<Option<(u8, core::ops::Range<usize>)>> {
        let Some((&kind, rest)) = self.buf[self.start..].split_first() else {
            return Ok(None);
        };
        let Some(n) = len(kind, rest)? else {
            return Ok(None);
        };
        if rest.len() < n {
            return Ok(None);
        }
        let body = self.start + 1..self.start + 1 + n;
        self.start = body.end;
        Ok(Some((kind, body)))
    }

    /// A frame's body, as [`next`](Self::next) found it.
    fn body(&self, at: core::ops::Range<usize>) -> &[u8] {
        &self.buf[at]
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

/// The length of a primary's frame after its kind byte.
fn primary_frame(kind: u8, rest: &[u8]) -> io::Result<Option<usize>> {
    match kind {
        P_CHECKPOINT => {
            if rest.len() < 16 {
                return Ok(None);
            }
            let len = be_u32(rest, 12) as usize;
            if len > MAX_CHECKPOINT {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a checkpoint larger than a session carries",
                ));
            }
            Ok(Some(16 + len))
        }
        P_FORGET => Ok(Some(8)),
        P_HEARTBEAT => Ok(Some(0)),
        P_REFUSED => Ok(rest
            .first_chunk::<2>()
            .map(|l| 2 + usize::from(u16::from_be_bytes(*l)))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame {kind} from the primary"),
        )),
    }
}

/// The length of a standby's frame after its kind byte.
fn standby_frame(kind: u8, _rest: &[u8]) -> io::Result<Option<usize>> {
    match kind {
        S_CONFIRM => Ok(Some(4)),
        S_TAKEOVER | S_HEARTBEAT => Ok(Some(0)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame {kind} from the standby"),
        )),
    }
}

/// The primary's side of a session, on the migration agent's stream once the standby proved
/// its key and asked (docs/protocol.md §4.3). Returns when the session ends; the primary then
/// runs unreplicated.
pub(crate) async fn replicate_to(ep: Endpoint, stream: Stream) -> io::Result<()> {
    let notify = Arc::new(Notify::new());
    let attached = {
        let mut st = ep.shared.lock();
        let free = st.primary.is_none();
        if free {
            st.primary = Some(Primary {
                notify: notify.clone(),
                ready: Vec::new(),
                in_flight: HashSet::new(),
                covers: HashMap::new(),
            });
            st.engine.set_output_hold(true);
        }
        free
    };
    if !attached {
        let msg = b"this instance has a standby already";
        let mut frame = vec![P_REFUSED];
        frame.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        frame.extend_from_slice(msg);
        let _ = (&stream).write_all(&frame).await;
        let _ = (&stream).shutdown().await;
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "refused a second standby",
        ));
    }
    tracing::info!("a standby attached: replicating");
    let mut session = PrimarySession {
        ep: ep.clone(),
        stream,
        notify,
        sent: HashMap::new(),
        replicated: HashMap::new(),
        next_seq: 0,
        heard: StdInstant::now(),
    };
    let result = session.run().await;
    if result.is_err() {
        // The session broke without a TAKEOVER: the standby may be dead, or may have taken
        // over with its word lost. Hold on (nothing it did not confirm leaves) until it has
        // been silent for STANDBY_LOST, then continue alone.
        tokio::time::sleep_until((session.heard + STANDBY_LOST).into()).await;
    }
    // Continue alone. After a TAKEOVER the replicated streams are gone already. Without
    // one, the standby may serve them too (a partition between the two): what was held is
    // dropped rather than released and the packet numbers jump, so that nothing sealed
    // here repeats a nonce of the standby's (`Endpoint::standby_lost`).
    {
        let mut st = ep.shared.lock();
        st.primary = None;
        // Nothing waits for a standby's confirmation any more.
        for slot in st.conns.values_mut() {
            slot.replica.wake_waiting();
        }
        if result.is_err() {
            st.engine.standby_lost();
        } else {
            st.engine.set_output_hold(false);
        }
    }
    ep.shared.wake.notify_one();
    result
}

struct PrimarySession {
    ep: Endpoint,
    stream: Stream,
    notify: Arc<Notify>,
    /// Checkpoints on their way, by sequence number, with the steps each covers.
    sent: HashMap<u32, (ConnectionHandle, CommitMark, u64)>,
    /// Streams the standby holds, with their flowIDs.
    replicated: HashMap<ConnectionHandle, FlowId>,
    next_seq: u32,
    /// When the standby last said anything.
    heard: StdInstant,
}

impl PrimarySession {
    async fn run(&mut self) -> io::Result<()> {
        let mut frames = Frames::default();
        let mut spoke = StdInstant::now();
        loop {
            let out = self.collect();
            if !out.is_empty() || spoke.elapsed() >= HEARTBEAT {
                let out = if out.is_empty() {
                    vec![vec![P_HEARTBEAT]]
                } else {
                    out
                };
                // A dead standby stops taking what is written: the write must not outlast
                // STANDBY_LOST, or the primary would hold its streams' output until the
                // session stream's idle timeout.
                let left = STANDBY_LOST.saturating_sub(self.heard.elapsed());
                let write = async {
                    for piece in &out {
                        (&self.stream).write_all(piece).await?;
                    }
                    io::Result::Ok(())
                };
                tokio::time::timeout(left, write).await.map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the standby stopped taking checkpoints: continuing unreplicated",
                    )
                })??;
                spoke = StdInstant::now();
            }
            let notified = self.notify.notified();
            // Reading first: after a long write, what the standby said meanwhile is waiting,
            // and its silence is judged only once that is read.
            tokio::select! {
                biased;
                r = frames.fill(&self.stream) => {
                    r?;
                    self.heard = StdInstant::now();
                    while let Some((kind, at)) = frames.next(standby_frame)? {
                        let body = frames.body(at);
                        match kind {
                            S_CONFIRM => self.confirmed(be_u32(body, 0)),
                            S_TAKEOVER => {
                                self.let_go();
                                return Ok(());
                            }
                            _ => {}
                        }
                    }
                }
                () = notified => {}
                () = tokio::time::sleep(HEARTBEAT) => {}
            }
            if self.heard.elapsed() > STANDBY_LOST {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the standby went silent: continuing unreplicated",
                ));
            }
        }
    }

    /// Frames to send now, in pieces to write one after the other (a checkpoint's snapshot
    /// is written as it was taken, not copied behind its head first): checkpoints ready or
    /// due, FORGETs of streams that ended.
    fn collect(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut st = self.ep.shared.lock();
        // Streams holding output, and streams the standby does not hold yet.
        let mut due = Vec::new();
        st.engine.take_held(&mut due);
        due.extend(
            st.conns
                .iter()
                .filter(|(h, slot)| {
                    slot.replica.state.is_some() && !self.replicated.contains_key(h)
                })
                .map(|(h, _)| *h),
        );
        for h in due {
            st.checkpoint_for_standby(h);
        }
        let ready = st
            .primary
            .as_mut()
            .map(|p| std::mem::take(&mut p.ready))
            .unwrap_or_default();
        for (h, cp, steps) in ready {
            let Some(info) = st.engine.connection_info(h) else {
                continue;
            };
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            let mut head = Vec::with_capacity(17);
            head.push(P_CHECKPOINT);
            head.extend_from_slice(&seq.to_be_bytes());
            head.extend_from_slice(&info.local_flow.0.to_be_bytes());
            head.extend_from_slice(&(cp.snapshot.len() as u32).to_be_bytes());
            out.push(head);
            out.push(cp.snapshot);
            self.sent.insert(seq, (h, cp.mark, steps));
            self.replicated.insert(h, info.local_flow);
            if let Some(p) = st.primary.as_mut() {
                p.in_flight.insert(h);
            }
        }
        // Streams that ended here (closed, or in TIME-WAIT: everything delivered both ways,
        // nothing left to take over), or moved to another host.
        let gone: Vec<(ConnectionHandle, FlowId)> = self
            .replicated
            .iter()
            .filter(|(h, _)| {
                st.engine.connection_info(**h).is_none_or(|c| {
                    c.exported || matches!(c.state, ConnState::Closed | ConnState::TimeWait)
                })
            })
            .map(|(h, f)| (*h, *f))
            .collect();
        for (h, flow) in gone {
            self.replicated.remove(&h);
            if let Some(p) = st.primary.as_mut() {
                p.covers.remove(&h);
            }
            let mut forget = vec![P_FORGET];
            forget.extend_from_slice(&flow.0.to_be_bytes());
            out.push(forget);
        }
        out
    }

    /// The standby holds checkpoint `seq`: release the output it covers.
    fn confirmed(&mut self, seq: u32) {
        let Some((h, mark, steps)) = self.sent.remove(&seq) else {
            return;
        };
        let mut st = self.ep.shared.lock();
        st.engine.commit(h, mark);
        if let Some(p) = st.primary.as_mut() {
            p.in_flight.remove(&h);
        }
        let later_steps = match st.conns.get_mut(&h) {
            Some(slot) => {
                slot.replica.confirmed = slot.replica.confirmed.max(steps);
                slot.replica.wake_waiting();
                slot.replica.steps > steps
            }
            None => false,
        };
        // Output held since that checkpoint, or steps made since, need the next one.
        if later_steps || st.engine.held(h) > 0 {
            st.checkpoint_for_standby(h);
        }
        drop(st);
        self.ep.shared.wake.notify_one();
    }

    /// The standby took the streams over (it thought this primary dead): let every
    /// replicated stream go without a word, as after a move, and drop what they held.
    fn let_go(&mut self) {
        let mut st = self.ep.shared.lock();
        let now = st.now();
        let n = self.replicated.len();
        for (h, _) in self.replicated.drain() {
            if st.engine.export(h, now).is_ok() {
                st.engine.release_exported(h);
            }
            if let Some(slot) = st.conns.get_mut(&h) {
                slot.closed = Some(serval_engine::endpoint::CloseReason::Reset);
                slot.replica.taken_over = true;
                slot.replica.wake_waiting();
                for w in [slot.read.take(), slot.write.take(), slot.close.take()]
                    .into_iter()
                    .flatten()
                {
                    w.wake();
                }
            }
        }
        tracing::warn!(streams = n, "the standby took this instance's streams over");
    }
}

/// How a standby reaches its primary.
#[derive(Clone, Debug)]
pub struct StandbyConfig {
    /// This instance's key, proven to the primary's agent (which must allow it, as for
    /// moves: the same key by default).
    pub key: PrivateKey,
    /// The primary's migration agent.
    pub primary: Locator,
    /// The key the primary's agent must prove.
    pub primary_key: PublicKey,
    /// How long without a word from the primary before taking over
    /// ([`DEFAULT_DETECT`]).
    pub detect: Duration,
}

/// What a standby did when its primary went away.
#[derive(Debug)]
pub struct Takeover {
    /// Why it took over (silence, or how the session ended).
    pub reason: String,
    /// How long it had heard nothing from the primary when it decided.
    pub silence: Duration,
    /// Streams taken over (imported and re-binding toward their clients).
    pub streams: usize,
    /// Streams whose checkpoint did not import, with why.
    pub failed: Vec<(FlowId, String)>,
    /// How long the imports took.
    pub import: Duration,
    /// Checkpoints received over the session.
    pub checkpoints: u64,
}

/// Runs `ep` as the hot standby of the primary `config` names: holds a copy of its streams
/// until it goes away, then takes them over (they arrive at the listener serving their
/// service, as streams moved here do, with their state). Fails at once if the primary's
/// agent cannot be reached, refuses this instance, or has a standby already.
pub async fn run_standby(ep: &Endpoint, config: StandbyConfig) -> io::Result<Takeover> {
    let stream =
        crate::migrate::connect_agent(&config.key, config.primary, config.primary_key).await?;
    // Ask for the session: a head as for a snapshot, of kind STANDBY.
    let mut ask = vec![crate::migrate::MSG_STANDBY];
    ask.extend_from_slice(&[0u8; 8]);
    (&stream).write_all(&ask).await?;
    let mut latest: HashMap<FlowId, Replica> = HashMap::new();
    let mut frames = Frames::default();
    let mut detector = Detector::new(config.detect, StdInstant::now());
    let mut spoke = StdInstant::now();
    let mut checkpoints = 0u64;
    let mut first = true;
    let reason = loop {
        let now = StdInstant::now();
        let threshold = detector.threshold();
        let wait = threshold
            .unwrap_or(SESSION_SETUP)
            .saturating_sub(detector.silence(now));
        let r =
            tokio::time::timeout(wait.max(Duration::from_micros(100)), frames.fill(&stream)).await;
        // The threshold crossed may be this process's own stall (descheduled, stopped): what
        // the primary said meanwhile then waits in the socket, not yet taken in. Give the
        // runtime a moment to read it before judging.
        let r = match (r, threshold) {
            (Err(_), Some(t)) if detector.silence(StdInstant::now()) >= t => {
                tokio::time::timeout(RECHECK, frames.fill(&stream)).await
            }
            (r, _) => r,
        };
        let now = StdInstant::now();
        match (r, threshold) {
            // Until the primary's first word the session is not up: nothing to take over.
            (Err(_), None) if detector.silence(now) >= SESSION_SETUP => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the primary's agent did not start the standby session within \
                         {SESSION_SETUP:?}"
                    ),
                ));
            }
            (Err(_), Some(t)) if detector.silence(now) >= t => {
                break format!(
                    "no word from the primary for {:.1} ms (the limit then: {:.1} ms)",
                    detector.silence(now).as_secs_f64() * 1e3,
                    t.as_secs_f64() * 1e3
                );
            }
            (Err(_), _) => {}
            (Ok(Err(e)), _) if first => return Err(e),
            (Ok(Err(e)), _) => break format!("the session ended: {e}"),
            (Ok(Ok(())), _) => detector.heard(now),
        }
        let mut answer = Vec::new();
        loop {
            let frame = match frames.next(primary_frame) {
                Ok(f) => f,
                Err(e) => return Err(e),
            };
            let Some((kind, at)) = frame else { break };
            let body = frames.body(at);
            first = false;
            match kind {
                P_CHECKPOINT => {
                    let seq = be_u32(body, 0);
                    let flow = FlowId(be_u64(body, 4));
                    let checkpoint = &body[16..];
                    let applied = match latest.get_mut(&flow) {
                        Some(r) => r.apply(checkpoint),
                        None => Replica::new(checkpoint).map(|r| {
                            latest.insert(flow, r);
                        }),
                    };
                    // Confirming a checkpoint not held would release output the standby
                    // could not continue from: end the session instead (the primary then
                    // continues unreplicated).
                    if let Err(e) = applied {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("a checkpoint from the primary did not apply: {e}"),
                        ));
                    }
                    checkpoints += 1;
                    answer.push(S_CONFIRM);
                    answer.extend_from_slice(&seq.to_be_bytes());
                }
                P_FORGET => {
                    latest.remove(&FlowId(be_u64(body, 0)));
                }
                P_REFUSED => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "the primary refused this standby: {}",
                            String::from_utf8_lossy(body.get(2..).unwrap_or_default())
                        ),
                    ));
                }
                _ => {}
            }
        }
        if answer.is_empty() && spoke.elapsed() >= HEARTBEAT {
            answer.push(S_HEARTBEAT);
        }
        if !answer.is_empty() {
            (&stream).write_all(&answer).await?;
            spoke = StdInstant::now();
        }
    };
    let silence = detector.silence(StdInstant::now());
    // If the primary is alive after all, it lets the streams go on this word (and it holds
    // back anything this standby never confirmed in any case).
    // The session stays open a while, read and discarded, so that a primary blocked sending
    // a checkpoint gets to read the word rather than a reset (which it must treat as
    // "maybe taken over, maybe dead": it then holds everything for STANDBY_LOST).
    tokio::spawn(async move {
        let _ = tokio::time::timeout(5 * STANDBY_LOST, async {
            (&stream).write_all(&[S_TAKEOVER]).await?;
            let mut sink = vec![0u8; 64 * 1024];
            while (&mut &stream).read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
    });
    let started = StdInstant::now();
    let mut streams = 0;
    let mut failed = Vec::new();
    for (flow, replica) in latest {
        let snapshot = match replica.snapshot() {
            Ok(s) => s,
            Err(e) => {
                failed.push((flow, e.to_string()));
                continue;
            }
        };
        match ep.import_standby_to_listener(&snapshot) {
            Ok(_) => streams += 1,
            Err(e) => failed.push((flow, e.to_string())),
        }
    }
    Ok(Takeover {
        reason,
        silence,
        streams,
        failed,
        import: started.elapsed(),
        checkpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_threshold_before_the_first_word() {
        let t0 = StdInstant::now();
        let d = Detector::new(30 * MS, t0);
        assert_eq!(d.threshold(), None);
    }

    #[test]
    fn a_steady_primary_is_held_to_the_detection_time() {
        let t0 = StdInstant::now();
        let mut d = Detector::new(30 * MS, t0);
        let mut t = t0;
        d.heard(t);
        assert_eq!(d.threshold(), Some(30 * MS));
        while t < t0 + 3 * GAP_WINDOW {
            t += 5 * MS;
            d.heard(t);
        }
        assert_eq!(d.threshold(), Some(30 * MS));
        assert_eq!(d.silence(t + 7 * MS), 7 * MS);
    }

    #[test]
    fn a_stall_raises_the_threshold_for_a_while_up_to_a_cap() {
        let t0 = StdInstant::now();
        let mut d = Detector::new(30 * MS, t0);
        let mut t = t0;
        d.heard(t);
        let mut step = |d: &mut Detector, gap: Duration| {
            t += gap;
            d.heard(t);
            t
        };
        for _ in 0..200 {
            step(&mut d, 5 * MS);
        }
        // A 40 ms stall of a live primary: the next takeover needs 80 ms of silence.
        step(&mut d, 40 * MS);
        assert_eq!(d.threshold(), Some(80 * MS));
        // A huge one is capped below STANDBY_LOST.
        step(&mut d, 900 * MS);
        assert_eq!(d.threshold(), Some(STANDBY_LOST / 2));
        // Forgotten after two windows of steady words.
        for _ in 0..500 {
            step(&mut d, 5 * MS);
        }
        assert_eq!(d.threshold(), Some(30 * MS));
        // A detection time above the cap is the user's: kept.
        let mut slow = Detector::new(800 * MS, t0);
        slow.heard(t0);
        assert_eq!(slow.threshold(), Some(800 * MS));
    }
}
