//! The re-bind of an imported connection (docs/protocol.md §4.1, "Data behind the RSYN"):
//! the importer announces its locator to the peer with an authenticated RSYN and sends the
//! stream's data right behind it, instead of waiting for the RSYN's answer.
//!
//! * **Order.** The RSYN is the first packet (a pending control packet goes out before any
//!   transport packet), so on an order-preserving path the peer opens it, moves its peer
//!   locator to the importer, and only then sees the data.
//! * **Data ahead of the RSYN** (reordered, or the RSYN lost) opens under the flow's keys like
//!   any authentic packet from a new source (§4.2): the peer takes it — only a holder of the
//!   flow's keys could have sealed it, which is also all an RSYN proves — but does not follow
//!   it; it starts validating the importer's locator, and the RSYN (or that validation, if the
//!   RSYN was lost) moves it. Its acknowledgements go to the old locator meanwhile and are
//!   lost; the next ones, cumulative, reach the importer.
//! * **How much before the answer.** The importer's transport restarts on the new path at the
//!   import: the congestion window is the initial window (RFC 9002 §7.2: at most 10 full
//!   packets, 14 720 bytes at the usual MTU), and nothing can open it further before the peer
//!   answers, since the peer sends to the importer only once the RSYN or a validation moved
//!   it. So the importer sends at most one initial window of stream data, plus the transport's
//!   probe timeouts (one or two packets each, backing off from about a second), to an address
//!   that has not answered it. The peer's address is the one the flow validated in its
//!   handshake, as it would be for any new path of the flow; the RSYN's retransmissions and the
//!   control channel's limits still decide when the move fails.
//! * **When the peer answers** (its RSYN-ACK, or any packet of its stream at the new locator)
//!   the move is complete; the transport, already on the new path, is not restarted again
//!   (what it sent behind the RSYN is in flight, not lost).

use super::{Connection, Reliable};
use crate::Instant;

impl Connection {
    /// Starts the re-bind of an imported connection: an RSYN from its (new) local locator,
    /// ahead of whatever reliable control packet the exporter had outstanding (the peer
    /// answers it to the locator it knows, the exporter's, so it is sent again after the
    /// RSYN, under a new verno), and the transport, restarted on the new path, free to send
    /// right behind it (see the module's documentation).
    pub(super) fn rebind(&mut self, now: Instant) {
        if let Some(p) = self.pending.take()
            && p.kind != Reliable::Rsyn
        {
            let rest = self.queued;
            self.queued.clear();
            self.queued.push_back(p.kind);
            for k in rest.0.into_iter().flatten() {
                self.queued.push_back(k);
            }
        }
        self.queued.remove(Reliable::Rsyn);
        self.moving_to = Some(Box::new(self.local));
        // Whatever the exporter had in flight is resent from here, from the initial window.
        self.transport.on_path_change(now);
        self.transport.set_frozen(false);
        self.rebinding_early = true;
        self.send_reliable(Reliable::Rsyn);
    }

    /// The peer answered the re-bind: whether the transport had already restarted on the new
    /// path at the import (then it is not restarted again). Clears the mark.
    pub(super) fn take_early_rebind(&mut self) -> bool {
        std::mem::take(&mut self.rebinding_early)
    }
}
