//! Two real endpoints (a client at A, a server at B) and, optionally, an impostor server at M
//! that also serves the service, connected over a network the fuzz input drives: it chooses the
//! configuration (plaintext on either end, SYN cookies, which keys the servers hold, which
//! identity the client requires, a self-certifying serviceID or not, a CA and which servers
//! hold a certificate chain for their key), then the fate of every
//! datagram in flight (the SYN, the COOKIE NACK, the SYN-ACK with its IDENTITY, the ACK, ...):
//! delivered in order or not, dropped, duplicated, diverted to the impostor, mutated (byte
//! flips, truncation, extension insertions, structured edits of an unprotected header), and
//! the passing of time.
//!
//! Checks:
//! * nothing panics;
//! * no answer to an unauthenticated packet (a SYN, a NACK, anything mutated or made up) is
//!   larger than it, except the client's SYN answering a retry NACK (at most three per
//!   connect), which goes to the next hop the client chose, not to the NACK's sender;
//! * a connection that reports Connected has the peer's keys: data written on it arrives intact
//!   at the server that accepted it;
//! * a client that requires an identity never reports Connected unless a server it could have
//!   reached holds the right key, and never to a server that does not;
//! * a flow is plaintext only if both ends asked for it.
#![no_main]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Input, endpoint, events, loc, parse};
use libfuzzer_sys::fuzz_target;
use serval_engine::Instant;
use serval_engine::connection::protect::Protection;
use serval_engine::endpoint::{
    CertificateChain, ConnectionHandle, Endpoint, EndpointConfig, Event, PeerIdentity, ServerName,
    SynCookies, Transmit, TrustAnchors,
};
use serval_keys::PrivateKey;
use serval_table::ListenerId;
use serval_wire::ext::ControlFlags;
use serval_wire::{IdentityRepr, Locator, Nonce, ServiceId, ServicePrefix};

const A: &str = "10.0.0.1:54324";
const B: &str = "10.0.0.2:54324";
const M: &str = "10.0.0.6:54324";

/// Two fixed Ed25519 keys (from fixed seeds: a crash reproduces byte for byte).
fn keys() -> &'static [PrivateKey; 2] {
    static K: OnceLock<[PrivateKey; 2]> = OnceLock::new();
    K.get_or_init(|| {
        let key = |seed: [u8; 32]| {
            use ring::signature::KeyPair;
            let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
            // The PKCS#8 v2 document ring itself generates: seed, then public key.
            let mut doc = vec![
                0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            doc.extend_from_slice(&seed);
            doc.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
            doc.extend_from_slice(pair.public_key().as_ref());
            PrivateKey::from_pkcs8(&doc).expect("a PKCS#8 v2 Ed25519 key")
        };
        [key([0x11; 32]), key([0x22; 32])]
    })
}

/// The fixed CA and, for each of the two keys, a chain certifying it for "echo.fuzz".
fn pki() -> &'static (TrustAnchors, [CertificateChain; 2]) {
    static P: OnceLock<(TrustAnchors, [CertificateChain; 2])> = OnceLock::new();
    P.get_or_init(|| {
        let pem = |seed: [u8; 32]| {
            // The PKCS#8 v1 document of the seed (rcgen signs deterministically with it).
            let mut doc = vec![
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            doc.extend_from_slice(&seed);
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from(doc);
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
                .expect("an Ed25519 seed")
        };
        let ca_key = pem([0x33; 32]);
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).expect("root");
        let anchors = TrustAnchors::from_der(&[ca.der().to_vec()]).expect("anchor");
        let chain = |i: usize, seed: [u8; 32]| {
            let leaf = rcgen::CertificateParams::new(vec!["echo.fuzz".to_owned()])
                .expect("params")
                .signed_by(&pem(seed), &ca, &ca_key)
                .expect("leaf");
            CertificateChain::from_der(&[leaf.der().to_vec()], &keys()[i].public_key())
                .expect("the chain certifies the key")
        };
        (anchors, [chain(0, [0x11; 32]), chain(1, [0x22; 32])])
    })
}

/// The chain certifying `key`, if it is one of the two fixed keys.
fn chain_for(key: Option<&PrivateKey>) -> Option<CertificateChain> {
    let key = key?.public_key();
    (0..2)
        .find(|&i| keys()[i].public_key() == key)
        .map(|i| pki().1[i].clone())
}

/// What a server holds: no key, or key 0 or 1.
fn server_key(b: u8) -> Option<PrivateKey> {
    match b % 3 {
        0 => None,
        k => Some(keys()[usize::from(k) - 1].clone()),
    }
}

/// Whether a server holding `key` (and a chain for it if `chain`) satisfies `req`.
fn satisfies(
    req: Option<&PeerIdentity>,
    service: &ServiceId,
    key: Option<&PrivateKey>,
    chain: bool,
) -> bool {
    match (req, key) {
        (Some(PeerIdentity::Ca(_)), Some(_)) => chain,
        (None, _) => true,
        (Some(_), None) => false,
        (Some(PeerIdentity::Key(k)), Some(have)) => *k == have.public_key(),
        (Some(PeerIdentity::SelfCertifying), Some(have)) => {
            serval_keys::commits_to(service, &have.public_key())
        }
    }
}

/// A datagram in flight.
#[derive(Clone)]
struct Flight {
    t: Transmit,
    /// As its sender sent it (not mutated, not made up).
    pristine: bool,
}

struct Net {
    eps: Vec<(Endpoint, Locator)>,
    queue: Vec<Flight>,
    now: Instant,
}

fn is_syn(r: &serval_wire::SalRepr) -> bool {
    r.control.is_some_and(|c| {
        c.flags.contains(ControlFlags::SYN) && !c.flags.contains(ControlFlags::ACK)
    })
}

fn is_nack(r: &serval_wire::SalRepr) -> bool {
    r.control
        .is_some_and(|c| c.flags.contains(ControlFlags::NACK))
}

impl Net {
    /// The endpoint a datagram to `dst` reaches.
    fn at(&self, dst: Locator) -> Option<usize> {
        self.eps.iter().position(|(_, l)| *l == dst)
    }

    fn collect(&mut self, i: usize) -> Vec<Transmit> {
        let now = self.now;
        std::iter::from_fn(|| self.eps[i].0.poll_transmit(now)).collect()
    }

    fn collect_all(&mut self) {
        for i in 0..self.eps.len() {
            for t in self.collect(i) {
                self.queue.push(Flight { t, pristine: true });
            }
        }
    }

    /// Delivers `f` to endpoint `to` (the one at its destination unless diverted) and queues
    /// the answers, checking that an unauthenticated packet is not amplified.
    fn deliver(&mut self, f: Flight, to: Option<usize>) {
        let Some(to) = to.or_else(|| self.at(f.t.dst)) else {
            return;
        };
        let local = self.eps[to].1;
        let repr = parse(&f.t.payload);
        let unauthenticated = !f.pristine || repr.as_ref().is_none_or(|r| is_syn(r) || is_nack(r));
        let nack = repr.as_ref().is_some_and(is_nack);
        let limit = f.t.payload.len();
        self.eps[to]
            .0
            .handle_datagram(self.now, local, f.t.src, &f.t.payload);
        let out = self.collect(to);
        if unauthenticated {
            for t in &out {
                if nack && parse(&t.payload).is_some_and(|r| is_syn(&r)) {
                    // The client's SYN again, with the cookie: bounded below.
                    continue;
                }
                assert!(
                    t.payload.len() <= limit,
                    "a {}-byte answer to an unauthenticated {}-byte packet (pristine {}): {:?} -> {:?}",
                    t.payload.len(),
                    f.t.payload.len(),
                    f.pristine,
                    repr,
                    parse(&t.payload),
                );
            }
        }
        let st = self.eps[to].0.stats();
        assert!(
            st.cookie_retries <= 3,
            "more than three cookie retries for one connect"
        );
        for t in out {
            self.queue.push(Flight { t, pristine: true });
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        for (ep, _) in &mut self.eps {
            ep.handle_timeout(self.now);
        }
        self.collect_all();
    }
}

/// Byte-level mutation of a datagram.
fn mutate_raw(input: &mut Input<'_>, p: &mut Vec<u8>) {
    let len = p.len().max(1);
    match input.u8() % 6 {
        0 => {
            for _ in 0..=(input.u8() % 4) {
                let bit = usize::from(input.u16()) % (p.len() * 8).max(1);
                if let Some(b) = p.get_mut(bit / 8) {
                    *b ^= 1 << (bit % 8);
                }
            }
        }
        1 => p.truncate(usize::from(input.u16()) % len),
        2 => {
            // An extension inserted at the end of the header, the header length grown to match.
            let n = usize::from(input.u8() % 40);
            let mut ext = input.bytes(n);
            if ext.len() >= 2 {
                ext[1] = ext.len() as u8;
            }
            if p.len() >= 4 {
                let hl = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
                let new = (hl + ext.len()) as u16;
                p[2..4].copy_from_slice(&new.to_be_bytes());
                p.splice(hl..hl, ext);
            }
        }
        3 => {
            let at = usize::from(input.u16()) % len;
            let v = input.u8();
            if let Some(b) = p.get_mut(at) {
                *b = v;
            }
        }
        4 => {
            let at = usize::from(input.u16()) % (p.len() + 1);
            let n = usize::from(input.u8() % 24);
            let extra = input.bytes(n);
            p.splice(at..at, extra);
        }
        _ => {
            let at = usize::from(input.u16()) % len;
            let n = usize::from(input.u8() % 120);
            let end = (at + n).min(p.len());
            if at < end {
                p.drain(at..end);
            }
        }
    }
}

/// Structured edit of an unprotected header (a SYN, a NACK); protected packets only re-emit
/// (which must change nothing) or lose their AEAD coverage.
fn mutate_repr(input: &mut Input<'_>, p: &mut Vec<u8>) {
    let Some(mut r) = parse(p) else {
        return;
    };
    let hl = common::header_len(p).unwrap_or(p.len());
    let payload = p[hl..].to_vec();
    for _ in 0..=(input.u8() % 3) {
        match input.u8() % 16 {
            0 => r.keyshare = None,
            1 => {
                if let Some(k) = r.keyshare.as_mut() {
                    k.flags ^= input.u8();
                }
            }
            2 => {
                if let Some(k) = r.keyshare.as_mut() {
                    k.group = input.u8();
                }
            }
            3 => {
                if let Some(k) = r.keyshare.as_mut() {
                    k.key = if input.u8() & 1 == 0 {
                        [0; 32]
                    } else {
                        input.array()
                    };
                }
            }
            4 => {
                r.nonce = if input.u8() & 1 == 0 {
                    None
                } else {
                    Some(Nonce(input.array()))
                }
            }
            5 => {
                r.cookie = if input.u8() & 1 == 0 {
                    None
                } else {
                    Some(input.array())
                }
            }
            6 => r.pad = usize::from(input.u16() % 400),
            7 => r.source.clear(),
            8 => {
                let l: Locator = format!("198.51.100.{}:{}", input.u8(), input.u16())
                    .parse()
                    .unwrap_or(r.source.first().copied().unwrap_or_else(|| loc(A)));
                if !r.source.contains(&l) {
                    r.source.push(l);
                }
            }
            9 => {
                if let Some(c) = r.control.as_mut() {
                    c.verno = input.u32();
                }
            }
            10 => {
                if let Some(c) = r.control.as_mut() {
                    c.ackno = input.u32();
                }
            }
            11 => {
                if let Some(c) = r.control.as_mut() {
                    c.flags = ControlFlags::from_bits_truncate(input.u16());
                }
            }
            12 => {
                r.identity = Some(IdentityRepr {
                    kind: input.u8(),
                    key: input.array(),
                    signature: input.array(),
                })
            }
            13 => r.src_flow = serval_wire::FlowId(input.u64()),
            14 => r.dst_flow = serval_wire::FlowId(input.u64()),
            _ => {
                if let Some(s) = r.service.as_mut() {
                    s.id = ServiceId(input.array());
                }
            }
        }
    }
    if let Ok(b) = r.to_bytes(&payload) {
        *p = b;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let c0 = input.u8();
    let c1 = input.u8();
    let prot = |b: bool| {
        if b {
            Protection::Plaintext
        } else {
            Protection::Encrypted
        }
    };
    let (cprot, sprot) = (prot(c0 & 1 != 0), prot(c0 & 2 != 0));
    let cookies = match (c0 >> 2) & 3 {
        0 => SynCookies::Never,
        1 => SynCookies::Always,
        2 => SynCookies::Above(0),
        _ => SynCookies::default(),
    };
    let name = ServiceId::from_name("echo.fuzz").expect("valid name");
    // A CA requirement connects by name (a certificate names no serviceID).
    let ca = c1 & 0x10 != 0;
    let service = if c1 & 1 != 0 && !ca {
        serval_keys::self_certifying_id(&name, &keys()[0].public_key())
    } else {
        name
    };
    let required = match (c0 >> 6) & 3 {
        0 => None,
        1 => Some(PeerIdentity::Key(keys()[0].public_key())),
        2 => Some(PeerIdentity::Key(keys()[1].public_key())),
        _ => Some(PeerIdentity::SelfCertifying),
    };
    let required = if ca {
        Some(PeerIdentity::Ca(pki().0.clone()))
    } else {
        required
    };
    let bkey = server_key((c0 >> 4) & 3);
    let impostor = c1 & 2 != 0;
    let mkey = server_key((c1 >> 2) & 3);
    let client = endpoint(
        A,
        1,
        EndpointConfig {
            protection: cprot,
            peer_identity: required.clone(),
            unix_time_origin: Some(Duration::from_secs(1_796_515_200)),
            ..EndpointConfig::default()
        },
    );
    // Which servers hold a chain for their key.
    let (bchain, mchain) = (
        chain_for(bkey.as_ref()).filter(|_| c1 & 0x20 != 0),
        chain_for(mkey.as_ref()).filter(|_| c1 & 0x40 != 0),
    );
    let server_config = |key: Option<PrivateKey>, chain: Option<CertificateChain>| EndpointConfig {
        protection: sprot,
        syn_cookies: cookies,
        identity: key,
        certificate: chain,
        ..EndpointConfig::default()
    };
    let mut b = endpoint(B, 2, server_config(bkey.clone(), bchain.clone()));
    let lb = b.listen(ServicePrefix::exact(service), 0, 1);
    let mut eps = vec![(client, loc(A)), (b, loc(B))];
    let mut listeners: Vec<(usize, ListenerId, Option<PrivateKey>, bool)> =
        vec![(1, lb, bkey, bchain.is_some())];
    if impostor {
        let mut m = endpoint(M, 3, server_config(mkey.clone(), mchain.clone()));
        let lm = m.listen(ServicePrefix::exact(service), 0, 1);
        eps.push((m, loc(M)));
        listeners.push((2, lm, mkey, mchain.is_some()));
    }
    let mut net = Net {
        eps,
        queue: Vec::new(),
        now: Instant::ZERO,
    };
    let h = if ca {
        let name = ServerName::new("echo.fuzz").expect("a DNS name");
        net.eps[0].0.connect_name_via(Instant::ZERO, &name, loc(B))
    } else {
        net.eps[0].0.connect_via(Instant::ZERO, service, loc(B))
    }
    .expect("connect");
    net.collect_all();
    let mut client_events = Vec::new();

    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        let op = input.u8();
        let k = |input: &mut Input<'_>, n: usize| usize::from(input.u8()) % n.max(1);
        match op % 12 {
            0 | 1 => {
                if !net.queue.is_empty() {
                    let f = net.queue.remove(0);
                    net.deliver(f, None);
                }
            }
            2 => {
                if !net.queue.is_empty() {
                    let i = k(&mut input, net.queue.len());
                    let f = net.queue.remove(i);
                    net.deliver(f, None);
                }
            }
            3 => {
                // Diverted to the impostor (an attacker that sees the SYN answers it).
                if impostor && !net.queue.is_empty() {
                    let i = k(&mut input, net.queue.len());
                    if net.queue[i].t.dst != loc(A) {
                        let f = net.queue.remove(i);
                        net.deliver(f, Some(2));
                    }
                }
            }
            4 => {
                if !net.queue.is_empty() {
                    let i = k(&mut input, net.queue.len());
                    net.queue.remove(i);
                }
            }
            5 => {
                if !net.queue.is_empty() {
                    let i = k(&mut input, net.queue.len());
                    let f = net.queue[i].clone();
                    net.queue.push(f);
                }
            }
            6 | 7 => {
                if !net.queue.is_empty() {
                    let i = k(&mut input, net.queue.len());
                    let mut f = net.queue.remove(i);
                    let before = f.t.payload.clone();
                    mutate_raw(&mut input, &mut f.t.payload);
                    f.pristine = f.pristine && f.t.payload == before;
                    net.deliver(f, None);
                }
            }
            8 => {
                if !net.queue.is_empty() {
                    let i = k(&mut input, net.queue.len());
                    let mut f = net.queue.remove(i);
                    let before = f.t.payload.clone();
                    mutate_repr(&mut input, &mut f.t.payload);
                    f.pristine = f.pristine && f.t.payload == before;
                    net.deliver(f, None);
                }
            }
            9 => {
                let ms = u64::from(input.u16() % 5000);
                net.tick(ms);
            }
            10 => {
                if net.queue.len() >= 2 {
                    let i = k(&mut input, net.queue.len());
                    let j = k(&mut input, net.queue.len());
                    net.queue.swap(i, j);
                }
            }
            _ => {
                // Made-up bytes from anywhere to anyone.
                let to = k(&mut input, net.eps.len());
                let n = usize::from(input.u8());
                let payload = input.bytes(n);
                let src = loc([
                    "10.0.0.1:54324",
                    "10.0.0.2:54324",
                    "10.0.0.6:54324",
                    "203.0.113.9:9",
                ][usize::from(input.u8() % 4)]);
                let dst = net.eps[to].1;
                net.deliver(
                    Flight {
                        t: Transmit { src, dst, payload },
                        pristine: false,
                    },
                    Some(to),
                );
            }
        }
        client_events.extend(events(&mut net.eps[0].0));
    }

    // Settle: everything in flight delivered as is, time passing, until quiet.
    for _ in 0..200 {
        if net.queue.is_empty() {
            net.tick(10);
            if net.queue.is_empty() {
                break;
            }
        }
        while !net.queue.is_empty() {
            let f = net.queue.remove(0);
            net.deliver(f, None);
        }
        client_events.extend(events(&mut net.eps[0].0));
    }

    let connected = client_events.contains(&Event::Connected(h));
    let client_closed = client_events
        .iter()
        .any(|e| matches!(e, Event::Closed(x, _) | Event::ConnectFailed(x, _) if *x == h));
    if connected {
        // Identity: some server the client could reach holds a key it accepts.
        assert!(
            listeners.iter().any(|(_, _, key, chain)| satisfies(
                required.as_ref(),
                &service,
                key.as_ref(),
                *chain
            )),
            "connected with identity {required:?} though no server holds such a key"
        );
        // Plaintext only by agreement.
        if let Some(p) = net.eps[0].0.protection(h) {
            assert!(
                p == Protection::Encrypted
                    || (cprot == Protection::Plaintext && sprot == Protection::Plaintext),
                "plaintext without both ends asking"
            );
        }
    }
    // The servers that accepted.
    let mut accepted: Vec<(usize, ConnectionHandle, bool)> = Vec::new();
    for (i, l, key, chain) in &listeners {
        if let Some(sh) = net.eps[*i].0.accept(*l) {
            let ok = satisfies(required.as_ref(), &service, key.as_ref(), *chain);
            if required.is_some() {
                assert!(ok, "a server without the required key got the connection");
            }
            accepted.push((*i, sh, ok));
            if let Some(p) = net.eps[*i].0.protection(sh) {
                assert!(
                    p == Protection::Encrypted
                        || (cprot == Protection::Plaintext && sprot == Protection::Plaintext),
                    "plaintext without both ends asking (server)"
                );
            }
        }
    }
    assert!(accepted.len() <= 1, "two servers accepted one connect");
    // Keys: data written by the client arrives intact at the server that accepted.
    if connected && !client_closed {
        let probe = b"the probe of the handshake target";
        let _ = net.eps[0].0.write(h, probe);
        let mut got = vec![Vec::new(); net.eps.len()];
        let mut buf = [0u8; 256];
        let mut closed = false;
        for _ in 0..400 {
            net.tick(5);
            while !net.queue.is_empty() {
                let f = net.queue.remove(0);
                net.deliver(f, None);
            }
            for (i, sh, _) in &accepted {
                while let Ok(Some(n)) = net.eps[*i].0.read(*sh, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    got[*i].extend_from_slice(&buf[..n]);
                }
            }
            for i in 0..net.eps.len() {
                if events(&mut net.eps[i].0)
                    .iter()
                    .any(|e| matches!(e, Event::Closed(..) | Event::ConnectFailed(..)))
                {
                    closed = true;
                }
            }
            if accepted
                .iter()
                .any(|(i, _, _)| got[*i].len() >= probe.len())
                || closed
            {
                break;
            }
        }
        for g in &got {
            assert!(probe.starts_with(g), "data arrived altered: {g:?}");
        }
        if !closed && !accepted.is_empty() {
            assert!(
                accepted.iter().any(|(i, _, _)| got[*i] == probe),
                "connected, accepted, but the data did not arrive"
            );
        }
    }
});
