//! Several paths at once on one stream (multipath; issue 11, docs/moving-flows.md §2).
//!
//! A stream starts on one path, path 0: from the local locator it connected (or was accepted)
//! at to the peer's. [`Stream::add_path`] joins another, from another of the endpoint's local
//! locators ([`Endpoint::usable_locators`](crate::Endpoint::usable_locators)) to the peer's
//! locator (the same as path 0's, or another where the peer can be reached). The join is
//! authenticated by the flow's keys and validated in both directions; the endpoint's path
//! events ([`Endpoint::path_events`](crate::Endpoint::path_events)) then report
//! [`PathEvent::PathUp`](crate::PathEvent::PathUp), or
//! [`PathEvent::PathDown`](crate::PathEvent::PathDown) if it failed. Either end may join
//! paths; the peer's show up in [`Stream::paths`] too.
//!
//! Data goes to the usable path with the lowest round-trip time whose congestion window has
//! room, then the next; a backup path carries data only while no other path works. Each path
//! has its own packet numbers, round-trip estimate and congestion window (coupled across the
//! paths, so the stream takes no more than one flow's share of a shared bottleneck); the byte
//! stream, its flow control and the datagrams are the connection's. A path that fails or is
//! removed hands what it had in flight to the others.
//!
//! The endpoint needs a UDP socket on every local locator a path uses: bind it on each
//! address ([`Endpoint::bind`](crate::Endpoint::bind) with several addresses), or on a
//! wildcard address with an endpoint that follows the host's addresses.

use std::io;

use serval_wire::Locator;

use crate::stream::Stream;

pub use serval_engine::connection::multipath::{AddPathError, PathSummary};
pub use serval_engine::transport::conn::{MAX_PATHS, PathInfo, Scheduler, UnknownScheduler};

impl Stream {
    /// Joins a new path to this stream, from `local` (one of the endpoint's locators:
    /// [`Endpoint::usable_locators`](crate::Endpoint::usable_locators)) to the peer's
    /// `remote` (usually [`Stream::peer_locator`], or another locator where the peer can be
    /// reached), and returns the path's ID. The path carries data once it is validated both
    /// ways, which the endpoint reports as
    /// [`PathEvent::PathUp`](crate::PathEvent::PathUp) (this stream's
    /// [`Stream::id`], this ID); a join the peer never answers ends in
    /// [`PathEvent::PathDown`](crate::PathEvent::PathDown). A `backup` path carries data only
    /// while no other path works.
    ///
    /// Returns immediately; the join goes out with the driver. Fails, with the engine's
    /// [`AddPathError`] as the error's inner error
    /// (`e.get_ref().and_then(|e| e.downcast_ref::<AddPathError>())`), with
    /// * `AddrNotAvailable` if `local` is not a locator of this endpoint,
    /// * `NotConnected` if the stream is not established (still connecting, closing or
    ///   closed, or moving to another host),
    /// * `AlreadyExists` if a path already runs between `local` and `remote`,
    /// * `QuotaExceeded` if the stream already has [`MAX_PATHS`] paths.
    pub fn add_path(&self, local: Locator, remote: Locator, backup: bool) -> io::Result<u32> {
        let r = self
            .shared()
            .lock()
            .engine
            .add_path(self.handle(), local, remote, backup);
        match r {
            Ok(id) => {
                self.shared().wake.notify_one();
                Ok(id)
            }
            Err(e) => {
                let kind = match e {
                    AddPathError::NotLocal(_) => io::ErrorKind::AddrNotAvailable,
                    AddPathError::NotEstablished => io::ErrorKind::NotConnected,
                    AddPathError::Exists => io::ErrorKind::AlreadyExists,
                    AddPathError::TooMany(_) => io::ErrorKind::QuotaExceeded,
                    AddPathError::Replicated => io::ErrorKind::Unsupported,
                };
                Err(io::Error::new(kind, e))
            }
        }
    }

    /// Removes path `id` from this stream (one that [`Stream::add_path`] returned, or one the
    /// peer joined: see [`Stream::paths`]); what it had in flight goes out on the other paths
    /// and the stream carries on there. The endpoint reports
    /// [`PathEvent::PathDown`](crate::PathEvent::PathDown), and the peer is told (a JOIN|FIN,
    /// retransmitted until it is acknowledged): it removes the path too and sends what it had
    /// in flight there on its other paths.
    /// Returns whether the stream had such a path; path 0, the stream's own, cannot be
    /// removed (false): to leave its local locator, [`Stream::migrate`] the stream.
    pub fn remove_path(&self, id: u32) -> bool {
        let done = self.shared().lock().engine.remove_path(self.handle(), id);
        if done {
            self.shared().wake.notify_one();
        }
        done
    }

    /// Marks path `id` of this stream as a backup (it carries data only while no other path
    /// works) or as a regular path, at both ends: this end's scheduling changes at once, and
    /// the peer's once it hears of it (a reliable JOIN|RSYN). Returns whether the stream had
    /// such a path.
    pub fn set_path_backup(&self, id: u32, backup: bool) -> bool {
        let done = self
            .shared()
            .lock()
            .engine
            .set_path_backup(self.handle(), id, backup);
        if done {
            self.shared().wake.notify_one();
        }
        done
    }

    /// Chooses how this stream's data spreads over its paths, from its next packet on:
    /// [`Scheduler::Redundant`] for small latency-sensitive writes (each goes out on every
    /// path), [`Scheduler::LowestRtt`] (the default, or
    /// [`EndpointConfig::transport`](crate::EndpointConfig::transport)'s) for bulk. Returns
    /// false if the stream is closed.
    pub fn set_scheduler(&self, scheduler: Scheduler) -> bool {
        let done = self
            .shared()
            .lock()
            .engine
            .set_scheduler(self.handle(), scheduler);
        if done {
            self.shared().wake.notify_one();
        }
        done
    }

    /// This stream's scheduler (`None` once the stream is closed).
    pub fn scheduler(&self) -> Option<Scheduler> {
        self.shared().lock().engine.scheduler(self.handle())
    }

    /// This stream's paths, path 0 first: those this end joined (still joining, or active)
    /// and those the peer joined, each with its locators and, once active, its transport
    /// state ([`PathInfo`]: round-trip time, congestion window, bytes in flight, whether it
    /// failed). Empty once the stream is closed.
    pub fn paths(&self) -> Vec<PathSummary> {
        self.shared().lock().engine.paths(self.handle())
    }
}
