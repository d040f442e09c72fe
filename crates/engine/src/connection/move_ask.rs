//! A client's request that the server move its end of the flow, and the server's refusal
//! (docs/protocol.md §4.5): the
//! client names another instance's migration agent in a MOVE_REQUEST frame, sealed under the
//! flow's keys like every packet of the flow, so only the client can ask; the server's
//! migration agent then moves the flow there as an operator's move would, and the client sees
//! the new instance's RSYN.
//!
//! The frame is not ack-eliciting and nothing here retransmits it: the runtime asks again
//! until the flow moved or its deadline passed, and a server takes one request per flow at a
//! time. The server only reports the request; whether and where the flow moves is its
//! migration agent's decision, under its own rules (the target must prove the service's key).
//! When it does not move the flow, the server says why in a MOVE_REFUSED (a reason code, as
//! unreliable as the request: a lost one is sent again for the next request).

use super::{Connection, Role, State};
use crate::Instant;
use crate::frame::{MoveRefusal, PathFrame};
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
        self.move_frame = Some(Box::new(PathFrame::MoveRequest(to)));
        Ok(())
    }

    /// Server: answers a MOVE_REQUEST that named `to` with a MOVE_REFUSED. Errors (as a
    /// reason) if this end is not the server of an established flow.
    pub(crate) fn refuse_move(
        &mut self,
        to: Locator,
        why: MoveRefusal,
    ) -> Result<(), &'static str> {
        if self.role != Role::Server {
            return Err("only the server of a flow refuses a move");
        }
        if self.state != State::Established {
            return Err("the flow is not established");
        }
        self.move_frame = Some(Box::new(PathFrame::MoveRefused(to, why)));
        Ok(())
    }

    /// Client: a MOVE_REFUSED arrived (a server has nothing to be refused: ignored there).
    pub(super) fn on_move_refused(&mut self, to: Locator, why: MoveRefusal) {
        if self.role == Role::Client && self.state == State::Established {
            self.events
                .push_back(super::ConnEvent::MoveRefused(to, why));
        }
    }

    /// Server: a MOVE_REQUEST arrived. Reported to the endpoint while the flow is established
    /// and this end serves it; anything else is ignored (a client has nothing to move).
    pub(super) fn on_move_request(&mut self, to: Locator) {
        if self.role == Role::Server && self.state == State::Established {
            self.events.push_back(super::ConnEvent::MoveAsked(to));
        }
    }

    /// The pending MOVE_REQUEST or MOVE_REFUSED, sealed, with its route.
    pub(super) fn poll_move_ask(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        if self.state != State::Established {
            self.move_frame = None;
            return None;
        }
        let frame = *self.move_frame.take()?;
        self.emit_path_frame(now, out, frame)
            .then_some((self.local, self.peer))
    }
}
