//! What the endpoint-level targets share: an input reader, locators, and a live flow between a
//! real server `Endpoint` and a hand-made client that holds the flow's keys (so that fuzz bytes
//! can be sealed the way the client would, and reach the control channel and the transport
//! behind the packet protection).
#![allow(dead_code)] // not every target uses every helper

use std::sync::Arc;

use serval_engine::Instant;
use serval_engine::connection::protect::{
    FlowSecrets, KeyExchange, Protection, Protector, Space, Transcript,
};
use serval_engine::endpoint::{ConnectionHandle, Endpoint, EndpointConfig, Event};
use serval_table::ListenerId;
use serval_table::ServiceTable;
use serval_wire::ext::{ControlFlags, ControlRepr};
use serval_wire::{FlowId, Locator, Protocol, SalPacket, SalRepr, ServiceId, ServicePrefix};

pub const A: &str = "10.0.0.1:54324";
pub const B: &str = "10.0.0.2:54324";

pub fn loc(s: &str) -> Locator {
    s.parse().expect("valid locator")
}

pub fn endpoint(addr: &str, seed: u8, config: EndpointConfig) -> Endpoint {
    Endpoint::new(
        config,
        [seed; 32],
        Arc::new(ServiceTable::new()),
        vec![loc(addr)],
    )
}

/// The fuzz input, read front to back; zeros once it is exhausted.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }
}

pub fn parse(bytes: &[u8]) -> Option<SalRepr> {
    SalRepr::parse(&SalPacket::new_checked(bytes).ok()?).ok()
}

pub fn header_len(bytes: &[u8]) -> Option<usize> {
    SalPacket::new_checked(bytes)
        .ok()
        .map(|p| usize::from(p.header_len()))
}

/// A flow between a real server endpoint (`server`, at B) and a hand-made client (at A) that
/// holds the client's keys, as `crates/engine/tests/edges.rs` (`control_vernos_wrap_around`)
/// builds it: the SYN of a real client endpoint with the key share replaced by ours.
pub struct LiveFlow {
    pub server: Endpoint,
    pub listener: ListenerId,
    /// The server's connection (accepted).
    pub sh: ConnectionHandle,
    /// The client's keys: seal what the client sends, open what the server sends.
    pub keys: Protector,
    pub cflow: FlowId,
    pub sflow: FlowId,
    /// The client's next control verno.
    pub verno: u32,
    /// The server's last verno seen (what the client acknowledges).
    pub server_verno: u32,
    pub now: Instant,
}

impl LiveFlow {
    /// Connects; `protection` for both ends (the client asks for plaintext, the server grants).
    pub fn new(protection: Protection, key_update_interval: u64) -> Option<LiveFlow> {
        let now = Instant::ZERO;
        let service = ServiceId::from_name("echo.fuzz").expect("valid name");
        let config = EndpointConfig {
            protection,
            ..EndpointConfig::default()
        };
        let mut server = endpoint(B, 2, config.clone());
        let listener = server.listen(ServicePrefix::exact(service), 0, 1);
        let mut a = endpoint(A, 1, config);
        a.connect_via(now, service, loc(B)).ok()?;
        let syn = a.poll_transmit(now)?;
        let mut syn = parse(&syn.payload)?;
        let kx = KeyExchange::new([9; 32]);
        let flags = syn.keyshare?.flags;
        syn.keyshare = Some(kx.share(flags));
        let (cflow, cnonce) = (syn.src_flow, syn.nonce?);
        server.handle_datagram(now, loc(B), loc(A), &syn.to_bytes(&[]).ok()?);
        let mut synack = server.poll_transmit(now)?;
        let hl = header_len(&synack.payload)?;
        let sa = parse(&synack.payload)?;
        let server_share = sa.keyshare?;
        let dh = kx.agree(&server_share)?;
        let transcript = Transcript {
            service: &service,
            client_flow: cflow,
            client_nonce: &cnonce,
            client_share: &syn.keyshare?,
            server_flow: sa.src_flow,
            server_nonce: &sa.nonce?,
            server_share: &server_share,
        };
        let granted = if server_share.plaintext() {
            Protection::Plaintext
        } else {
            Protection::Encrypted
        };
        assert_eq!(granted, protection, "the server granted what both asked");
        let secrets = FlowSecrets::derive(true, granted, &dh, &transcript);
        let mut keys = Protector::new(secrets, key_update_interval);
        keys.open(&mut synack.payload, hl, Space::Control)
            .expect("the SYN-ACK opens with the keys of our share and the server's");
        let sctl = sa.control?;
        let mut flow = LiveFlow {
            server,
            listener,
            sh: ConnectionHandle(u64::MAX),
            keys,
            cflow,
            sflow: sa.src_flow,
            verno: syn.control?.verno.wrapping_add(1),
            server_verno: sctl.verno,
            now,
        };
        let ack = flow.control(ControlFlags::ACK, sctl.verno.wrapping_add(1), None);
        flow.server.handle_datagram(now, loc(B), loc(A), &ack);
        flow.sh = flow.server.accept(flow.listener)?;
        while flow.server.poll_event().is_some() {}
        Some(flow)
    }

    /// A sealed control packet from the client (`verno`: the client's next one unless given).
    pub fn control(&mut self, flags: ControlFlags, ackno: u32, verno: Option<u32>) -> Vec<u8> {
        let verno = verno.unwrap_or_else(|| {
            let v = self.verno;
            self.verno = self.verno.wrapping_add(1);
            v
        });
        let mut r = SalRepr::new(Protocol::NONE, self.cflow, self.sflow);
        r.control = Some(ControlRepr {
            flags,
            verno,
            ackno,
        });
        let mut bytes = r.to_bytes(&[]).expect("a control header");
        self.keys.seal_control(&mut bytes, 0, r.buffer_len());
        bytes
    }

    /// A sealed stream packet from the client: packet number `pn`, then `frames`.
    pub fn stream(&mut self, pn: u64, frames: &[u8]) -> Vec<u8> {
        let r = SalRepr::new(Protocol::STREAM, self.cflow, self.sflow);
        let mut bytes = r.to_bytes(&[]).expect("a stream header");
        let hl = bytes.len();
        bytes.extend_from_slice(&pn.to_be_bytes());
        bytes.extend_from_slice(frames);
        self.keys.seal(&mut bytes, 0, hl);
        bytes
    }

    /// Seals `bytes` (a SAL header and what follows) as the client would: a control packet if
    /// it has a CONTROL extension (anything after its header is dropped), a stream packet
    /// otherwise (the 8 bytes after the header its packet number, padded with zeros). The
    /// header is taken as it comes: its length field, whatever it says, is where the sealing
    /// starts (clamped to the packet).
    pub fn seal_raw(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        if bytes.len() < 4 {
            return bytes;
        }
        let hl = usize::from(u16::from_be_bytes([bytes[2], bytes[3]])).min(bytes.len());
        let control = bytes.get(20) == Some(&0x81) && hl > 20;
        if control {
            self.keys.seal_control(&mut bytes, 0, hl);
        } else {
            if bytes.len() < hl + 8 {
                bytes.resize(hl + 8, 0);
            }
            self.keys.seal(&mut bytes, 0, hl);
        }
        bytes
    }

    /// Opens a packet the server sent to the client, as the client would; `None` if it does
    /// not open. Returns the header and the payload in clear.
    pub fn open(&mut self, payload: &[u8]) -> Option<(SalRepr, Vec<u8>)> {
        let repr = parse(payload)?;
        let hl = header_len(payload)?;
        let mut p = payload.to_vec();
        let (_, n) = self
            .keys
            .open(&mut p, hl, Space::of(repr.control.is_some()))
            .ok()?;
        let body = p[hl + 8..][..n].to_vec();
        Some((repr, body))
    }

    /// Delivers `bytes` to the server as from the client's address.
    pub fn deliver(&mut self, bytes: &[u8]) {
        self.server.handle_datagram(self.now, loc(B), loc(A), bytes);
    }
}

/// Every event of `ep`.
pub fn events(ep: &mut Endpoint) -> Vec<Event> {
    std::iter::from_fn(|| ep.poll_event()).collect()
}
