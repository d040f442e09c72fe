//! Moves the client asks for (issue 10, Migratory TCP's model; docs/protocol.md §4.5).
//!
//! The client names another instance of the service by its migration agent's locator
//! ([`Stream::request_move`]); a MOVE_REQUEST under the flow's keys carries it to the server,
//! whose endpoint hands it to the instance's [`Migrator`](crate::Migrator) (here,
//! [`Endpoint::take_move_asks`]). The migrator moves the flow there as an operator's move
//! would: the target must prove the service's key, so a client can choose among the service's
//! instances but can never move its flow to a host of its own. The client sees the new
//! instance's RSYN.

use std::io;
use std::time::Duration;

use serval_engine::endpoint::Event;
use serval_engine::frame::MoveRefusal;
use serval_wire::{FlowId, Locator};
use tokio::sync::{mpsc, oneshot};

use crate::endpoint::{Endpoint, State};
use crate::stream::Stream;

/// How long [`Stream::request_move`] waits for the flow to move before it gives up: the
/// server's application hands the stream over, the agents transfer it, and the new instance's
/// RSYN arrives, each within its own limit.
pub const REQUEST_MOVE_LIMIT: Duration = Duration::from_secs(20);

/// How often [`Stream::request_move`] sends its MOVE_REQUEST again while the flow has not
/// moved (the frame is not retransmitted by the transport; a server takes one request per
/// flow at a time, so the repeats of a request being served change nothing).
pub const REQUEST_MOVE_REPEAT: Duration = Duration::from_millis(250);

/// Requests a server's endpoint keeps for its migration agent; beyond them, more are dropped
/// (the clients ask again).
const QUEUED_ASKS: usize = 64;

/// A client's request, at the server: move `flow` to the migration agent at `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MoveAsk {
    pub flow: FlowId,
    pub to: Locator,
}

impl Stream {
    /// Asks the server to move its end of this stream to the instance of the service whose
    /// migration agent is at `to` (Migratory TCP's client-initiated move). The stream keeps
    /// working throughout; returns the server's new locator once the new instance's RSYN
    /// moved the flow there.
    ///
    /// The server decides: its application must support moves, its migration agent must run,
    /// and `to` must prove the service's key. When it does not move the stream, it says why
    /// and this returns `ConnectionRefused` with the reason; the stream stays where it was.
    /// A server that says nothing (an older version, or every answer lost) leaves this to
    /// return `TimedOut` after [`REQUEST_MOVE_LIMIT`]. Only the client end of an established
    /// stream can ask (`InvalidInput` otherwise).
    pub async fn request_move(&self, to: Locator) -> io::Result<Locator> {
        let deadline = tokio::time::Instant::now() + REQUEST_MOVE_LIMIT;
        let mut outcome = self.wait_for_move()?;
        loop {
            {
                let mut st = self.shared().lock();
                st.engine
                    .ask_move(self.handle(), to)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            }
            self.shared().wake.notify_one();
            let repeat = tokio::time::sleep(REQUEST_MOVE_REPEAT);
            tokio::pin!(repeat);
            loop {
                tokio::select! {
                    r = &mut outcome => match r {
                        Ok(MoveOutcome::Moved(at)) => return Ok(at),
                        Ok(MoveOutcome::Refused(target, why)) if target == to => {
                            return Err(io::Error::new(
                                io::ErrorKind::ConnectionRefused,
                                format!("the server did not move the stream to {to}: {why}"),
                            ));
                        }
                        // The answer to an earlier request, to another agent: not this one's.
                        Ok(MoveOutcome::Refused(..)) => outcome = self.wait_for_move()?,
                        Err(_) => {
                            return Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "the stream closed",
                            ));
                        }
                    },
                    () = &mut repeat => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the server did not move the stream to {to} within {} s, and said \
                         nothing of why",
                        REQUEST_MOVE_LIMIT.as_secs()
                    ),
                ));
            }
        }
    }

    /// Registers for this stream's next peer move or move refusal.
    fn wait_for_move(&self) -> io::Result<oneshot::Receiver<MoveOutcome>> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.shared().lock();
        let slot = st
            .conns
            .get_mut(&self.handle())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        // Callers that gave up (a timeout around request_move) leave their sender behind.
        slot.move_waiters.retain(|t| !t.is_closed());
        slot.move_waiters.push(tx);
        Ok(rx)
    }
}

/// What became of a client's move request, for [`Stream::request_move`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum MoveOutcome {
    /// The peer moved to this locator.
    Moved(Locator),
    /// The server refused the request naming this agent.
    Refused(Locator, MoveRefusal),
}

impl Endpoint {
    /// The clients' move requests for this endpoint's streams, from now on (a second call
    /// takes them from the first). While nobody takes them, each is refused
    /// ([`MoveRefusal::NoAgent`]).
    pub(crate) fn take_move_asks(&self) -> mpsc::Receiver<MoveAsk> {
        let (tx, rx) = mpsc::channel(QUEUED_ASKS);
        self.shared.lock().move_asks = Some(tx);
        rx
    }

    /// Answers the client of `flow`, whose request named `to`, that its stream stays here.
    pub(crate) fn refuse_move(&self, flow: FlowId, to: Locator, why: MoveRefusal) {
        let mut st = self.shared.lock();
        if let Some(h) = st.engine.find_flow(flow) {
            // A flow that moved or closed meanwhile has no one to tell.
            let _ = st.engine.refuse_move(h, to, why);
        }
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl State {
    /// The engine's move events: a client's request (server) is handed to the migration
    /// agent, or refused when none takes it; the peer's move or refusal (client) answers
    /// [`Stream::request_move`].
    pub(crate) fn on_move_event(&mut self, ev: Event) {
        let (h, outcome) = match ev {
            Event::MoveAsked(h, to) => {
                let Some(flow) = self.engine.connection_info(h).map(|c| c.local_flow) else {
                    return;
                };
                let sent = match &self.move_asks {
                    Some(tx) => tx.try_send(MoveAsk { flow, to }),
                    None => Err(mpsc::error::TrySendError::Closed(MoveAsk { flow, to })),
                };
                match sent {
                    Ok(()) => {}
                    // The client asks again.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!(%flow, %to, "a client's move request dropped: the migration agent is busy");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        let _ = self.engine.refuse_move(h, to, MoveRefusal::NoAgent);
                    }
                }
                return;
            }
            Event::PeerMigrated(h, to) => (h, MoveOutcome::Moved(to)),
            Event::MoveRefused(h, to, why) => (h, MoveOutcome::Refused(to, why)),
            _ => return,
        };
        if let Some(c) = self.conns.get_mut(&h) {
            for tx in c.move_waiters.drain(..) {
                let _ = tx.send(outcome);
            }
        }
    }
}
