//! Batches of received datagrams, and the SYNs among them resolved together.
//!
//! A receiver takes datagrams from its socket many at a time (`recvmmsg`, GRO). Handing them
//! to [`Endpoint::handle_datagrams_mut`] as one batch lets the endpoint look up the services
//! of all the batch's SYNs before it handles the first datagram
//! ([`TableSnapshot::resolve_batch`]): in a table of a million rules each lookup costs a few
//! cache misses, which one by one are paid in turn and in a batch overlap. Each SYN then
//! takes its resolution as it is handled, in order, exactly as if it had resolved it itself:
//! the resolution is the same function of the service ID, the flow key and the table.
//!
//! The one difference a batch can make is *which version* of the table a SYN sees. The
//! resolutions are made against the table as it is when the batch starts; if anything
//! changes the table while the batch is handled (a registration in the same batch, another
//! thread's update), the remaining SYNs resolve one by one against the new version, so a SYN
//! never sees an older table than it would have unbatched.

use serval_table::{Resolution, ServiceTable, TableSnapshot};
use serval_wire::ext::{ControlFlags, Extension};
use serval_wire::{Locator, Nonce, Protocol, SalPacket, ServiceId};

use super::{Endpoint, flow_key};
use crate::Instant;

/// One received datagram of a batch for [`Endpoint::handle_datagrams_mut`].
#[derive(Debug)]
pub struct Datagram<'a> {
    /// The local address it arrived at.
    pub local: Locator,
    /// Its source.
    pub remote: Locator,
    /// Its bytes, opened in place: they hold garbage once the datagram is handled.
    pub data: &'a mut [u8],
}

/// Below this many SYNs a batch resolves them one by one: there is nothing to overlap.
const MIN_AHEAD: usize = 2;

/// SYN resolutions made ahead of their datagrams, in the order of the batch.
#[derive(Default)]
pub(super) struct Ahead {
    /// The table version they were made against; `None` when there are none.
    snapshot: Option<TableSnapshot>,
    ids: Vec<ServiceId>,
    keys: Vec<u64>,
    found: Vec<Option<Resolution>>,
    /// The first one not yet taken.
    next: usize,
}

impl Ahead {
    fn clear(&mut self) {
        self.snapshot = None;
        self.ids.clear();
        self.keys.clear();
        self.found.clear();
        self.next = 0;
    }

    /// The resolution made ahead for a SYN for `id` with flow key `key`, if one was and
    /// `table` has not changed since. Resolutions are taken in batch order; a SYN that was
    /// dropped before its lookup (rate limited, a retransmission, held) leaves its own behind,
    /// which the next SYN's search skips.
    pub(super) fn take(
        &mut self,
        table: &ServiceTable,
        id: &ServiceId,
        key: u64,
    ) -> Option<Option<Resolution>> {
        if !self.snapshot.as_ref()?.is_current(table) {
            self.clear();
            return None;
        }
        let i = (self.next..self.ids.len()).find(|&i| self.keys[i] == key && self.ids[i] == *id)?;
        self.next = i + 1;
        Some(self.found[i].take())
    }
}

/// The service and flow key of a datagram that looks like a SYN to resolve: no destination
/// flow, the SYN flag alone, a SERVICE and a NONCE extension. Whatever else it holds is
/// checked when it is handled; a datagram this admits wrongly costs one lookup, no more.
fn syn_route(data: &[u8]) -> Option<(ServiceId, u64)> {
    // Only the lengths the header accessors need: the whole header is validated when the
    // datagram is handled, and a malformed extension merely ends this walk early.
    let pkt = SalPacket::new_unchecked(data);
    pkt.check_len().ok()?;
    if pkt.protocol() == Protocol::REGISTRATION || !pkt.dst_flow().is_none() {
        return None;
    }
    // One pass over the extensions (each accessor of `SalPacket` would walk them again).
    let (mut syn, mut id, mut nonce) = (false, None, None);
    for e in pkt.extensions() {
        match e {
            Extension::Control(c) => syn = c.flags() == ControlFlags::SYN,
            Extension::Service(s) => id = Some(s.service_id()),
            Extension::Nonce(n) => nonce = Some(Nonce(*n)),
            _ => {}
        }
    }
    if !syn {
        return None;
    }
    Some((id?, flow_key(pkt.src_flow(), &nonce?)))
}

impl Endpoint {
    /// Handles a batch of received datagrams, in order, as
    /// [`handle_datagram_mut`](Self::handle_datagram_mut) would one by one; the services of
    /// the batch's SYNs are looked up together first ([`TableSnapshot::resolve_batch`]), so
    /// that in a large table their cache misses overlap. Each SYN uses its own resolution as
    /// it is handled; if the table changes during the batch, the SYNs not yet handled resolve
    /// again against the new version.
    pub fn handle_datagrams_mut(&mut self, now: Instant, batch: &mut [Datagram<'_>]) {
        self.resolve_ahead(batch);
        for d in batch.iter_mut() {
            self.handle_datagram_mut(now, d.local, d.remote, d.data);
        }
        self.ahead.clear();
    }

    /// Resolves the services of `batch`'s SYNs against the current table.
    fn resolve_ahead(&mut self, batch: &[Datagram<'_>]) {
        let a = &mut self.ahead;
        a.clear();
        for (id, key) in batch.iter().filter_map(|d| syn_route(d.data)) {
            a.ids.push(id);
            a.keys.push(key);
        }
        if a.ids.len() < MIN_AHEAD {
            a.clear();
            return;
        }
        let snapshot = self.table.snapshot();
        a.found.resize(a.ids.len(), None);
        snapshot.resolve_batch(&a.ids, &a.keys, &mut a.found);
        a.snapshot = Some(snapshot);
    }

    /// The resolution of a SYN's service for `key`: made ahead in its batch if it was, else
    /// now.
    pub(super) fn resolve_syn(&mut self, id: &ServiceId, key: u64) -> Option<Resolution> {
        match self.ahead.take(&self.table, id, key) {
            Some(r) => r,
            None => self.table.snapshot().resolve(id, key),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use serval_table::{Action, ServiceTable, Target};
    use serval_wire::ext::{ControlRepr, ServiceRepr};
    use serval_wire::{FlowId, Nonce, SalRepr, ServicePrefix};

    use super::*;
    use crate::endpoint::{EndpointConfig, Transmit};

    const ROUTER: Locator = v4([10, 0, 0, 1], 4000);
    const CLIENT: Locator = v4([10, 0, 0, 9], 5000);

    const fn v4(ip: [u8; 4], port: u16) -> Locator {
        let [a, b, c, d] = ip;
        Locator::V4(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(a, b, c, d),
            port,
        ))
    }

    fn hop(i: u8) -> Locator {
        v4([10, 0, 1, i], 4000)
    }

    fn service(i: u32) -> ServiceId {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&0x5e57_0000u32.to_be_bytes());
        id[4..8].copy_from_slice(&i.to_be_bytes());
        ServiceId(id)
    }

    /// Services 0..n, each served by three weighted next hops (service 0 by one of priority
    /// 0 too, which must never be chosen), and a prefix rule for everything under 0x5e58.
    fn table(n: u32, anchor_index: bool) -> Arc<ServiceTable> {
        let t = Arc::new(if anchor_index {
            ServiceTable::with_anchor_index()
        } else {
            ServiceTable::new()
        });
        t.update(|tx| {
            for i in 0..n {
                for w in 0..3u8 {
                    let t = Target::new(Action::Forward(hop(w)), 1, u32::from(w) + 1);
                    tx.add_target(ServicePrefix::exact(service(i)), t).unwrap();
                }
            }
            let low = Target::new(Action::Forward(hop(9)), 0, 100);
            tx.add_target(ServicePrefix::exact(service(0)), low)
                .unwrap();
            let mut p = [0u8; 32];
            p[..4].copy_from_slice(&0x5e58_0000u32.to_be_bytes());
            let wide = Target::new(Action::Forward(hop(7)), 1, 1);
            tx.add_target(ServicePrefix::new(ServiceId(p), 16), wide)
                .unwrap();
        });
        t
    }

    /// A SYN from `CLIENT` for `id`, its flow and nonce drawn from `x`.
    fn syn(id: ServiceId, x: u64) -> Vec<u8> {
        syn_from(id, x, vec![CLIENT])
    }

    /// A SYN for `id` with this SOURCE (empty: malformed, dropped before its lookup).
    fn syn_from(id: ServiceId, x: u64, source: Vec<Locator>) -> Vec<u8> {
        let mut r = SalRepr::new(Protocol::STREAM, FlowId(x | 1), FlowId::NONE);
        r.control = Some(ControlRepr {
            flags: ControlFlags::SYN,
            verno: x as u32,
            ackno: 0,
        });
        r.service = Some(ServiceRepr { hop_limit: 16, id });
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&x.rotate_left(17).to_be_bytes());
        r.nonce = Some(Nonce(nonce));
        r.source = source;
        r.to_bytes(&[]).unwrap()
    }

    fn router(table: Arc<ServiceTable>) -> Endpoint {
        Endpoint::new(EndpointConfig::default(), [3; 32], table, vec![ROUTER])
    }

    fn drain(e: &mut Endpoint) -> Vec<Transmit> {
        std::iter::from_fn(|| e.poll_transmit(Instant::ZERO)).collect()
    }

    /// `bufs` as datagrams from `CLIENT` to `ROUTER`.
    fn datagrams(bufs: &mut [Vec<u8>]) -> Vec<Datagram<'_>> {
        bufs.iter_mut()
            .map(|d| Datagram {
                local: ROUTER,
                remote: CLIENT,
                data: d,
            })
            .collect()
    }

    fn handle_batch(e: &mut Endpoint, dgrams: &[Vec<u8>]) {
        let mut copies = dgrams.to_vec();
        e.handle_datagrams_mut(Instant::ZERO, &mut datagrams(&mut copies));
    }

    /// SYNs for known services, a prefix rule, unknown services (NACKed), retransmissions,
    /// malformed SYNs, and garbage.
    fn mixed_syns(n: u32) -> Vec<Vec<u8>> {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut out = Vec::new();
        for k in 0..600u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = match k % 10 {
                0 => service(n + (x % 50) as u32),
                1 => {
                    let mut id = service(0).0;
                    id[..4].copy_from_slice(&0x5e58_0000u32.to_be_bytes());
                    id[20] = x as u8;
                    ServiceId(id)
                }
                _ => service((x % u64::from(n)) as u32),
            };
            if k % 7 == 0 {
                // Resolved ahead, then dropped before its lookup: the next SYN for the same
                // service must not take its resolution (made for another flow key).
                out.push(syn_from(id, x ^ 0xdead, Vec::new()));
            }
            out.push(syn(id, x));
            if k % 37 == 0 {
                out.push(out[out.len() - 1].clone());
            }
            if k % 53 == 0 {
                out.push(vec![0x11; (x % 40) as usize]);
            }
        }
        out
    }

    #[test]
    fn a_batch_forwards_every_syn_as_one_by_one_would() {
        for anchor_index in [false, true] {
            let n = 2000;
            let syns = mixed_syns(n);
            let mut single = router(table(n, anchor_index));
            for s in &syns {
                single.handle_datagram(Instant::ZERO, ROUTER, CLIENT, s);
            }
            let want = drain(&mut single);
            assert!(
                want.iter().any(|t| t.dst == hop(7)),
                "the prefix rule serves"
            );
            assert!(
                want.iter().all(|t| t.dst != hop(9)),
                "priority 0 is never chosen"
            );
            for size in [2, 3, 16, 64, syns.len()] {
                let mut batched = router(table(n, anchor_index));
                for chunk in syns.chunks(size) {
                    handle_batch(&mut batched, chunk);
                }
                assert_eq!(drain(&mut batched), want, "batches of {size}");
                assert_eq!(batched.stats(), single.stats(), "batches of {size}");
            }
        }
    }

    #[test]
    fn a_syn_after_a_table_change_sees_the_new_table() {
        let t = table(100, false);
        let mut e = router(Arc::clone(&t));
        let mut syns: Vec<Vec<u8>> = (0..8).map(|i| syn(service(5), 1000 + i)).collect();
        let batch = datagrams(&mut syns);
        e.resolve_ahead(&batch);
        assert_eq!(e.ahead.ids.len(), 8, "all eight resolved ahead");
        // The service moves while the batch is handled (as a registration in it would).
        t.update(|tx| {
            tx.remove_prefix(&ServicePrefix::exact(service(5)));
            let t = Target::new(Action::Forward(hop(42)), 1, 1);
            tx.add_target(ServicePrefix::exact(service(5)), t).unwrap();
        });
        for d in batch {
            e.handle_datagram_mut(Instant::ZERO, d.local, d.remote, d.data);
        }
        let sent = drain(&mut e);
        assert_eq!(sent.len(), 8);
        assert!(sent.iter().all(|t| t.dst == hop(42)), "{sent:?}");
    }

    #[test]
    fn only_syns_are_resolved_ahead() {
        let mut e = router(table(10, false));
        let first = syn(service(1), 7);
        let mut ack = first.clone();
        SalPacket::new_checked(&mut ack[..])
            .unwrap()
            .set_dst_flow(FlowId(99));
        let mut bufs = [first, ack, vec![0u8; 3], syn(service(2), 8)];
        let batch = datagrams(&mut bufs);
        e.resolve_ahead(&batch);
        assert_eq!(e.ahead.ids, [service(1), service(2)]);
        assert!(e.ahead.found.iter().all(Option::is_some));
    }
}
