//! A client's request that the server move its end of the flow (docs/protocol.md §4.5): the
//! client names another instance's migration agent in a MOVE_REQUEST frame, sealed under the
//! flow's keys like every packet of the flow, so only the client can ask; the server's
//! migration agent then moves the flow there as an operator's move would, and the client sees
//! the new instance's RSYN.
//!
//! The frame is not ack-eliciting and nothing here retransmits it: the runtime asks again
//! until the flow moved or its deadline passed, and a server takes one request per flow at a
//! time. The server only reports the request; whether and where the flow moves is its
//! migration agent's decision, under its own rules (the target must prove the service's key).

use super::{Connection, Role, State};
use crate::Instant;
use crate::frame::PathFrame;
use serval_wire::Locator;

impl Connection {
    /// Client: sends a MOVE_REQUEST naming `to` with the next packets. Errors (as a reason) if
    /// this end is not the client of an established flow.
    pub(crate) fn ask_move(&mut self, to: Locator) -> Result<(), &'static str> {
        if self.role != Role::Client {
            return Err("only the client of a flow asks for its move");
        }
        if self.state != State::Established {
            return Err("the flow is not established");
        }
        self.move_ask = Some(Box::new(to));
        Ok(())
    }

    /// Server: a MOVE_REQUEST arrived. Reported to the endpoint while the flow is established
    /// and this end serves it; anything else is ignored (a client has nothing to move).
    pub(super) fn on_move_request(&mut self, to: Locator) {
        if self.role == Role::Server && self.state == State::Established {
            self.events.push_back(super::ConnEvent::MoveAsked(to));
        }
    }

    /// The pending MOVE_REQUEST, sealed, with its route.
    pub(super) fn poll_move_ask(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        if self.state != State::Established {
            self.move_ask = None;
            return None;
        }
        let to = *self.move_ask.take()?;
        self.emit_path_frame(now, out, PathFrame::MoveRequest(to))
            .then_some((self.local, self.peer))
    }
}
