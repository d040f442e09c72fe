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
    /// and `to` must prove the service's key. When any of that fails, the stream stays where
    /// it was and this returns `TimedOut` after [`REQUEST_MOVE_LIMIT`] (the server says
    /// nothing about why: its log and admin API do). Only the client end of an established
    /// stream can ask (`InvalidInput` otherwise).
    pub async fn request_move(&self, to: Locator) -> io::Result<Locator> {
        let (tx, mut moved) = oneshot::channel();
        {
            let mut st = self.shared().lock();
            let slot = st
                .conns
                .get_mut(&self.handle())
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
            // Callers that gave up (a timeout around this future) leave their sender behind.
            slot.peer_moved.retain(|t| !t.is_closed());
            slot.peer_moved.push(tx);
        }
        let deadline = tokio::time::Instant::now() + REQUEST_MOVE_LIMIT;
        loop {
            {
                let mut st = self.shared().lock();
                st.engine
                    .ask_move(self.handle(), to)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            }
            self.shared().wake.notify_one();
            let wait = tokio::time::sleep(REQUEST_MOVE_REPEAT);
            tokio::select! {
                r = &mut moved => {
                    return r.map_err(|_| {
                        io::Error::new(io::ErrorKind::ConnectionAborted, "the stream closed")
                    });
                }
                () = wait => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the server did not move the stream to {to} within {} s (it may not \
                         support moves, or {to} is not an instance it trusts)",
                        REQUEST_MOVE_LIMIT.as_secs()
                    ),
                ));
            }
        }
    }
}

impl Endpoint {
    /// The clients' move requests for this endpoint's streams, from now on (a second call
    /// takes them from the first). Requests that arrive while nobody takes them are dropped.
    pub(crate) fn take_move_asks(&self) -> mpsc::Receiver<MoveAsk> {
        let (tx, rx) = mpsc::channel(QUEUED_ASKS);
        self.shared.lock().move_asks = Some(tx);
        rx
    }
}

impl State {
    /// The engine's move events: a client's request (server) is handed to the migration
    /// agent; the peer's move (client) answers [`Stream::request_move`].
    pub(crate) fn on_move_event(&mut self, ev: Event) {
        match ev {
            Event::MoveAsked(h, to) => {
                let flow = self.engine.connection_info(h).map(|c| c.local_flow);
                match (flow, &self.move_asks) {
                    (Some(flow), Some(tx)) => {
                        if tx.try_send(MoveAsk { flow, to }).is_err() {
                            tracing::debug!(%flow, %to, "a client's move request dropped: the migration agent is busy or gone");
                        }
                    }
                    (Some(flow), None) => {
                        tracing::debug!(%flow, %to, "a client asked to move its flow, but no migration agent runs here");
                    }
                    (None, _) => {}
                }
            }
            Event::PeerMigrated(h, to) => {
                if let Some(c) = self.conns.get_mut(&h) {
                    for tx in c.peer_moved.drain(..) {
                        let _ = tx.send(to);
                    }
                }
            }
            _ => {}
        }
    }
}
