//! Passing open file descriptors between processes over a Unix socket (`SCM_RIGHTS`), for
//! `serval expose`'s hand-over to a new process (docs/protocol.md, "Hand-over of a
//! translator"): each backend TCP connection crosses as its descriptor, so the kernel's socket
//! — its queues, its sequence numbers, its peer — goes on unchanged in the new process.
//!
//! `nix` builds and parses the control messages; the one `unsafe` step is taking ownership
//! of the descriptors the kernel installed in this process on receipt, which only the
//! receiver can know are fresh and its own.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// At most this many descriptors are taken from one received message; a sender that attaches
/// more has the message refused (`InvalidData`), with every descriptor it carried closed.
pub const MAX_FDS: usize = 4;

/// Sends `data` on the connected Unix stream socket `sock`, with `fds` attached to its first
/// byte (`sendmsg(2)` with `SCM_RIGHTS`). Returns how many bytes of `data` were sent (as
/// `send(2)`: possibly fewer than all; the descriptors go with the first call only, so send
/// the rest without them). The descriptors stay open here too: the receiver gets duplicates
/// of them. A non-blocking socket that cannot take a byte now fails with `WouldBlock` and
/// sends nothing.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// Receives bytes from the connected Unix stream socket `sock` into `buf`, with the
/// descriptors that came attached to them (`recvmsg(2)`, close-on-exec). Returns the byte
/// count (0: the peer closed) and the descriptors, owned by the caller (dropping one closes
/// it). A message with more than [`MAX_FDS`] descriptors, or whose control data did not fit,
/// fails with `InvalidData`, and the descriptors it did deliver are closed. A non-blocking
/// socket with nothing to read fails with `WouldBlock`.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let bytes = msg.bytes;
    let mut fds = Vec::new();
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel has just installed `fd` in this process's descriptor
                    // table for this SCM_RIGHTS message (recvmsg(2) succeeded and reported
                    // it): it is open, and nothing else in this process knows its number, so
                    // this OwnedFd is its only owner and closes it exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
    }
    if truncated || fds.len() > MAX_FDS {
        // With MSG_CTRUNC, descriptors that did fit were installed but cannot be listed
        // safely (nix refuses to walk truncated control data): they stay open until exit.
        // Our own sender never attaches more than one, so this is a foreign sender's fault.
        drop(fds);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message carried more than {MAX_FDS} descriptors"),
        ));
    }
    Ok((bytes, fds))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_descriptor_crosses_with_its_bytes_and_still_works() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut p, q) = UnixStream::pair().unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"hello", &[q.as_fd()]).unwrap(), 5);
        drop(q);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let mut q2 = UnixStream::from(fds.into_iter().next().unwrap());
        p.write_all(b"through").unwrap();
        let mut got = [0u8; 7];
        q2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through");
    }

    #[test]
    fn bytes_without_descriptors_arrive_without_any() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(a.as_fd(), b"x", &[]).unwrap();
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().0, 0);
    }

    #[test]
    fn too_many_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let extra: Vec<(UnixStream, UnixStream)> =
            (0..=MAX_FDS).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = extra.iter().map(|(x, _)| x.as_fd()).collect();
        send_with_fds(a.as_fd(), b"y", &fds).unwrap();
        let mut buf = [0u8; 4];
        let e = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
