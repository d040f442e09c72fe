//! How far the application of a live TCP socket has written and read, from the kernel's
//! counters: what `serval expose --standby-of` reads from a dead primary's backend sockets to
//! learn which bytes it wrote and consumed after its last replicated step (issue 10; docs
//! /moving-flows.md §3.4).
//!
//! Also `SO_PEEK_OFF` ([`set_peek_offset`]), for peeking ahead of what was consumed.
//!
//! **Why `unsafe` here:** `getsockopt(TCP_INFO)` fills a C struct; the `SIOCINQ`/`SIOCOUTQ`
//! ioctls (`TIOCOUTQ`/`FIONREAD` in libc's names) are reached through [`crate::repair`]'s helper.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `tcpi_state` values (include/net/tcp_states.h).
const ESTABLISHED: u8 = 1;
const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const TIME_WAIT: u8 = 6;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// A TCP socket's progress, in bytes of its two byte streams (the SYN and FIN are not
/// counted). A socket reset by its peer reads as closed both ways. Both counts start at the connection's establishment, give or take the SYN:
/// subtract the counts read right after connecting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes the application wrote: acknowledged by the peer, or still queued.
    pub written: u64,
    /// Bytes the application read (consumed from the receive queue).
    pub read: u64,
    /// Our FIN went out (the application shut the socket down for writing).
    pub fin_sent: bool,
    /// The peer's FIN arrived.
    pub fin_received: bool,
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is a plain C struct of integers, for which all-zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is live and `len` bytes long; the kernel writes at most `len` bytes into
    // it and reports how many.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // Kernels before 4.1 stop before the byte counters.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_segs_out);
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's TCP_INFO has no byte counters (Linux 4.1 or later needed)",
        ));
    }
    Ok(info)
}

/// Reads `fd`'s [`Counts`]. The kernel keeps acknowledging and receiving meanwhile, so the
/// counters are read around the queue sizes until two reads agree (a socket nobody else
/// reads or writes settles at once).
pub fn counts(fd: BorrowedFd<'_>) -> io::Result<Counts> {
    for _ in 0..100 {
        let before = tcp_info(fd)?;
        let outq = crate::repair::ioctl_int(fd.as_raw_fd(), libc::TIOCOUTQ)? as u64;
        let inq = crate::repair::ioctl_int(fd.as_raw_fd(), libc::FIONREAD)? as u64;
        let after = tcp_info(fd)?;
        if (
            before.tcpi_bytes_acked,
            before.tcpi_bytes_received,
            before.tcpi_state,
        ) != (
            after.tcpi_bytes_acked,
            after.tcpi_bytes_received,
            after.tcpi_state,
        ) {
            continue;
        }
        let state = after.tcpi_state;
        // A socket whose both FINs are through leaves TIME-WAIT for CLOSE at once while a
        // descriptor holds it; so does a reset one, whose counts are then taken as final.
        let fin_sent = matches!(
            state,
            FIN_WAIT1 | FIN_WAIT2 | CLOSING | TIME_WAIT | LAST_ACK | CLOSE
        );
        let fin_received = matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING | TIME_WAIT | CLOSE);
        if !fin_sent && !fin_received && state != ESTABLISHED {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("the socket is in TCP state {state}, not connected"),
            ));
        }
        // The FIN takes a sequence number: counted in the acknowledged bytes or the send
        // queue once sent, and in the received bytes once it arrived (SIOCINQ leaves it out).
        let written = (after.tcpi_bytes_acked + outq).saturating_sub(u64::from(fin_sent));
        let read = after
            .tcpi_bytes_received
            .saturating_sub(inq + u64::from(fin_received));
        return Ok(Counts {
            written,
            read,
            fin_sent,
            fin_received,
        });
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the socket's counters kept changing under a hundred reads",
    ))
}

/// Makes `MSG_PEEK` reads of `fd` continue where the last one ended (`SO_PEEK_OFF`; TCP has
/// it since Linux 6.9, older kernels refuse it): bytes peeked once are not copied again, and
/// a read that consumes bytes moves the offset back by as many. `serval expose` peeks its
/// backend's bytes ahead of consuming them while a standby confirms them.
pub fn set_peek_offset(fd: BorrowedFd<'_>, offset: u32) -> io::Result<()> {
    let off = libc::c_int::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "peek offset too large"))?;
    crate::repair::set(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, &off)
}

/// Drops up to `n` bytes from the head of `fd`'s receive queue without copying them
/// (`recv(MSG_TRUNC)`, which TCP takes as "discard"); how many it dropped. Non-blocking:
/// `WouldBlock` when the queue is empty.
pub fn discard(fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
    // SAFETY: with MSG_TRUNC a TCP socket copies nothing into the buffer (a null pointer is
    // never dereferenced); MSG_DONTWAIT keeps the call from blocking.
    let r = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            n,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    /// Counts move with what each end writes and reads, and the FINs are seen, not counted.
    #[test]
    fn counts_follow_writes_reads_and_fins() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        let base = counts(a.as_fd()).unwrap();
        assert!(!base.fin_sent && !base.fin_received);
        a.write_all(&[7u8; 3000]).unwrap();
        b.write_all(&[9u8; 500]).unwrap();
        let mut got = [0u8; 1000];
        b.read_exact(&mut got).unwrap();
        // Wait for the 500 bytes to arrive, then read 200 of them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = [0u8; 200];
        a.read_exact(&mut buf).unwrap();
        while counts(a.as_fd()).unwrap().written - base.written != 3000 {
            assert!(std::time::Instant::now() < deadline);
        }
        let c = counts(a.as_fd()).unwrap();
        assert_eq!(c.written - base.written, 3000);
        assert_eq!(c.read - base.read, 200);
        b.shutdown(std::net::Shutdown::Write).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 2000);
        while !counts(a.as_fd()).unwrap().fin_received {
            assert!(std::time::Instant::now() < deadline);
        }
        let c = counts(a.as_fd()).unwrap();
        assert!(c.fin_sent && c.fin_received);
        assert_eq!(c.written - base.written, 3000);
        assert_eq!(c.read - base.read, 200);
        a.read_exact(&mut buf[..100]).unwrap();
        assert_eq!(counts(a.as_fd()).unwrap().read - base.read, 300);
    }

    /// With a peek offset, peeks walk forward and a consuming read walks it back.
    #[test]
    fn a_peek_offset_peeks_ahead_of_what_was_consumed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        if let Err(e) = set_peek_offset(a.as_fd(), 0) {
            // Kernels before 6.9: the caller peeks from the start instead.
            println!("no SO_PEEK_OFF for TCP on this kernel ({e}): nothing to check");
            return;
        }
        b.write_all(b"abcdef").unwrap();
        let mut buf = [0u8; 3];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while a.peek(&mut [0u8; 6]).unwrap() < 6 {
            assert!(std::time::Instant::now() < deadline);
            set_peek_offset(a.as_fd(), 0).unwrap();
        }
        set_peek_offset(a.as_fd(), 0).unwrap();
        assert_eq!(a.peek(&mut buf).unwrap(), 3);
        assert_eq!(&buf, b"abc");
        assert_eq!(a.peek(&mut buf).unwrap(), 3);
        assert_eq!(&buf, b"def");
        // Consuming two (dropped, not copied) moves the offset back by two: the next peek
        // starts past "def", and the next read at "c".
        let base = counts(a.as_fd()).unwrap();
        assert_eq!(discard(a.as_fd(), 2).unwrap(), 2);
        assert_eq!(counts(a.as_fd()).unwrap().read - base.read, 2);
        b.write_all(b"gh").unwrap();
        while a.peek(&mut buf).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline);
        }
        assert_eq!(&buf[..2], b"gh");
        let mut rest = [0u8; 6];
        (&a).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"cdefgh");
    }
}
