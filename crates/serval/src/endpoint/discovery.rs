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
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serval_table::{Action, Target};
use serval_wire::{Locator, ServicePrefix};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::{Endpoint, Shared};

/// The IPv4 discovery group (in the organisation-local scope, 239.255.0.0/16).
pub const DEFAULT_DISCOVERY_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 86, 76);
/// The UDP port of the discovery group.
pub const DEFAULT_DISCOVERY_PORT: u16 = 54323;
/// How long a connect through the group waits for an instance to answer.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of routerless mode ([`Endpoint::enable_discovery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The IPv4 multicast group SYNs are sent to.
    pub group: Ipv4Addr,
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
            port: DEFAULT_DISCOVERY_PORT,
            connect_timeout: DEFAULT_DISCOVERY_TIMEOUT,
        }
    }
}

impl DiscoveryConfig {
    /// The group's locator.
    pub fn locator(&self) -> Locator {
        SocketAddr::from((self.group, self.port))
    }
}

impl Endpoint {
    /// Turns on routerless mode (see the [module docs](self)): this endpoint answers SYNs
    /// multicast to `config.group` for the services it listens on, and sends SYNs that no
    /// other rule resolves to the group. Must be called within a Tokio runtime.
    ///
    /// An endpoint bound to `0.0.0.0` joins the group and sends to it on the interface of the
    /// host's route to the group (a default route or one to 224.0.0.0/4); bind a specific
    /// address to choose the interface.
    pub fn enable_discovery(&self, config: DiscoveryConfig) -> io::Result<()> {
        if !config.group.is_multicast() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a multicast group", config.group),
            ));
        }
        let v4: Vec<(usize, Locator)> = (self.shared.sockets.iter().enumerate())
            .filter(|(_, s)| s.local.is_ipv4())
            .map(|(i, s)| (i, s.local))
            .collect();
        let Some(&(_, answer_from)) = v4.first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "routerless mode needs an IPv4 address",
            ));
        };
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port)).into())?;
        let mut joined: Vec<Ipv4Addr> = Vec::new();
        for &(i, local) in &v4 {
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
            let s = SockRef::from(&self.shared.sockets[i].io);
            s.set_multicast_ttl_v4(1)?;
            s.set_multicast_loop_v4(true)?;
            if !iface.is_unspecified() {
                s.set_multicast_if_v4(&iface)?;
            }
        }
        sock.set_nonblocking(true)?;
        let io = tokio::net::UdpSocket::from_std(StdUdpSocket::from(sock))?;
        let group = config.locator();
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
        tokio::spawn(receive(Arc::downgrade(&self.shared), io, answer_from));
        Ok(())
    }
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
