//! [`Stream`]: a connection to a service, shaped like `tokio::net::TcpStream`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serval_engine::endpoint::{CloseReason, ConnDatagramError, ConnectionHandle};
use serval_engine::transport::conn::{ReadError, TransportStats, WriteError};
use serval_wire::{FlowId, Locator};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::endpoint::Shared;

/// What both halves of a stream share; dropping the last one releases the connection.
struct Inner {
    shared: Arc<Shared>,
    handle: ConnectionHandle,
    /// The application state a moved-in stream carried, until the application takes it.
    app_state: std::sync::Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    /// Like closing a TCP socket: our direction is finished; if the peer's data was not read to
    /// its end, the flow is reset instead (nobody is left to read it).
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.conns.get(&self.handle).is_some_and(|c| c.exported) {
            // Its ExportedStream releases or thaws it.
            return;
        }
        let eof = st.engine.read_finished(self.handle);
        let closed = st
            .conns
            .get(&self.handle)
            .is_some_and(|c| c.closed.is_some());
        if !closed {
            if eof {
                let _ = st.engine.finish(self.handle);
            } else {
                st.engine.abort(self.handle);
            }
        }
        match st.conns.get_mut(&self.handle) {
            Some(c) if !closed => c.detached = true,
            _ => {
                st.conns.remove(&self.handle);
            }
        }
        st.dispatch();
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl Inner {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        // A caller's room that is already initialised (a `&mut [u8]`) is used whole. Of an
        // uninitialised one, only as much is zeroed as the stream holds (at least a byte, so
        // that the end of the stream still reads as 0): a reader with a large spare capacity
        // (`read_buf` into a `Vec`) would otherwise have all of it zeroed per read.
        let ready = buf.initialized().len() - buf.filled().len();
        let room = if ready >= buf.remaining() {
            buf.initialize_unfilled()
        } else {
            let held = st
                .engine
                .buffered(self.handle)
                .map_or(0, |(_, received)| received);
            buf.initialize_unfilled_to(held.max(ready).max(1).min(buf.remaining()))
        };
        match st.engine.read(self.handle, room) {
            Ok(Some(n)) => {
                buf.advance(n);
                if n > 0
                    && let Some(c) = st.conns.get_mut(&self.handle)
                {
                    // Read outside a step: no checkpoint until the next commit.
                    c.replica.dirty = true;
                }
                drop(st);
                // Reading may open the flow-control window: let the driver send the update.
                self.shared.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Ok(None) => match st.conns.get_mut(&self.handle) {
                Some(c) if c.closed.is_none() => {
                    c.read = Some(cx.waker().clone());
                    // Reading before writing released the handshake's ACK, which was held for
                    // data to carry it: the driver sends it.
                    if st.engine.has_ready() {
                        drop(st);
                        self.shared.wake.notify_one();
                    }
                    Poll::Pending
                }
                Some(c) => Poll::Ready(Err(closed_error(c.closed.as_ref()))),
                None => Poll::Ready(Err(closed_error(None))),
            },
            Err(ReadError::Reset { .. }) => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            Err(_) => {
                let reason = st.conns.get(&self.handle).and_then(|c| c.closed.clone());
                Poll::Ready(Err(closed_error(reason.as_ref())))
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut st = self.shared.lock();
        let collects = st.collects;
        if let Some(c) = st.conns.get_mut(&self.handle)
            && c.wrote_at.take() == Some(collects)
        {
            // Wrote already, and the endpoint has not sent since: let it (the write woke
            // it) before copying more (see `ConnSlot::wrote_at`).
            drop(st);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match st.engine.write(self.handle, data) {
            Ok(0) => match st.conns.get_mut(&self.handle) {
                Some(c) if c.closed.is_none() => {
                    c.write = Some(cx.waker().clone());
                    Poll::Pending
                }
                c => Poll::Ready(Err(closed_error(c.and_then(|c| c.closed.as_ref())))),
            },
            Ok(n) => {
                if let Some(c) = st.conns.get_mut(&self.handle) {
                    c.replica.dirty = true;
                    c.wrote_at = Some(collects);
                }
                drop(st);
                self.shared.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(WriteError::Finished) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream already shut down for writing",
            ))),
            Err(_) => {
                let reason = st.conns.get(&self.handle).and_then(|c| c.closed.clone());
                Poll::Ready(Err(closed_error(reason.as_ref())))
            }
        }
    }

    fn poll_shutdown(&self) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        let r = st.engine.finish(self.handle);
        drop(st);
        self.shared.wake.notify_one();
        match r {
            Ok(()) | Err(WriteError::Finished) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(closed_error(None))),
        }
    }

    fn abort(&self) {
        let mut st = self.shared.lock();
        st.engine.abort(self.handle);
        st.dispatch();
        drop(st);
        self.shared.wake.notify_one();
    }

    fn locators(&self) -> io::Result<(Locator, Locator)> {
        self.shared
            .lock()
            .engine
            .locators(self.handle)
            .ok_or_else(|| closed_error(None))
    }
}

fn closed_error(reason: Option<&CloseReason>) -> io::Error {
    match reason {
        Some(CloseReason::Reset) => io::ErrorKind::ConnectionReset.into(),
        Some(CloseReason::TimedOut | CloseReason::IdleTimeout) => io::Error::new(
            io::ErrorKind::TimedOut,
            reason.map_or(String::new(), |r| r.to_string()),
        ),
        Some(r) => io::Error::new(io::ErrorKind::ConnectionAborted, r.to_string()),
        None => io::ErrorKind::NotConnected.into(),
    }
}

/// A connection to a service: a reliable, ordered byte stream in each direction, with
/// half-close (`shutdown` ends our direction). Implements [`AsyncRead`] and [`AsyncWrite`].
///
/// Dropping it finishes our direction; if the peer's direction had not been read to its end,
/// the flow is reset instead, as a TCP socket does.
pub struct Stream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("handle", &self.inner.handle)
            .finish()
    }
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, handle: ConnectionHandle) -> Stream {
        Stream::moved_in(shared, handle, None)
    }

    /// A stream that arrived from another host, with the application state it carried.
    pub(crate) fn moved_in(
        shared: Arc<Shared>,
        handle: ConnectionHandle,
        app_state: Option<Vec<u8>>,
    ) -> Stream {
        Stream {
            inner: Arc::new(Inner {
                shared,
                handle,
                app_state: std::sync::Mutex::new(app_state),
            }),
        }
    }

    /// This connection's handle on its endpoint: what the endpoint's path events
    /// ([`Endpoint::path_events`](crate::Endpoint::path_events)) name it by.
    pub fn id(&self) -> ConnectionHandle {
        self.inner.handle
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    pub(crate) fn handle(&self) -> ConnectionHandle {
        self.inner.handle
    }

    /// Whether this is the only handle to the stream (no split half elsewhere).
    pub(crate) fn is_whole(&self) -> bool {
        Arc::strong_count(&self.inner) == 1
    }

    /// The application state this stream carried when it moved here from another host (what
    /// the old host's application gave [`Stream::hand_over`] or [`Stream::export`]), once:
    /// `None` for a stream accepted here, or once taken.
    pub fn take_app_state(&self) -> Option<Vec<u8>> {
        self.inner
            .app_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The locator of the peer (the instance, for a client; the client, for a server) right
    /// now; it changes when the peer migrates.
    pub fn peer_locator(&self) -> io::Result<Locator> {
        self.inner.locators().map(|l| l.1)
    }

    /// The local locator the connection uses right now.
    pub fn local_locator(&self) -> io::Result<Locator> {
        self.inner.locators().map(|l| l.0)
    }

    /// This end's flowID: what `serval flows` lists it by, kept when the stream moves to
    /// another host or a standby takes it over.
    pub fn flow_id(&self) -> io::Result<FlowId> {
        self.inner
            .shared
            .lock()
            .engine
            .connection_info(self.inner.handle)
            .map(|c| c.local_flow)
            .ok_or_else(|| closed_error(None))
    }

    /// Moves this end of the connection to `new_local`, one of the endpoint's locators, with an
    /// authenticated RSYN. The stream keeps working; bytes in flight are retransmitted. A move
    /// under way toward another locator is given up for this one
    /// ([`PathEvent::MoveAbandoned`](crate::PathEvent::MoveAbandoned)).
    pub fn migrate(&self, new_local: Locator) -> io::Result<()> {
        let mut st = self.inner.shared.lock();
        if !st.engine.locals().contains(&new_local) {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{new_local} is not a locator of this endpoint"),
            ));
        }
        if !st.engine.migrate(self.inner.handle, new_local) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "connection not established, already moving there, or re-binding",
            ));
        }
        drop(st);
        self.inner.shared.wake.notify_one();
        Ok(())
    }

    /// Sends an unreliable datagram on this connection (a DATAGRAM frame beside the stream):
    /// sent once, never retransmitted, and it may be lost. Fails with `InvalidInput` if it is
    /// larger than [`Stream::max_datagram_size`], `WouldBlock` if the send queue is full.
    pub fn send_datagram(&self, data: &[u8]) -> io::Result<()> {
        let mut st = self.inner.shared.lock();
        let r = st.engine.write_datagram(self.inner.handle, data);
        let closed = st
            .conns
            .get(&self.inner.handle)
            .and_then(|c| c.closed.clone());
        drop(st);
        match r {
            Ok(()) => {
                self.inner.shared.wake.notify_one();
                Ok(())
            }
            Err(e @ ConnDatagramError::TooLarge { .. }) => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, e))
            }
            Err(e @ ConnDatagramError::QueueFull) => {
                Err(io::Error::new(io::ErrorKind::WouldBlock, e))
            }
            Err(ConnDatagramError::Closed) => Err(closed_error(closed.as_ref())),
        }
    }

    /// The largest datagram [`Stream::send_datagram`] accepts on the current path.
    pub fn max_datagram_size(&self) -> io::Result<usize> {
        self.inner
            .shared
            .lock()
            .engine
            .max_datagram_size(self.inner.handle)
            .ok_or_else(|| closed_error(None))
    }

    /// Waits for the next datagram the peer sent on this connection. Unread datagrams are
    /// queued up to the transport's bound (`TransportConfig::datagram_queue`); beyond it new
    /// ones are dropped (counted in [`TransportStats::datagrams_dropped`]). Fails once the
    /// connection is closed and no datagram is left.
    pub async fn recv_datagram(&self) -> io::Result<Vec<u8>> {
        std::future::poll_fn(|cx| {
            let mut st = self.inner.shared.lock();
            if let Some(d) = st.engine.read_datagram(self.inner.handle) {
                return Poll::Ready(Ok(d));
            }
            match st.conns.get_mut(&self.inner.handle) {
                Some(c) if c.closed.is_none() => {
                    c.datagram = Some(cx.waker().clone());
                    Poll::Pending
                }
                c => Poll::Ready(Err(closed_error(c.and_then(|c| c.closed.as_ref())))),
            }
        })
        .await
    }

    /// Waits until the connection is closed — for a clean close, until both directions have
    /// ended and the FIN exchange completed — and returns why.
    pub async fn closed(&self) -> CloseReason {
        std::future::poll_fn(|cx| {
            let mut st = self.inner.shared.lock();
            match st.conns.get_mut(&self.inner.handle) {
                Some(c) => match &c.closed {
                    Some(r) => Poll::Ready(r.clone()),
                    None => {
                        c.close = Some(cx.waker().clone());
                        Poll::Pending
                    }
                },
                None => Poll::Ready(CloseReason::Reset),
            }
        })
        .await
    }

    /// The transport's counters for this connection so far: packets and bytes sent,
    /// received, lost and retransmitted, PTOs, path-MTU probes.
    pub fn stats(&self) -> io::Result<TransportStats> {
        self.inner
            .shared
            .lock()
            .engine
            .connection_stats(self.inner.handle)
            .ok_or_else(|| closed_error(None))
    }

    /// Resets the connection at once, like closing a TCP socket with `SO_LINGER` 0: one
    /// authenticated RST goes to the peer, whose reads and writes then fail with
    /// [`io::ErrorKind::ConnectionReset`]; ours fail too. Data not yet delivered is discarded.
    pub fn abort(&self) {
        self.inner.abort();
    }

    /// Splits into halves that can be used from different tasks.
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        (
            OwnedReadHalf {
                inner: self.inner.clone(),
            },
            OwnedWriteHalf { inner: self.inner },
        )
    }

    /// Borrows a read half and a write half, usable concurrently (for example in `select!`).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (
            ReadHalf { inner: &self.inner },
            WriteHalf { inner: &self.inner },
        )
    }
}

/// The borrowed reading half of a [`Stream`], from [`Stream::split`].
#[derive(Debug)]
pub struct ReadHalf<'a> {
    inner: &'a Inner,
}

/// The borrowed writing half of a [`Stream`], from [`Stream::split`].
#[derive(Debug)]
pub struct WriteHalf<'a> {
    inner: &'a Inner,
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown()
    }
}

/// Reading through a shared reference, so that one task can wait in
/// [`Stream::move_requested`] and read in the same `select!` (one reader at a time: a second
/// concurrent reader takes the first's wake-up).
impl AsyncRead for &Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

/// Writing through a shared reference (one writer at a time), as for reading.
impl AsyncWrite for &Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown()
    }
}

/// The reading half of a [`Stream`], from [`Stream::into_split`].
pub struct OwnedReadHalf {
    inner: Arc<Inner>,
}

/// The writing half of a [`Stream`], from [`Stream::into_split`].
pub struct OwnedWriteHalf {
    inner: Arc<Inner>,
}

impl OwnedReadHalf {
    /// Resets the whole connection; see [`Stream::abort`].
    pub fn abort(&self) {
        self.inner.abort();
    }
}

impl OwnedWriteHalf {
    /// Resets the whole connection; see [`Stream::abort`].
    pub fn abort(&self) {
        self.inner.abort();
    }
}

impl std::fmt::Debug for OwnedReadHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedReadHalf").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OwnedWriteHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedWriteHalf").finish_non_exhaustive()
    }
}

impl AsyncRead for OwnedReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for OwnedWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown()
    }
}
