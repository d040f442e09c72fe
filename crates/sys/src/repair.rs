//! The kernel calls of `pause-bench`'s TCP_REPAIR peer (issue 10): entering a network
//! namespace from one thread, freezing a live TCP socket and reading its whole state
//! (sequence numbers, send and receive queues, options, window), recreating it elsewhere,
//! moving an IPv4 address between namespaces (rtnetlink) and announcing it (gratuitous ARP).
//! This is the hand-off CRIU's libsoccr does, written out because Debian's `criu` does not run
//! on this kernel.
//!
//! **Why `unsafe` here:** `setns(2)`, the `TCP_REPAIR` family of socket options, the
//! `SIOCOUTQ`/`SIOCINQ` ioctls and an `AF_PACKET` `sendto` have no safe wrapper in the crates
//! this workspace uses; this crate is the workspace's one place for such calls, each with its
//! own SAFETY note.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `TCP_REPAIR_QUEUE` values (include/uapi/linux/tcp.h).
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCP_REPAIR_OPTIONS` codes: the TCP option kinds.
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn set<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` points to a live, initialised `T` of exactly the length passed, for the
    // duration of the call; the kernel only reads it.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

fn get<T: Copy + Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut val = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a live `T` of `len` bytes the kernel may write (it writes at most
    // `len` and reports how much); `T` here is only ever a plain integer or integer array.
    check(unsafe { libc::getsockopt(fd, level, name, (&mut val as *mut T).cast(), &mut len) })?;
    Ok(val)
}

fn tcp_set<T: Copy>(fd: RawFd, name: libc::c_int, val: &T) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, name, val)
}

fn tcp_get<T: Copy + Default>(fd: RawFd, name: libc::c_int) -> io::Result<T> {
    get(fd, libc::IPPROTO_TCP, name)
}

/// An `int`-valued ioctl (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
pub(crate) fn ioctl_int(fd: RawFd, request: libc::c_ulong) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write one `int` through the pointer, which is live.
    check(unsafe { libc::ioctl(fd, request as _, &mut v as *mut libc::c_int) })?;
    Ok(usize::try_from(v).unwrap_or(0))
}

/// Moves the calling thread (only it) into the network namespace `name` (`ip netns add`'s
/// `/run/netns/NAME`): sockets it creates from then on live there, as do threads it spawns.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `f` is an open namespace file for the whole call; setns only changes the
    // calling thread's namespace.
    check(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// Everything a frozen TCP socket's successor needs: what `libsoccr` dumps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frozen {
    /// The socket's own address (the service address that moves).
    pub local: SocketAddrV4,
    /// The client's.
    pub peer: SocketAddrV4,
    /// Sequence number of the first byte of `sent` (`snd_una`).
    pub send_seq: u32,
    /// Sent and not yet acknowledged.
    pub sent: Vec<u8>,
    /// Written by the application, never sent.
    pub unsent: Vec<u8>,
    /// Sequence number of the first byte of `received` (`rcv_nxt` minus what is unread).
    pub recv_seq: u32,
    /// Received and not yet read by the application.
    pub received: Vec<u8>,
    /// `TCP_MAXSEG`.
    pub mss: u32,
    /// `tcpi_options` (timestamps, SACK, window scaling).
    pub options: u8,
    /// The peer's window scale.
    pub snd_wscale: u8,
    /// Ours.
    pub rcv_wscale: u8,
    /// `TCP_TIMESTAMP`: the socket's timestamp clock (keeps TSvals monotonic at the peer).
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

/// Bytes written to `s` and never sent (`SIOCOUTQNSD`).
pub fn unsent(s: &TcpStream) -> io::Result<usize> {
    ioctl_int(s.as_raw_fd(), libc::SIOCOUTQNSD)
}

/// Puts `s` in repair mode: closing it then sends nothing (no FIN, no RST), and its state
/// can be read. It still processes what arrives (an ACK can even make it transmit): keep
/// packets away from it first, as CRIU's network lock does.
pub fn freeze(s: &TcpStream) -> io::Result<()> {
    tcp_set(s.as_raw_fd(), libc::TCP_REPAIR, &1i32)
}

/// Reads the state of a frozen socket (see [`freeze`]).
pub fn dump(s: &TcpStream) -> io::Result<Frozen> {
    let fd = s.as_raw_fd();
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (s.local_addr()?, s.peer_addr()?) else {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "IPv4 only"));
    };
    // Send queue: everything from snd_una to write_seq; the tail never sent.
    tcp_set(fd, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
    let write_seq: u32 = tcp_get(fd, libc::TCP_QUEUE_SEQ)?;
    let outq = ioctl_int(fd, libc::TIOCOUTQ)?;
    let mut queue = peek_queue(fd, outq)?;
    // An ACK that got in since the ioctl shortens the queue: the peek is what counts.
    let unsent_len = ioctl_int(fd, libc::SIOCOUTQNSD)?.min(queue.len());
    let unsent = queue.split_off(queue.len() - unsent_len);
    let send_seq = write_seq.wrapping_sub((queue.len() + unsent.len()) as u32);
    // Receive queue: what the application has not read.
    tcp_set(fd, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
    let rcv_nxt: u32 = tcp_get(fd, libc::TCP_QUEUE_SEQ)?;
    let inq = ioctl_int(fd, libc::FIONREAD)?;
    let received = peek_queue(fd, inq)?;
    let recv_seq = rcv_nxt.wrapping_sub(received.len() as u32);
    let mss: i32 = tcp_get(fd, libc::TCP_MAXSEG)?;
    // struct tcp_info starts with u8 state, ca_state, retransmits, probes, backoff, options,
    // then snd_wscale:4 | rcv_wscale:4.
    let info: [u8; 8] = tcp_get(fd, libc::TCP_INFO)?;
    let timestamp: u32 = tcp_get(fd, libc::TCP_TIMESTAMP)?;
    let window: [u32; 5] = tcp_get(fd, libc::TCP_REPAIR_WINDOW)?;
    Ok(Frozen {
        local,
        peer,
        send_seq,
        sent: queue,
        unsent,
        recv_seq,
        received,
        mss: u32::try_from(mss).unwrap_or(536),
        options: info[5],
        snd_wscale: info[6] & 0x0f,
        rcv_wscale: info[6] >> 4,
        timestamp,
        window,
    })
}

/// Copies the queue `TCP_REPAIR_QUEUE` selects (at most `len` bytes) without consuming it.
fn peek_queue(fd: RawFd, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    // SAFETY: `buf` is live and writable for `len` bytes; MSG_PEEK on a repair-mode socket
    // copies the selected queue into it and consumes nothing.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            len,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(buf)
}

/// Recreates the frozen socket `f` here (its address must be local here by now), in repair
/// mode, restores its state and turns repair off: the kernel then sends a window probe, the
/// peer's ACK resynchronises, and the connection carries on. The never-sent part of the
/// queue (`f.unsent`) is the caller's to write, like any later data.
pub fn restore(f: &Frozen, send_buffer: Option<usize>) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let fd = sock.as_raw_fd();
    tcp_set(fd, libc::TCP_REPAIR, &1i32)?;
    sock.set_reuse_address(true)?;
    if let Some(b) = send_buffer {
        sock.set_send_buffer_size(b)?;
    }
    // Sequence numbers, while the socket is still closed.
    tcp_set(fd, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
    tcp_set(fd, libc::TCP_QUEUE_SEQ, &f.send_seq)?;
    tcp_set(fd, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
    tcp_set(fd, libc::TCP_QUEUE_SEQ, &f.recv_seq)?;
    if f.options & TCPI_OPT_TIMESTAMPS != 0 {
        tcp_set(fd, libc::TCP_TIMESTAMP, &f.timestamp)?;
    }
    // In repair mode connect() sends no SYN: the socket is established at once.
    sock.bind(&SockAddr::from(SocketAddr::V4(f.local)))?;
    sock.connect(&SockAddr::from(SocketAddr::V4(f.peer)))?;
    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MSS, f.mss]];
    if f.options & TCPI_OPT_WSCALE != 0 {
        opts.push([
            TCPOPT_WINDOW,
            u32::from(f.snd_wscale) | (u32::from(f.rcv_wscale) << 16),
        ]);
    }
    if f.options & TCPI_OPT_SACK != 0 {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if f.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    let bytes: Vec<u8> = opts
        .iter()
        .flat_map(|o| o.iter().flat_map(|v| v.to_ne_bytes()))
        .collect();
    // SAFETY: `bytes` is a live array of `struct tcp_repair_opt { u32 code; u32 val; }` in
    // native byte order, of exactly the length passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    })?;
    // Queues: written in repair mode, the send queue counts as sent and unacknowledged, the
    // receive queue as received and unread.
    tcp_set(fd, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
    send_all(&sock, &f.sent)?;
    tcp_set(fd, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
    send_all(&sock, &f.received)?;
    tcp_set(fd, libc::TCP_REPAIR_WINDOW, &f.window)?;
    // TCP_REPAIR_OFF (0): the kernel sends a window probe.
    tcp_set(fd, libc::TCP_REPAIR, &0i32)?;
    Ok(TcpStream::from(sock))
}

fn send_all(sock: &Socket, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = sock.send(data)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Adds (`add`) or deletes the address `ip/32` on interface `ifindex` of the calling
/// thread's namespace, by rtnetlink, waiting for the kernel's answer.
pub fn set_address(ifindex: u32, ip: Ipv4Addr, add: bool) -> io::Result<()> {
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const NLMSG_ERROR: u16 = 2;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    let sock = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    let (kind, flags) = if add {
        (
            libc::RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (libc::RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
    };
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel assigns
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    m.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    for attr in [IFA_LOCAL, IFA_ADDRESS] {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&attr.to_ne_bytes());
        m.extend_from_slice(&ip.octets());
    }
    (&sock).write_all(&m)?;
    let mut answer = [0u8; 256];
    let n = (&sock).read(&mut answer)?;
    let field = |at: usize| answer.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match (n >= 20, kind, field(16).map(i32::from_ne_bytes)) {
        (true, Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (true, Some(NLMSG_ERROR), Some(e)) => Err(io::Error::from_raw_os_error(-e)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected rtnetlink answer",
        )),
    }
}

/// A packet socket ready to broadcast gratuitous ARP requests on one interface (of the
/// namespace of the thread that made it). Made ahead of the move: closing an `AF_PACKET`
/// socket waits for an RCU grace period (`synchronize_net`, milliseconds), so it is dropped
/// only after the restore.
pub struct Announcer {
    sock: Socket,
    ifindex: u32,
    mac: [u8; 6],
}

impl Announcer {
    /// For interface `ifindex`, whose MAC is `mac`.
    pub fn new(ifindex: u32, mac: [u8; 6]) -> io::Result<Announcer> {
        let proto = (libc::ETH_P_ARP as u16).to_be();
        let sock = Socket::new(
            Domain::PACKET,
            Type::DGRAM,
            Some(Protocol::from(i32::from(proto))),
        )?;
        Ok(Announcer { sock, ifindex, mac })
    }

    /// Broadcasts a gratuitous ARP request for `ip` at this interface's MAC: neighbours that
    /// cache `ip` update it at once.
    pub fn announce(&self, ip: Ipv4Addr) -> io::Result<()> {
        let mut arp = Vec::with_capacity(28);
        arp.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
        arp.extend_from_slice(&self.mac);
        arp.extend_from_slice(&ip.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&ip.octets());
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are then set as plain integers.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        to.sll_ifindex = self.ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: `arp` and `to` are live for the call, with the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                arp.as_ptr().cast(),
                arp.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Frozen {
    /// The state as bytes, to carry to the new namespace.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.sent.len() + self.unsent.len());
        for a in [self.local, self.peer] {
            b.extend_from_slice(&a.ip().octets());
            b.extend_from_slice(&a.port().to_be_bytes());
        }
        for v in [self.send_seq, self.recv_seq, self.mss, self.timestamp] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&[self.options, self.snd_wscale, self.rcv_wscale]);
        for v in self.window {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for q in [&self.sent, &self.unsent, &self.received] {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q);
        }
        b
    }

    /// The inverse of [`encode`](Self::encode); `None` if `b` is not one.
    pub fn decode(b: &[u8]) -> Option<Frozen> {
        let mut r = Cursor(b);
        let (local, peer) = (r.addr()?, r.addr()?);
        let (send_seq, recv_seq, mss, timestamp) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let flags = r.take(3)?;
        let (options, snd_wscale, rcv_wscale) = (flags[0], flags[1], flags[2]);
        let window = [r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?];
        let (sent, unsent, received) = (r.queue()?, r.queue()?, r.queue()?);
        Some(Frozen {
            local,
            peer,
            send_seq,
            sent,
            unsent,
            recv_seq,
            received,
            mss,
            options,
            snd_wscale,
            rcv_wscale,
            timestamp,
            window,
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = t;
        Some(h)
    }

    fn u32(&mut self) -> Option<u32> {
        let v = self.take(4)?;
        Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    fn addr(&mut self) -> Option<SocketAddrV4> {
        let a = self.take(6)?;
        Some(SocketAddrV4::new(
            Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            u16::from_be_bytes([a[4], a[5]]),
        ))
    }

    fn queue(&mut self) -> Option<Vec<u8>> {
        let l = self.u32()? as usize;
        self.take(l).map(<[u8]>::to_vec)
    }
}
