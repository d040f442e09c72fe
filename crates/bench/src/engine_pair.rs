//! Two sans-IO `serval_engine` endpoints wired back to back in memory: no sockets, no runtime,
//! the real clock. Used to split the cost of a transfer into the protocol engine's own share
//! and the rest (system calls, the tokio runtime), and to count the engine's heap per
//! connection without the runtime's.

use std::sync::Arc;

use serval_engine::Instant;
use serval_engine::endpoint::{ConnectionHandle, Endpoint, EndpointConfig, Event};
use serval_table::{ListenerId, ServiceTable};
use serval_wire::{Locator, ServiceId, ServicePrefix};

/// A client and a server endpoint joined by a lossless, instant "wire".
pub struct Pair {
    pub client: Endpoint,
    pub server: Endpoint,
    pub client_loc: Locator,
    pub server_loc: Locator,
    pub listener: ListenerId,
    epoch: std::time::Instant,
    /// Datagrams moved each way, and their bytes.
    pub datagrams: [u64; 2],
    pub bytes: [u64; 2],
}

impl Pair {
    /// Two endpoints on `127.0.0.1` (distinct ports) with `config`; the server listens on
    /// `service`.
    pub fn new(config: EndpointConfig, service: ServiceId) -> Pair {
        let client_loc: Locator = ([127, 0, 0, 1], 40_001).into();
        let server_loc: Locator = ([127, 0, 0, 1], 40_002).into();
        let client = Endpoint::new(
            config.clone(),
            [1; 32],
            Arc::new(ServiceTable::new()),
            vec![client_loc],
        );
        let mut server = Endpoint::new(
            config,
            [2; 32],
            Arc::new(ServiceTable::new()),
            vec![server_loc],
        );
        let listener = server.listen(ServicePrefix::exact(service), 0, 1);
        Pair {
            client,
            server,
            client_loc,
            server_loc,
            listener,
            epoch: std::time::Instant::now(),
            datagrams: [0; 2],
            bytes: [0; 2],
        }
    }

    /// Engine time now.
    pub fn now(&self) -> Instant {
        Instant::from_nanos(self.epoch.elapsed().as_nanos() as u64)
    }

    /// Runs due timers and moves every datagram either side wants to send to the other, until
    /// neither has anything; returns how many moved.
    pub fn pump(&mut self) -> u64 {
        let mut moved = 0;
        loop {
            let now = self.now();
            for ep in [&mut self.client, &mut self.server] {
                if ep.poll_timeout().is_some_and(|t| t <= now) {
                    ep.handle_timeout(now);
                }
            }
            let mut any = false;
            while let Some(t) = self.client.poll_transmit(now) {
                self.datagrams[0] += 1;
                self.bytes[0] += t.payload.len() as u64;
                self.server.handle_datagram(now, t.dst, t.src, &t.payload);
                any = true;
                moved += 1;
            }
            while let Some(t) = self.server.poll_transmit(now) {
                self.datagrams[1] += 1;
                self.bytes[1] += t.payload.len() as u64;
                self.client.handle_datagram(now, t.dst, t.src, &t.payload);
                any = true;
                moved += 1;
            }
            if !any {
                return moved;
            }
        }
    }

    /// Opens a connection to `service`: returns (client handle, server handle).
    pub fn connect(
        &mut self,
        service: ServiceId,
    ) -> Result<(ConnectionHandle, ConnectionHandle), String> {
        let now = self.now();
        let c = self
            .client
            .connect_via(now, service, self.server_loc)
            .map_err(|e| e.to_string())?;
        for _ in 0..1000 {
            self.pump();
            if let Some(s) = self.server.accept(self.listener) {
                // Drain events so the queues do not grow.
                while self.client.poll_event().is_some() {}
                while self.server.poll_event().is_some() {}
                return Ok((c, s));
            }
        }
        Err("handshake did not complete".into())
    }

    /// Drops queued events on both sides (the benchmarks poll state directly).
    pub fn drain_events(&mut self) -> usize {
        let mut n = 0;
        while let Some(ev) = self.client.poll_event() {
            n += usize::from(!matches!(ev, Event::Readable(_) | Event::Writable(_)));
        }
        while let Some(ev) = self.server.poll_event() {
            n += usize::from(!matches!(ev, Event::Readable(_) | Event::Writable(_)));
        }
        n
    }
}
