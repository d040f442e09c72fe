//! The Linux half of [`crate::netwatch`]: an rtnetlink socket subscribed to link and address
//! changes, whose messages become [`NetEvent`]s. Nothing here decides anything.
//!
//! At start, and whenever the kernel reports that it dropped notifications (`ENOBUFS`: the
//! socket's buffer overflowed), the task dumps every link and address and hands the result
//! over as one [`NetEvent::Snapshot`], so a lost message never leaves a stale view behind.
//! Notifications are applied as they come, dump replies collected until both dumps end.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

use super::NetEvent;

/// rtnetlink multicast groups (`RTMGRP_*` of `<linux/rtnetlink.h>`): links, IPv4 and IPv6
/// addresses.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Sequence numbers of our two dump requests (notifications carry 0).
const SEQ_LINKS: u32 = 1;
const SEQ_ADDRS: u32 = 2;

/// A subscribed rtnetlink socket. Opened in the caller's network namespace (the thread that
/// binds the endpoint), which is the one whose changes it reports.
pub(crate) struct Watcher {
    socket: TokioSocket,
    /// A dump in progress: what it found so far, and which request is outstanding.
    dump: Option<Dump>,
}

#[derive(Default)]
struct Dump {
    links: Vec<(u32, bool, bool)>,
    addresses: Vec<(IpAddr, u32, bool)>,
    waiting_for: u32,
}

impl Watcher {
    /// Opens the socket and subscribes to link and address changes; needs a tokio runtime.
    pub(crate) fn open() -> io::Result<Watcher> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket.socket_mut().bind(&SocketAddr::new(
            0,
            RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
        ))?;
        // Larger than the default so a burst (an interface with many addresses going down)
        // rarely overflows; if it does, ENOBUFS starts a fresh dump.
        let _ = socket.socket_ref().set_rx_buf_sz(1usize << 20);
        Ok(Watcher { socket, dump: None })
    }

    /// Starts a dump if none ran yet (or the last overflowed). Call before [`recv`](Self::recv).
    pub(crate) async fn ensure_dump(&mut self) -> io::Result<()> {
        if self.dump.is_none() {
            self.dump = Some(Dump::default());
            self.request(SEQ_LINKS).await?;
        }
        Ok(())
    }

    /// Waits for the kernel's next datagram (cancel-safe: nothing is consumed until it
    /// returns). `Ok(None)`: notifications were lost, a fresh dump follows.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.socket.recv_from_full().await {
            Ok((bytes, _)) => Ok(Some(bytes)),
            Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                tracing::debug!("rtnetlink notifications overflowed; dumping again");
                self.dump = None;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The events one datagram from [`recv`](Self::recv) makes (possibly none); sends the
    /// dump's next request when one part ends.
    pub(crate) async fn handle(&mut self, bytes: &[u8]) -> io::Result<Vec<NetEvent>> {
        let mut events = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
            else {
                // A message this crate cannot parse: skip the rest of this datagram.
                break;
            };
            let len = msg.header.length as usize;
            let seq = msg.header.sequence_number;
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => {
                    if let Some(ev) = translate(m) {
                        match self.dump.as_mut() {
                            Some(d) if seq != 0 && d.waiting_for == seq => d.add(ev),
                            _ => events.push(ev),
                        }
                    }
                }
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => {
                    if let Some(ev) = self.dump_part_done(seq).await? {
                        events.push(ev);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
        Ok(events)
    }

    /// A dump request ended: ask for addresses after links; after addresses, the snapshot.
    async fn dump_part_done(&mut self, seq: u32) -> io::Result<Option<NetEvent>> {
        let Some(d) = self
            .dump
            .as_mut()
            .filter(|d| seq != 0 && d.waiting_for == seq)
        else {
            return Ok(None);
        };
        if seq == SEQ_LINKS {
            self.request(SEQ_ADDRS).await?;
            return Ok(None);
        }
        let d = std::mem::take(d);
        // Stays `Some` with nothing outstanding: no new dump until an overflow.
        if let Some(slot) = self.dump.as_mut() {
            slot.waiting_for = 0;
        }
        Ok(Some(NetEvent::Snapshot {
            addresses: d.addresses,
            links: d.links,
        }))
    }

    async fn request(&mut self, seq: u32) -> io::Result<()> {
        let inner = if seq == SEQ_LINKS {
            RouteNetlinkMessage::GetLink(LinkMessage::default())
        } else {
            RouteNetlinkMessage::GetAddress(AddressMessage::default())
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_DUMP | NLM_F_REQUEST;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        if let Some(d) = self.dump.as_mut() {
            d.waiting_for = seq;
        }
        self.socket.send(&buf).await.map(|_| ())
    }
}

impl Dump {
    fn add(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Address { ip, ifindex, ready } => self.addresses.push((ip, ifindex, ready)),
            NetEvent::Link {
                ifindex,
                up,
                carrier,
            } => self.links.push((ifindex, up, carrier)),
            _ => {}
        }
    }
}

/// `ENOBUFS` on Linux: the socket's receive buffer overflowed and notifications were lost.
const ENOBUFS: i32 = 105;

/// One rtnetlink message as a [`NetEvent`] (`None` for what does not concern us).
fn translate(m: RouteNetlinkMessage) -> Option<NetEvent> {
    match m {
        RouteNetlinkMessage::NewLink(l) => Some(NetEvent::Link {
            ifindex: l.header.index,
            up: l.header.flags.contains(LinkFlags::Up),
            carrier: l.header.flags.contains(LinkFlags::Running),
        }),
        RouteNetlinkMessage::DelLink(l) => Some(NetEvent::LinkGone {
            ifindex: l.header.index,
        }),
        RouteNetlinkMessage::NewAddress(a) => {
            let ip = address_of(&a)?;
            Some(NetEvent::Address {
                ip,
                ifindex: a.header.index,
                ready: ready(&a),
            })
        }
        RouteNetlinkMessage::DelAddress(a) => Some(NetEvent::AddressGone {
            ip: address_of(&a)?,
            ifindex: a.header.index,
        }),
        _ => None,
    }
}

/// The local address of an address message: IFA_LOCAL when present (on a point-to-point
/// IPv4 link IFA_ADDRESS is the peer's), IFA_ADDRESS otherwise.
fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// Whether an address can be used as a source: not tentative, DAD not failed. The 32-bit
/// IFA_FLAGS attribute, when present, supersedes the header's 8 bits.
fn ready(a: &AddressMessage) -> bool {
    let flags = a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    });
    match flags {
        Some(f) => !f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed),
        None => !a
            .header
            .flags
            .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed),
    }
}
