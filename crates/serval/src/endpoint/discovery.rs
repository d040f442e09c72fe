//! Routerless mode: endpoints on one subnet find each other by name through a link-local
//! multicast group, with no router (DESIGN.md §4, "ad-hoc mode").
//!
//! [`Endpoint::enable_discovery`] binds a shared socket on the group's port (several endpoints
//! of one host can all bind it), joins the group on each of the endpoint's IPv4 addresses,
//! makes the endpoint's own sockets send multicast on those addresses with a TTL of 1, and adds
//! a lowest-priority `/0` rule forwarding SYNs to the group unless a default route exists (a
//! router always wins). The engine answers a SYN from the group only if a local listener serves
//! it, from the endpoint's own unicast socket, so the client learns the instance's locator and
//! everything after the SYN is unicast.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serval_table::{Action, Target};
use serval_wire::{Locator, ServicePrefix};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::{Endpoint, Shared};

/// The IPv4 discovery group (in the organisation-local scope, 239.255.0.0/16).
pub const DEFAULT_DISCOVERY_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 86, 76);
/// The IPv6 discovery group (link-local scope).
pub const DEFAULT_DISCOVERY_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x5653);
/// The UDP port of the discovery group.
pub const DEFAULT_DISCOVERY_PORT: u16 = 54323;
/// How long a connect through the group waits for an instance to answer.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of routerless mode ([`Endpoint::enable_discovery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The IPv4 multicast group SYNs are sent to.
    pub group: Ipv4Addr,
    /// The IPv6 multicast group, for the endpoint's IPv6 addresses.
    pub group_v6: Ipv6Addr,
    /// Its UDP port.
    pub port: u16,
    /// How long a connect resolved to the group waits for an instance's SYN-ACK before it
    /// fails with "no instance answered": in ad-hoc mode silence is the only answer for an
    /// unknown name, so this is shorter than the SYN's own retransmission budget.
    pub connect_timeout: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            group: DEFAULT_DISCOVERY_GROUP,
            group_v6: DEFAULT_DISCOVERY_GROUP_V6,
            port: DEFAULT_DISCOVERY_PORT,
            connect_timeout: DEFAULT_DISCOVERY_TIMEOUT,
        }
    }
}

impl DiscoveryConfig {
    /// The IPv4 group's locator.
    pub fn locator(&self) -> Locator {
        SocketAddr::from((self.group, self.port))
    }

    /// The IPv6 group's locator.
    pub fn locator_v6(&self) -> Locator {
        SocketAddr::V6(SocketAddrV6::new(self.group_v6, self.port, 0, 0))
    }
}

impl Endpoint {
    /// Turns on routerless mode (DESIGN.md §4, "ad-hoc mode"; `docs/architecture.md`, "Routerless
    /// mode"), so endpoints on one LAN find each other by name with no router: this endpoint
    /// binds a shared socket (`SO_REUSEPORT`) on the group's port and answers SYNs
    /// multicast to the discovery groups for the services it listens on — `config.group` on
    /// its IPv4 addresses, `config.group_v6` on its IPv6 ones — and sends SYNs that no other
    /// rule resolves to the group of its first family (IPv4 if it has an IPv4 address). Must
    /// be called within a Tokio runtime. A connect through the group that no instance answers
    /// within `config.connect_timeout` fails with [`io::ErrorKind::HostUnreachable`], "no route
    /// to service … (no instance answered on the local network)". A router set before or after
    /// ([`Endpoint::set_default_route`], `set_router`) replaces the group as the default.
    ///
    /// An endpoint bound to `0.0.0.0` joins the group and sends to it on the interface of the
    /// host's route to the group (a default route or one to 224.0.0.0/4), and fails at once if
    /// there is none; bind a specific address to choose the interface. One bound to `[::]`
    /// uses the kernel's default multicast interface.
    pub fn enable_discovery(&self, config: DiscoveryConfig) -> io::Result<()> {
        for g in [IpAddr::V4(config.group), IpAddr::V6(config.group_v6)] {
            if !g.is_multicast() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{g} is not a multicast group"),
                ));
            }
        }
        let family = |v4: bool| -> Vec<(usize, Locator)> {
            (self.shared.sockets.load().iter().enumerate())
                .filter(|(_, s)| s.local.is_ipv4() == v4)
                .map(|(i, s)| (i, s.local))
                .collect()
        };
        let (v4, v6) = (family(true), family(false));
        let mut receivers = Vec::new();
        if let Some(&(_, answer_from)) = v4.first() {
            receivers.push((self.join_v4(&config, &v4)?, answer_from));
        }
        if let Some(&(_, answer_from)) = v6.first() {
            receivers.push((self.join_v6(&config, &v6)?, answer_from));
        }
        let group = if v4.is_empty() {
            config.locator_v6()
        } else {
            config.locator()
        };
        let table = &self.shared.table;
        let routed = table
            .snapshot()
            .get(&ServicePrefix::DEFAULT)
            .is_some_and(|t| !t.is_empty());
        if !routed {
            // Priority 0 is the lowest; `set_default_route` replaces this rule.
            let _ = table.add_target(
                ServicePrefix::DEFAULT,
                Target::new(Action::Forward(group), 0, 1),
            );
        }
        self.shared.lock().discovery = Some((group, config.connect_timeout));
        for (io, answer_from) in receivers {
            tokio::spawn(receive(Arc::downgrade(&self.shared), io, answer_from));
        }
        Ok(())
    }

    /// Binds the IPv4 group socket, joins the group on each address of `socks`, and sets
    /// those sockets' multicast interface and TTL.
    fn join_v4(
        &self,
        config: &DiscoveryConfig,
        socks: &[(usize, Locator)],
    ) -> io::Result<tokio::net::UdpSocket> {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port)).into())?;
        let mut joined: Vec<Ipv4Addr> = Vec::new();
        for &(i, local) in socks {
            let SocketAddr::V4(a) = local else { continue };
            let iface = *a.ip();
            if iface.is_unspecified() {
                check_route(config.group, config.port)?;
            }
            // Two sockets on one address share the membership.
            if !joined.contains(&iface) {
                sock.join_multicast_v4(&config.group, &iface).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot join {} on {iface}: {e}", config.group),
                    )
                })?;
                joined.push(iface);
            }
            let socks = self.shared.sockets.load();
            let s = SockRef::from(socks[i].io.get_ref());
            s.set_multicast_ttl_v4(1)?;
            s.set_multicast_loop_v4(true)?;
            if !iface.is_unspecified() {
                s.set_multicast_if_v4(&iface)?;
            }
        }
        sock.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(StdUdpSocket::from(sock))
    }

    /// [`Endpoint::join_v4`] for IPv6: the interface is named by index (found from the
    /// address in `/proc/net/if_inet6`), and the hop limit is 1.
    fn join_v6(
        &self,
        config: &DiscoveryConfig,
        socks: &[(usize, Locator)],
    ) -> io::Result<tokio::net::UdpSocket> {
        let sock = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        sock.set_only_v6(true)?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, config.port)).into())?;
        let mut joined: Vec<u32> = Vec::new();
        for &(i, local) in socks {
            let SocketAddr::V6(a) = local else { continue };
            let index = if a.ip().is_unspecified() {
                0
            } else {
                interface_index(a.ip())?
            };
            if !joined.contains(&index) {
                sock.join_multicast_v6(&config.group_v6, index)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot join {} on {}: {e}", config.group_v6, a.ip()),
                        )
                    })?;
                joined.push(index);
            }
            let socks = self.shared.sockets.load();
            let s = SockRef::from(socks[i].io.get_ref());
            s.set_multicast_hops_v6(1)?;
            s.set_multicast_loop_v6(true)?;
            if index != 0 {
                s.set_multicast_if_v6(index)?;
            }
        }
        sock.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(StdUdpSocket::from(sock))
    }
}

/// The index of the interface that holds `addr`, from `/proc/net/if_inet6` (lines of the
/// address in 32 hex digits, then the index in hex, …).
fn interface_index(addr: &Ipv6Addr) -> io::Result<u32> {
    let table = std::fs::read_to_string("/proc/net/if_inet6")?;
    let want: String = addr.octets().iter().map(|b| format!("{b:02x}")).collect();
    table
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?))
        })
        .find(|(a, _)| a.eq_ignore_ascii_case(&want))
        .and_then(|(_, index)| u32::from_str_radix(index, 16).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("no interface holds {addr}"),
            )
        })
}

/// For a socket bound to `0.0.0.0`, the kernel picks the group's interface by route: fail now,
/// clearly, if there is none (rather than time out on SYNs that can never leave).
fn check_route(group: Ipv4Addr, port: u16) -> io::Result<()> {
    let probe = StdUdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    probe.connect((group, port)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "no route to the discovery group {group} from 0.0.0.0 ({e}): bind a specific \
                 address to choose the interface, or add a route to 224.0.0.0/4"
            ),
        )
    })
}

/// Feeds what arrives on the group to the engine, until the endpoint is gone.
async fn receive(weak: Weak<Shared>, io: tokio::net::UdpSocket, local: Locator) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let r = tokio::select! {
            r = io.recv_from(&mut buf) => r,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if weak.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let Some(shared) = weak.upgrade() else { return };
        match r {
            Ok((n, from)) => {
                let mut st = shared.lock();
                let now = st.now();
                st.engine
                    .handle_discovery_datagram(now, local, from, &buf[..n]);
                st.dispatch();
                drop(st);
                shared.wake.notify_one();
            }
            Err(e) => tracing::debug!(error = %e, "discovery receive failed"),
        }
    }
}
