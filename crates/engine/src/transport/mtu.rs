//! Datagram packetization-layer path MTU discovery (DPLPMTUD, RFC 8899) as a plain state
//! machine.
//!
//! Sizes here are **SAL payload sizes**: the bytes available to the transport inside one UDP
//! datagram after the IP, UDP and SAL headers (what RFC 8899 calls the PLPMTU of our
//! packetization layer). Every path is assumed to carry [`BASE_PLPMTU`] = 1200 bytes (RFC 8899
//! §5.1.2 `BASE_PLPMTU`, which QUIC fixes at 1200 as well); the search looks for more, up to a
//! configured maximum derived from the local interface ([`max_payload_for_link`]).
//!
//! # States (RFC 8899 §5.2)
//!
//! - [`MtuState::Searching`]: probes are sent. The first probe of a search tries the maximum
//!   (on a LAN or loopback the path usually carries what the interface does, and then one
//!   probe settles it; RFC 8899 §5.1.4 leaves the choice of probe sizes open); after that the
//!   search bisects between the confirmed size and the
//!   smallest size known not to fit. A size is concluded not to fit after [`MAX_PROBES`]
//!   consecutive probes of it are lost (§5.1.2), so one congestion loss does not end a search.
//! - [`MtuState::SearchComplete`]: the remaining interval is narrower than the configured
//!   granularity. After `PMTU_RAISE_TIMER` ([`PMTU_RAISE_TIMER`], 600 s, §5.1.1) a new search
//!   starts, in case the path now carries more.
//! - **Black hole** (§4.3, §5.2): when full-size packets stop arriving, the size falls back
//!   to `BASE_PLPMTU` and the search resumes below the size that failed.
//!
//! RFC 8899's DISABLED, BASE and ERROR states have no counterpart: the transport only runs
//! once the SAL handshake has shown that `BASE_PLPMTU` gets through, and cannot go lower.
//!
//! # Call order
//!
//! 1. Whenever a packet could be sent, ask [`next_probe_size`](PathMtu::next_probe_size). If it
//!    returns a size, send an ack-eliciting packet padded to exactly that size (its loss must
//!    not count as congestion: mark it with [`SentInfo::mtu_probe`](super::loss::SentInfo)),
//!    then call [`on_probe_sent`](PathMtu::on_probe_sent). At most one probe is outstanding.
//! 2. When loss detection acknowledges or declares lost that packet number, call
//!    [`on_probe_acked`](PathMtu::on_probe_acked) or [`on_probe_lost`](PathMtu::on_probe_lost).
//! 3. Size ordinary packets with [`current`](PathMtu::current) and tell the congestion
//!    controller when it changes.
//! 4. For black-hole detection, report acknowledged and lost ordinary packets with
//!    [`on_packet_acked`](PathMtu::on_packet_acked) / [`on_packet_lost`](PathMtu::on_packet_lost)
//!    (or call [`on_black_hole`](PathMtu::on_black_hole) on your own evidence).
//! 5. Arm a timer for [`next_timeout`](PathMtu::next_timeout) (the raise timer); when it
//!    fires, ask [`next_probe_size`](PathMtu::next_probe_size) again.

use core::time::Duration;

use crate::Instant;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};
use crate::transport::{OptInstant, OptU64};

/// `BASE_PLPMTU` (RFC 8899 §5.1.2): the size assumed to work on every path, in SAL payload
/// bytes.
pub const BASE_PLPMTU: u16 = 1200;

/// `MAX_PROBES` (RFC 8899 §5.1.2): consecutive lost probes of one size after which the size
/// is concluded not to fit.
pub const MAX_PROBES: u8 = 3;

/// `PMTU_RAISE_TIMER` (RFC 8899 §5.1.1): how long a completed search stands before probing
/// for a larger size again.
pub const PMTU_RAISE_TIMER: Duration = Duration::from_secs(600);

/// Default search granularity: the search stops once the confirmed size is within this
/// many bytes of the smallest size known not to fit.
pub const DEFAULT_GRANULARITY: u16 = 16;

/// Loss bursts of full-size packets, with no full-size packet acknowledged since, that make
/// [`PathMtu::on_packet_lost`] declare a black hole.
pub const BLACK_HOLE_THRESHOLD: u8 = 3;

/// Largest UDP payload over IPv4: 65 535 − 20 (IPv4 header) − 8 (UDP header).
pub const MAX_UDP_PAYLOAD_V4: u16 = 65_507;

/// Largest UDP payload over IPv6 without jumbograms: 65 535 − 8 (the IPv6 payload length
/// excludes the 40-byte fixed header).
pub const MAX_UDP_PAYLOAD_V6: u16 = 65_527;

/// The largest SAL payload an interface with MTU `link_mtu` can carry in one datagram:
/// `link_mtu − IP header (20 or 40) − UDP header (8) − sal_overhead`, capped by the largest
/// UDP payload and never below [`BASE_PLPMTU`]. For example 1500-byte Ethernet over IPv4
/// gives `1472 − sal_overhead`, and a 65 536-byte loopback gives `65 507 − sal_overhead`.
pub fn max_payload_for_link(link_mtu: u32, ipv6: bool, sal_overhead: u16) -> u16 {
    let (ip, max_udp) = if ipv6 {
        (40, MAX_UDP_PAYLOAD_V6)
    } else {
        (20, MAX_UDP_PAYLOAD_V4)
    };
    let udp_payload = link_mtu.saturating_sub(ip + 8).min(u32::from(max_udp));
    let sal_payload = udp_payload.saturating_sub(u32::from(sal_overhead));
    // `sal_payload <= 65_527`, so it fits in u16.
    u16::try_from(sal_payload)
        .unwrap_or(u16::MAX)
        .max(BASE_PLPMTU)
}

/// Tunables of a [`PathMtu`]; [`MtuConfig::new`] fills in the RFC defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MtuConfig {
    /// The size assumed to work (normally [`BASE_PLPMTU`]).
    pub base: u16,
    /// The largest size to search for (from [`max_payload_for_link`]); values below `base`
    /// are raised to it, which disables the search.
    pub max: u16,
    /// How long a completed search stands ([`PMTU_RAISE_TIMER`]).
    pub raise_interval: Duration,
    /// Lost probes of one size before it is concluded not to fit ([`MAX_PROBES`]; at least 1).
    pub max_probes: u8,
    /// Search resolution in bytes ([`DEFAULT_GRANULARITY`]; at least 1).
    pub granularity: u16,
}

impl MtuConfig {
    /// The RFC defaults, searching up to `max`.
    pub fn new(max: u16) -> MtuConfig {
        MtuConfig {
            base: BASE_PLPMTU,
            max,
            raise_interval: PMTU_RAISE_TIMER,
            max_probes: MAX_PROBES,
            granularity: DEFAULT_GRANULARITY,
        }
    }
}

/// Where the search stands (RFC 8899 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtuState {
    /// Probing for a larger size.
    Searching,
    /// Settled until the raise timer fires.
    SearchComplete,
}

/// The probe currently being pursued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Probe {
    size: u16,
    /// Packet number of the copy in flight, if one is.
    pn: OptU64,
    /// Consecutive losses of this size.
    lost: u8,
}

/// DPLPMTUD state for one path (RFC 8899). Plain data; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMtu {
    config: MtuConfig,
    state: MtuState,
    /// The confirmed PLPMTU.
    current: u16,
    /// Smallest size known not to fit; `max + 1` when none is known. (u32: may be 65 536.)
    too_big: u32,
    /// Whether the next probe of this search is its first (which tries `max`).
    first_of_search: bool,
    probe: Option<Probe>,
    /// When the probe that completed (or will complete) the search was chosen.
    probe_chosen_at: OptInstant,
    /// When the raise timer fires, in `SearchComplete`.
    raise_at: OptInstant,
    /// Black-hole detection: the largest acknowledged full-size packet.
    largest_full_acked: OptU64,
    /// Black-hole detection: loss bursts of full-size packets since one was acknowledged.
    loss_bursts: u8,
    /// Black-hole detection: whether the current burst is still open (no ACK since it began).
    in_burst: bool,
}

impl PathMtu {
    /// Starts at `config.base` with a search pending.
    pub fn new(config: MtuConfig) -> PathMtu {
        let config = MtuConfig {
            max: config.max.max(config.base),
            max_probes: config.max_probes.max(1),
            granularity: config.granularity.max(1),
            ..config
        };
        PathMtu {
            state: MtuState::Searching,
            current: config.base,
            too_big: u32::from(config.max) + 1,
            first_of_search: true,
            probe: None,
            probe_chosen_at: OptInstant::NONE,
            raise_at: OptInstant::NONE,
            largest_full_acked: OptU64::NONE,
            loss_bursts: 0,
            in_burst: false,
            config,
        }
    }

    /// The confirmed path MTU (SAL payload bytes): the size for ordinary packets.
    pub fn current(&self) -> u16 {
        self.current
    }

    /// The search state.
    pub fn state(&self) -> MtuState {
        self.state
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &MtuConfig {
        &self.config
    }

    /// When to call [`next_probe_size`](Self::next_probe_size) again although no probe is
    /// outstanding: the raise timer.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.raise_at.get()
    }

    /// The size of the probe to send now, or `None` (a probe is outstanding, or the search is
    /// complete and the raise timer has not fired). Calling it again before
    /// [`on_probe_sent`](Self::on_probe_sent) returns the same size.
    pub fn next_probe_size(&mut self, now: Instant) -> Option<u16> {
        if self.state == MtuState::SearchComplete {
            if self.raise_at.get().is_none_or(|t| now < t) {
                return None;
            }
            // §5.1.1: the raise timer fired: look for a larger size again.
            self.state = MtuState::Searching;
            self.raise_at = OptInstant::NONE;
            self.too_big = u32::from(self.config.max) + 1;
            self.first_of_search = true;
        }
        if let Some(probe) = self.probe {
            if probe.pn.get().is_some() {
                return None;
            }
            return Some(probe.size);
        }
        if self.search_done() {
            // Only reachable when the interval closed without a probe (e.g. max == base).
            self.complete(now);
            return None;
        }
        let size = if self.first_of_search {
            u32::from(self.config.max)
        } else {
            // Bisect [current, too_big).
            let lo = u32::from(self.current);
            lo + (self.too_big - lo) / 2
        };
        // `size < too_big <= max + 1`, so it fits in u16.
        let size = u16::try_from(size).unwrap_or(self.config.max);
        self.probe = Some(Probe {
            size,
            pn: OptU64::NONE,
            lost: 0,
        });
        self.probe_chosen_at = now.into();
        Some(size)
    }

    /// A probe of `size` bytes was sent as packet `pn`.
    ///
    /// A size other than the one [`next_probe_size`](Self::next_probe_size) asked for is
    /// taken as a new probe of that size.
    pub fn on_probe_sent(&mut self, pn: u64, size: u16) {
        match &mut self.probe {
            Some(probe) if probe.size == size => probe.pn = OptU64::new(Some(pn)),
            _ => {
                self.probe = Some(Probe {
                    size,
                    pn: OptU64::new(Some(pn)),
                    lost: 0,
                });
            }
        }
    }

    /// The probe sent as `pn` was acknowledged: its size fits. Unknown numbers are ignored.
    pub fn on_probe_acked(&mut self, pn: u64) {
        let Some(probe) = self.probe.filter(|p| p.pn.get() == Some(pn)) else {
            return;
        };
        self.probe = None;
        self.first_of_search = false;
        if probe.size > self.current {
            self.current = probe.size;
        }
        if u32::from(probe.size) >= self.too_big {
            // It fit after all (e.g. the path changed): widen the search again.
            self.too_big = u32::from(self.config.max) + 1;
        }
        self.settle_if_done();
    }

    /// The probe sent as `pn` was declared lost. After [`MAX_PROBES`] consecutive losses of
    /// one size, the size is concluded not to fit. Unknown numbers are ignored.
    pub fn on_probe_lost(&mut self, pn: u64) {
        let Some(probe) = self.probe.as_mut().filter(|p| p.pn.get() == Some(pn)) else {
            return;
        };
        probe.pn = OptU64::NONE;
        probe.lost += 1;
        if probe.lost < self.config.max_probes {
            // Send the same size again.
            return;
        }
        let size = probe.size;
        self.probe = None;
        self.first_of_search = false;
        self.too_big = self
            .too_big
            .min(u32::from(size))
            .max(u32::from(self.current) + 1);
        self.settle_if_done();
    }

    /// Falls back to `BASE_PLPMTU` because packets of the current size are not getting
    /// through (RFC 8899 §4.3), and searches again below the size that failed. Returns
    /// whether the size changed (false when already at the base).
    pub fn on_black_hole(&mut self) -> bool {
        self.loss_bursts = 0;
        self.in_burst = false;
        self.largest_full_acked = OptU64::NONE;
        if self.current <= self.config.base {
            return false;
        }
        self.too_big = u32::from(self.current);
        self.current = self.config.base;
        self.state = MtuState::Searching;
        self.first_of_search = false;
        self.probe = None;
        self.raise_at = OptInstant::NONE;
        true
    }

    /// An ordinary (non-probe) packet of `size` bytes, number `pn`, was acknowledged.
    pub fn on_packet_acked(&mut self, pn: u64, size: u16) {
        if self.is_probe(pn) {
            return;
        }
        self.in_burst = false;
        if size > self.config.base {
            self.largest_full_acked = OptU64::new(self.largest_full_acked.get().max(Some(pn)));
            self.loss_bursts = 0;
        }
    }

    /// An ordinary (non-probe) packet of `size` bytes, number `pn`, was declared lost.
    /// Returns true if this made it declare a black hole (see
    /// [`on_black_hole`](Self::on_black_hole)); the caller should then resize what it
    /// retransmits.
    ///
    /// Losses of packets larger than the base, sent after the last such packet that was
    /// acknowledged, are suspicious. Losses reported together (before any acknowledgement)
    /// form one burst; [`BLACK_HOLE_THRESHOLD`] bursts with acknowledgements of smaller
    /// packets between them, and no larger packet acknowledged, mean a black hole. One burst
    /// alone is what congestion looks like.
    ///
    /// In a complete black hole nothing large is acknowledged and losses are only declared
    /// when something is: send PTO probes no larger than [`BASE_PLPMTU`] from the second
    /// consecutive probe timeout on, so that their acknowledgements reveal the losses.
    pub fn on_packet_lost(&mut self, pn: u64, size: u16) -> bool {
        if self.is_probe(pn) || size <= self.config.base {
            return false;
        }
        if self.largest_full_acked.get().is_some_and(|l| pn < l) {
            return false;
        }
        if !self.in_burst {
            self.in_burst = true;
            self.loss_bursts = self.loss_bursts.saturating_add(1);
        }
        self.loss_bursts >= BLACK_HOLE_THRESHOLD && self.on_black_hole()
    }

    fn is_probe(&self, pn: u64) -> bool {
        self.probe.is_some_and(|p| p.pn.get() == Some(pn))
    }

    fn search_done(&self) -> bool {
        self.too_big.saturating_sub(u32::from(self.current)) <= u32::from(self.config.granularity)
    }

    fn settle_if_done(&mut self) {
        if self.search_done() {
            let anchor = self.probe_chosen_at.get().unwrap_or(Instant::ZERO);
            self.complete(anchor);
        }
    }

    /// Enters `SearchComplete`, arming the raise timer from `anchor`.
    fn complete(&mut self, anchor: Instant) {
        self.state = MtuState::SearchComplete;
        self.probe = None;
        self.raise_at = (anchor + self.config.raise_interval).into();
    }
}

/// Snapshot encoding (docs/snapshot.md, PATH block, "MTU search").
impl PathMtu {
    /// Writes the configuration, then the search state.
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        let c = &self.config;
        w.u16(c.base);
        w.u16(c.max);
        w.duration(c.raise_interval);
        w.u8(c.max_probes);
        w.u16(c.granularity);
        w.u8(match self.state {
            MtuState::Searching => 0,
            MtuState::SearchComplete => 1,
        });
        w.u16(self.current);
        w.u32(self.too_big);
        w.bool(self.first_of_search);
        match self.probe {
            None => w.u8(0),
            Some(p) => {
                w.u8(1);
                w.u16(p.size);
                w.opt_u64(p.pn.get());
                w.u8(p.lost);
            }
        }
        w.opt_instant(self.probe_chosen_at.get());
        w.opt_instant(self.raise_at.get());
        w.opt_u64(self.largest_full_acked.get());
        w.u8(self.loss_bursts);
        w.bool(self.in_burst);
    }

    /// Reads what [`encode`](Self::encode) wrote. Refused unless
    /// `base <= current < too_big <= max + 1`, the probe (if any) lies in
    /// `current < size <= max` with fewer losses than `max_probes`, and the configuration is
    /// as [`PathMtu::new`] leaves it.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<PathMtu, SnapshotError> {
        let config = MtuConfig {
            base: r.u16()?,
            max: r.u16()?,
            raise_interval: r.duration()?,
            max_probes: r.u8()?,
            granularity: r.u16()?,
        };
        r.check(
            config.max >= config.base && config.max_probes >= 1 && config.granularity >= 1,
            "MTU configuration",
        )?;
        let state = match r.u8()? {
            0 => MtuState::Searching,
            1 => MtuState::SearchComplete,
            _ => return Err(r.malformed("MTU state")),
        };
        let current = r.u16()?;
        let too_big = r.u32()?;
        let first_of_search = r.bool()?;
        let probe = match r.u8()? {
            0 => None,
            1 => Some(Probe {
                size: r.u16()?,
                pn: OptU64::new(r.opt_u64()?),
                lost: r.u8()?,
            }),
            _ => return Err(r.malformed("MTU probe flag")),
        };
        r.check(
            config.base <= current
                && u32::from(current) < too_big
                && too_big <= u32::from(config.max) + 1,
            "MTU sizes",
        )?;
        r.check(
            probe.is_none_or(|p| {
                current < p.size && p.size <= config.max && p.lost < config.max_probes
            }),
            "MTU probe",
        )?;
        Ok(PathMtu {
            config,
            state,
            current,
            too_big,
            first_of_search,
            probe,
            probe_chosen_at: r.opt_instant()?.into(),
            raise_at: r.opt_instant()?.into(),
            largest_full_acked: OptU64::new(r.opt_u64()?),
            loss_bursts: r.u8()?,
            in_burst: r.bool()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path carrying SAL payloads up to `path_mtu`; every probe is sent at once and
    /// acknowledged or lost according to its size. Returns the probes sent.
    fn converge(m: &mut PathMtu, path_mtu: u16, now: Instant, pn: &mut u64) -> u32 {
        let mut probes = 0;
        while let Some(size) = m.next_probe_size(now) {
            probes += 1;
            assert!(probes < 1000, "search does not terminate");
            *pn += 1;
            m.on_probe_sent(*pn, size);
            if size <= path_mtu {
                m.on_probe_acked(*pn);
            } else {
                m.on_probe_lost(*pn);
            }
        }
        probes
    }

    fn check(max: u16, path_mtu: u16, max_probes: u32) {
        let mut m = PathMtu::new(MtuConfig::new(max));
        let probes = converge(&mut m, path_mtu, Instant::ZERO, &mut 0);
        assert_eq!(m.state(), MtuState::SearchComplete);
        let expected = path_mtu.min(max);
        assert!(
            m.current() <= expected && expected - m.current() <= DEFAULT_GRANULARITY,
            "max {max}, path {path_mtu}: settled at {}",
            m.current()
        );
        assert!(
            probes <= max_probes,
            "max {max}, path {path_mtu}: {probes} probes"
        );
        assert_eq!(m.next_timeout(), Some(Instant::ZERO + PMTU_RAISE_TIMER));
    }

    #[test]
    fn link_payload_sizes() {
        assert_eq!(max_payload_for_link(1500, false, 0), 1472);
        assert_eq!(max_payload_for_link(1500, true, 32), 1420);
        assert_eq!(max_payload_for_link(65_536, false, 0), 65_507);
        assert_eq!(max_payload_for_link(65_536, true, 20), 65_468);
        assert_eq!(max_payload_for_link(1280, true, 100), BASE_PLPMTU);
        assert_eq!(max_payload_for_link(0, false, 0), BASE_PLPMTU);
        assert_eq!(max_payload_for_link(u32::MAX, false, 0), MAX_UDP_PAYLOAD_V4);
    }

    #[test]
    fn ethernet_path_with_matching_interface_takes_one_probe() {
        let max = max_payload_for_link(1500, false, 40);
        check(max, max, 1);
    }

    #[test]
    fn loopback_path_takes_one_probe() {
        let max = max_payload_for_link(65_536, false, 40);
        check(max, max, 1);
    }

    #[test]
    fn converges_on_a_1500_byte_path_behind_a_jumbo_interface() {
        let path = max_payload_for_link(1500, false, 40);
        // One full-size attempt (3 losses), then bisection over ~7.8 kB in 16-byte steps:
        // at most 9 sizes, each 1 probe if it fits or 3 if not.
        check(max_payload_for_link(9000, false, 40), path, 3 + 9 * 3);
        check(max_payload_for_link(65_536, false, 40), path, 3 + 12 * 3);
    }

    #[test]
    fn converges_on_a_65535_byte_path() {
        let max = max_payload_for_link(65_536, false, 40);
        check(max, 65_000, 3 + 12 * 3);
        check(max, 65_535, 1);
        check(max, BASE_PLPMTU, 3 + 12 * 3);
        check(max, 1_201, 3 + 12 * 3);
    }

    #[test]
    fn converges_for_every_path_between_base_and_max() {
        for path in (1200..=1600).step_by(7) {
            check(1600, path, 3 + 5 * 3);
        }
    }

    #[test]
    fn one_lost_probe_is_not_enough_to_give_up() {
        let mut m = PathMtu::new(MtuConfig::new(1472));
        let size = m.next_probe_size(Instant::ZERO).unwrap();
        assert_eq!(size, 1472);
        m.on_probe_sent(1, size);
        assert_eq!(
            m.next_probe_size(Instant::ZERO),
            None,
            "one probe at a time"
        );
        m.on_probe_lost(1);
        m.on_probe_lost(1); // duplicate report: ignored
        assert_eq!(m.next_probe_size(Instant::ZERO), Some(1472));
        m.on_probe_sent(2, 1472);
        m.on_probe_lost(2);
        m.on_probe_sent(3, 1472);
        m.on_probe_acked(3);
        assert_eq!(m.current(), 1472);
        assert_eq!(m.state(), MtuState::SearchComplete);
    }

    #[test]
    fn unknown_packet_numbers_are_ignored() {
        let mut m = PathMtu::new(MtuConfig::new(1472));
        m.next_probe_size(Instant::ZERO);
        m.on_probe_sent(5, 1472);
        let before = m.clone();
        m.on_probe_acked(4);
        m.on_probe_lost(6);
        m.on_probe_acked(u64::MAX);
        assert_eq!(m, before);
    }

    #[test]
    fn raise_timer_restarts_the_search() {
        let mut m = PathMtu::new(MtuConfig::new(9000));
        let t0 = Instant::ZERO + Duration::from_secs(5);
        let mut pn = 0;
        converge(&mut m, 1400, t0, &mut pn);
        let settled = m.current();
        let raise = m.next_timeout().unwrap();
        assert_eq!(raise, t0 + PMTU_RAISE_TIMER);
        assert_eq!(m.next_probe_size(t0 + Duration::from_secs(599)), None);
        // The path now carries more.
        converge(&mut m, 4000, raise, &mut pn);
        assert!(m.current() > settled && 4000 - m.current() <= DEFAULT_GRANULARITY);
        assert_eq!(m.next_timeout(), Some(raise + PMTU_RAISE_TIMER));
    }

    #[test]
    fn black_hole_falls_back_to_base_and_searches_below() {
        let mut m = PathMtu::new(MtuConfig::new(1472));
        let mut pn = 0;
        converge(&mut m, 1472, Instant::ZERO, &mut pn);
        assert_eq!(m.current(), 1472);
        // The route changes: only 1300 bytes get through. Three bursts of full-size losses,
        // each revealed by the acknowledgement of a small packet.
        let mut declared = Vec::new();
        for burst in 0..3 {
            for i in 0..4 {
                pn += 1;
                if m.on_packet_lost(pn, 1472) {
                    declared.push((burst, i));
                }
            }
            pn += 1;
            m.on_packet_acked(pn, 200);
        }
        assert_eq!(declared, vec![(2, 0)]);
        assert_eq!(m.current(), BASE_PLPMTU);
        assert_eq!(m.state(), MtuState::Searching);
        let probes = converge(&mut m, 1300, Instant::ZERO, &mut pn);
        assert!(1300 - m.current() <= DEFAULT_GRANULARITY);
        // The search stayed below the size that failed: no full-size attempt first.
        assert!(probes <= 4 * 3, "{probes}");
        // Already at the base: nothing to fall back to.
        let mut base = PathMtu::new(MtuConfig::new(1200));
        assert!(!base.on_black_hole());
    }

    #[test]
    fn congestion_losses_are_not_a_black_hole() {
        let mut m = PathMtu::new(MtuConfig::new(1472));
        let mut pn = 0;
        converge(&mut m, 1472, Instant::ZERO, &mut pn);
        for _ in 0..10 {
            // A burst of full-size losses, then full-size packets get through.
            for _ in 0..5 {
                pn += 1;
                assert!(!m.on_packet_lost(pn, 1472));
            }
            pn += 1;
            m.on_packet_acked(pn, 1472);
        }
        // Losses of packets older than an acknowledged full-size one are not suspicious.
        for old in 1..pn {
            assert!(!m.on_packet_lost(old, 1472));
        }
        // Neither are losses of small packets.
        for _ in 0..10 {
            pn += 1;
            assert!(!m.on_packet_lost(pn, 1000));
            m.on_packet_acked(pn + 1, 100);
        }
        assert_eq!(m.current(), 1472);
    }

    #[test]
    fn degenerate_configurations() {
        // max below base: nothing to search.
        let mut m = PathMtu::new(MtuConfig {
            max: 1000,
            max_probes: 0,
            granularity: 0,
            ..MtuConfig::new(1000)
        });
        assert_eq!(m.config().max, BASE_PLPMTU);
        assert_eq!(m.next_probe_size(Instant::ZERO), None);
        assert_eq!(m.state(), MtuState::SearchComplete);
        assert_eq!(m.current(), BASE_PLPMTU);
        // u16::MAX as the maximum: no overflow in the bounds.
        let mut m = PathMtu::new(MtuConfig::new(u16::MAX));
        converge(&mut m, u16::MAX, Instant::ZERO, &mut 0);
        assert_eq!(m.current(), u16::MAX);
        let mut m = PathMtu::new(MtuConfig::new(u16::MAX));
        converge(&mut m, 30_000, Instant::ZERO, &mut 0);
        assert!(30_000 - m.current() <= DEFAULT_GRANULARITY);
    }
}
