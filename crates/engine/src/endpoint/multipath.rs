//! Multipath at the endpoint (issue 11; docs/moving-flows.md §2): the application's calls
//! to add, remove, mark and list a connection's paths, and the flowID aliases a path needs
//! in the flow table (each path has a flowID pair of its own; the table maps every one of
//! them to the connection, so demultiplexing stays by flowID alone).

use serval_wire::Locator;

use super::{ConnectionHandle, Endpoint};
use crate::connection::multipath::{AddPathError, PathSummary};
use crate::connection::{Role, State};
use crate::transport::conn::Scheduler;

impl Endpoint {
    /// Joins a new path to connection `h`, from our locator `local` (one of
    /// [`Endpoint::locals`]) to the peer's `remote` (where the peer can be reached: the same
    /// locator as the flow's first path, or another of the peer's). The join is authenticated
    /// by the flow's keys and validated both ways; [`Event::PathUp`](super::Event::PathUp)
    /// reports it usable, [`Event::PathDown`](super::Event::PathDown) that it failed. A
    /// `backup` path carries data only while no other path works. Returns the path's ID.
    pub fn add_path(
        &mut self,
        h: ConnectionHandle,
        local: Locator,
        remote: Locator,
        backup: bool,
    ) -> Result<u32, AddPathError> {
        if !self.locals.contains(&local) {
            return Err(AddPathError::NotLocal(local));
        }
        if self
            .conn_ref(h)
            .is_none_or(|c| c.state != State::Established)
        {
            return Err(AddPathError::NotEstablished);
        }
        if self.is_replicated(h) {
            return Err(AddPathError::Replicated);
        }
        let flow = self.flows.allocate(&mut self.rng, h);
        let Some(c) = self.conn(h) else {
            self.flows.remove(flow);
            return Err(AddPathError::NotEstablished);
        };
        match c.join_path(local, remote, flow, backup) {
            Ok(id) => {
                self.touch(h);
                Ok(id)
            }
            Err(e) => {
                self.flows.remove(flow);
                Err(e)
            }
        }
    }

    /// Removes path `id` (not 0) of connection `h`: what it carried goes out on the others.
    /// Returns whether there was such a path.
    pub fn remove_path(&mut self, h: ConnectionHandle, id: u32) -> bool {
        let Some(flow) = self.conn(h).and_then(|c| c.remove_path(id)) else {
            return false;
        };
        self.flows.remove(flow);
        self.touch(h);
        true
    }

    /// Whether connection `h` has removed paths whose removal the peer has not acknowledged
    /// yet (a JOIN|FIN queued or in flight).
    pub fn removals_pending(&self, h: ConnectionHandle) -> bool {
        self.conn_ref(h)
            .is_some_and(|c| c.removal_to_send().is_some())
    }

    /// Marks path `id` of connection `h` as a backup (or not), at both ends: this end's
    /// scheduling changes at once, and the peer is told (JOIN|RSYN, reliable). Returns
    /// whether there was such a path.
    pub fn set_path_backup(&mut self, h: ConnectionHandle, id: u32, backup: bool) -> bool {
        let done = self.conn(h).is_some_and(|c| c.set_path_backup(id, backup));
        if done {
            self.touch(h);
        }
        done
    }

    /// Sets connection `h`'s scheduler (how its data spreads over its paths) from its next
    /// packet on. Returns whether there was such a connection.
    pub fn set_scheduler(&mut self, h: ConnectionHandle, scheduler: Scheduler) -> bool {
        let done = self.conn(h).is_some_and(|c| {
            c.transport.set_scheduler(scheduler);
            true
        });
        if done {
            self.touch(h);
        }
        done
    }

    /// Connection `h`'s scheduler (`None`: no such connection).
    pub fn scheduler(&self, h: ConnectionHandle) -> Option<Scheduler> {
        self.conn_ref(h).map(|c| c.transport.scheduler())
    }

    /// Connection `h`'s paths, path 0 first, with their transport state.
    pub fn paths(&self, h: ConnectionHandle) -> Vec<PathSummary> {
        self.conn_ref(h)
            .map(|c| c.path_summaries())
            .unwrap_or_default()
    }

    /// Server, [`EndpointConfig::multipath`](super::EndpointConfig::multipath): tells the
    /// client of the just-accepted `h` our other locators.
    pub(super) fn announce_locals(&mut self, h: ConnectionHandle) {
        let locals = self.locals.clone();
        if let Some(c) = self.conn(h)
            && c.role == Role::Server
        {
            let family = c.local.is_ipv4();
            c.announce_addresses(
                locals
                    .into_iter()
                    .filter(|l| l.is_ipv4() == family)
                    .collect(),
            );
        }
    }

    /// Client, [`EndpointConfig::multipath`](super::EndpointConfig::multipath): joins a path
    /// from each local locator that has none yet to the peer locator sharing the longest
    /// prefix with it (path 0's on a tie), as a backup if it is one of
    /// [`backup_locals`](super::EndpointConfig::backup_locals). Called when `h` connects and
    /// when the server announces its locators; a pair already joined (or joining) is left
    /// alone, and joins that cannot work (no route between the two) fail by themselves.
    pub(super) fn auto_join(&mut self, h: ConnectionHandle) {
        let Some(c) = self.conn_ref(h) else {
            return;
        };
        if c.role != Role::Client || c.state != State::Established {
            return;
        }
        let peers = c.peer_locators();
        let mut joins = Vec::new();
        for &local in &self.locals {
            if local == c.local || local.is_ipv4() != c.peer.is_ipv4() {
                continue;
            }
            let Some(&remote) = peers
                .iter()
                .filter(|r| r.is_ipv4() == local.is_ipv4())
                .rev()
                .max_by_key(|r| common_prefix(local.ip(), r.ip()))
            else {
                continue;
            };
            if !c.has_route(local, remote) {
                joins.push((local, remote, self.is_backup_local(local)));
            }
        }
        for (local, remote, backup) in joins {
            let flow = self.flows.allocate(&mut self.rng, h);
            let joined = self.conn(h).is_some_and(|c| {
                c.cancel_joins_from(local, remote);
                c.join_path(local, remote, flow, backup).is_ok()
            });
            if !joined {
                self.flows.remove(flow);
            }
        }
    }

    /// Whether paths from or to our `local` are backups: it is one of
    /// [`backup_locals`](super::EndpointConfig::backup_locals), or one of them names its
    /// address with port 0 (any port).
    fn is_backup_local(&self, local: Locator) -> bool {
        self.config
            .backup_locals
            .iter()
            .any(|b| *b == local || (b.port() == 0 && b.ip() == local.ip()))
    }

    /// A local locator appeared: every established client connection joins a path from it
    /// (see [`auto_join`](Self::auto_join)).
    pub(super) fn join_from_new_local(&mut self) {
        let handles: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_deref()?;
                (c.role == Role::Client && c.state == State::Established).then(|| self.handle_at(i))
            })
            .collect();
        for h in handles {
            self.auto_join(h);
            self.touch(h);
        }
    }

    /// After connection `h` ran: forgets the flowIDs of paths it dropped, and gives a flowID
    /// to each path the peer just joined (allocated only for a JOIN that opened), marking it a
    /// backup if it reached one of [`backup_locals`](super::EndpointConfig::backup_locals).
    pub(super) fn settle_flows(&mut self, h: ConnectionHandle) {
        let Some(c) = self.conn(h) else {
            return;
        };
        let gone = c.take_retired_flows();
        let wanting: Vec<u32> = c.paths_wanting_flow().collect();
        for flow in gone {
            self.flows.remove(flow);
        }
        if !wanting.is_empty() && self.is_replicated(h) {
            // A hot standby's checkpoints carry one path: a replicated connection that took
            // another could no longer be checkpointed, and its held output would never be
            // released. The joins are refused, and the joiner told (JOIN|FIN).
            if let Some(c) = self.conn(h) {
                for id in wanting {
                    c.remove_path(id);
                }
            }
            self.stats.joins_refused += 1;
            self.touch(h);
            return;
        }
        for id in wanting {
            let flow = self.flows.allocate(&mut self.rng, h);
            match self.conn(h).and_then(|c| c.grant_flow(id, flow)) {
                // A path to one of our backup locators is a backup here too, whatever the
                // joiner asked.
                Some(local) if self.is_backup_local(local) => {
                    if let Some(c) = self.conn(h) {
                        c.set_path_backup(id, true);
                    }
                }
                Some(_) => {}
                None => {
                    self.flows.remove(flow);
                }
            }
        }
    }
}

/// How many leading bits two addresses share (0 across families).
fn common_prefix(a: std::net::IpAddr, b: std::net::IpAddr) -> u32 {
    use std::net::IpAddr;
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_counts_shared_leading_bits() {
        let ip = |s: &str| s.parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(common_prefix(ip("10.0.2.1"), ip("10.0.2.2")), 30);
        assert_eq!(common_prefix(ip("10.0.2.1"), ip("10.0.1.2")), 22);
        assert_eq!(common_prefix(ip("10.0.2.1"), ip("10.0.2.1")), 32);
        assert_eq!(common_prefix(ip("10.0.2.1"), ip("::1")), 0);
        assert_eq!(common_prefix(ip("fe80::1"), ip("fe80::2")), 126);
    }
}
