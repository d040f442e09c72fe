//! [`DatagramSocket`]: unreliable datagrams by service name.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use serval_engine::endpoint::{DatagramError, NamedDatagram};
use serval_table::ListenerId;
use serval_wire::{ServiceId, ServicePrefix};

use crate::endpoint::Shared;

/// A datagram socket bound to a service: receives datagrams sent to it by name, and sends by
/// name (with its own serviceID as the source, when bound to one exact ID). Like
/// `tokio::net::UdpSocket`, but addressed by service. Dropping it unregisters the service.
pub struct DatagramSocket {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: ListenerId,
    pub(crate) prefix: ServicePrefix,
}

impl std::fmt::Debug for DatagramSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramSocket")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

pub(crate) fn datagram_error(e: DatagramError) -> io::Error {
    let kind = match e {
        DatagramError::NoRoute(_) => io::ErrorKind::HostUnreachable,
        DatagramError::TooLarge { .. } => io::ErrorKind::InvalidInput,
        DatagramError::NoLocalAddress(_) => io::ErrorKind::AddrNotAvailable,
        DatagramError::QueueFull => io::ErrorKind::WouldBlock,
    };
    io::Error::new(kind, e)
}

impl DatagramSocket {
    /// The service prefix it is bound to.
    pub fn prefix(&self) -> ServicePrefix {
        self.prefix
    }

    fn source(&self) -> Option<ServiceId> {
        (self.prefix.len() == 256).then_some(*self.prefix.id())
    }

    /// Waits for the next datagram: its data, the sender's serviceID (if it sent from a bound
    /// socket) and locator. Cancel-safe.
    pub async fn recv_from(&self) -> io::Result<NamedDatagram> {
        std::future::poll_fn(|cx| self.poll_recv_from(cx)).await
    }

    /// Polls for the next datagram.
    pub fn poll_recv_from(&self, cx: &mut Context<'_>) -> Poll<io::Result<NamedDatagram>> {
        let mut st = self.shared.lock();
        match st.engine.recv_datagram(self.id) {
            Some(d) => Poll::Ready(Ok(d)),
            None => {
                st.set_listener_waker(self.id, cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Sends `data` to `to`, resolved through the endpoint's service table.
    pub fn send_to(&self, to: ServiceId, data: &[u8]) -> io::Result<()> {
        let r = self
            .shared
            .lock()
            .engine
            .send_datagram(self.source(), to, data);
        self.shared.wake.notify_one();
        r.map_err(datagram_error)
    }

    /// Sends `data` to `to` through `next_hop` (a router or the instance).
    pub fn send_to_via(
        &self,
        to: ServiceId,
        next_hop: serval_wire::Locator,
        data: &[u8],
    ) -> io::Result<()> {
        let r = self
            .shared
            .lock()
            .engine
            .send_datagram_via(self.source(), to, next_hop, data);
        self.shared.wake.notify_one();
        r.map_err(datagram_error)
    }
}

impl Drop for DatagramSocket {
    fn drop(&mut self) {
        self.shared.release_listener(self.id);
    }
}
