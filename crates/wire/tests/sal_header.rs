//! SAL header v1: byte fixtures (matching the diagrams in docs/wire.md) and one crafted input per
//! error.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use serval_wire::ext::{AUTH_TAG_LEN, ExtType};
use serval_wire::header::{BASE_HEADER_LEN, DEFAULT_UDP_PORT};
use serval_wire::{
    ControlFlags, ControlRepr, Extension, FlowId, Locator, MAX_PACKET_LEN, Nonce, Protocol,
    SalPacket, SalRepr, ServiceId, ServiceRepr, WireError,
};
use sha2::{Digest, Sha256};

fn seq<const N: usize>(start: u8) -> [u8; N] {
    core::array::from_fn(|i| start + i as u8)
}

fn loc(s: &str) -> Locator {
    s.parse().unwrap()
}

/// Emits `repr` into a 0xa5-filled buffer with `spare` bytes after the header, checks that the
/// bytes after the header were left alone, and returns the header bytes.
fn emit_a5(repr: &SalRepr, spare: usize) -> Vec<u8> {
    let len = repr.buffer_len();
    let mut buf = vec![0xa5u8; len + spare];
    repr.emit(&mut SalPacket::new_unchecked(&mut buf[..]))
        .unwrap();
    assert!(
        buf[len..].iter().all(|&b| b == 0xa5),
        "emit wrote past the header"
    );
    buf.truncate(len);
    buf
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn syn_repr() -> SalRepr {
    SalRepr {
        protocol: Protocol::STREAM,
        src_flow: FlowId(0x0102_0304_0506_0708),
        dst_flow: FlowId::NONE,
        control: Some(ControlRepr {
            flags: ControlFlags::SYN,
            verno: 0x1122_3344,
            ackno: 0,
        }),
        service: Some(ServiceRepr {
            hop_limit: 16,
            id: ServiceId(seq(0x20)),
        }),
        nonce: Some(Nonce(seq(0xc0))),
        keyshare: None,
        cookie: None,
        identity: None,
        pad: 0,
        source: vec![loc("192.0.2.1:40000"), loc("[2001:db8::7]:54324")],
        auth: None,
    }
}

#[rustfmt::skip]
const SYN_BYTES: [u8; 114] = [
    // base header: version 1 | flags 0, protocol 1 (stream), hdr_len 114
    0x10, 0x01, 0x00, 0x72,
    // src flowID
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    // dst flowID: none in a SYN
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // CONTROL: type 0x81, len 12, flags SYN, verno, ackno
    0x81, 0x0c, 0x00, 0x01,
    0x11, 0x22, 0x33, 0x44,
    0x00, 0x00, 0x00, 0x00,
    // SERVICE: type 0x82, len 36, hop limit 16, reserved, serviceID 20..3f
    0x82, 0x24, 0x10, 0x00,
    0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f,
    0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f,
    // NONCE: type 0x83, len 18, nonce c0..cf
    0x83, 0x12,
    0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf,
    // SOURCE: type 0x84, len 2 + 7 + 19 = 28
    0x84, 0x1c,
    // 192.0.2.1:40000
    0x04, 0x9c, 0x40, 192, 0, 2, 1,
    // [2001:db8::7]:54324
    0x06, 0xd4, 0x34,
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07,
];

#[test]
fn syn_fixture() {
    let repr = syn_repr();
    assert_eq!(repr.buffer_len(), SYN_BYTES.len());
    assert_eq!(emit_a5(&repr, 9), SYN_BYTES);

    let p = SalPacket::new_checked(&SYN_BYTES[..]).unwrap();
    assert_eq!(p.version(), 1);
    assert_eq!(p.protocol(), Protocol::STREAM);
    assert_eq!(p.header_len(), 114);
    assert_eq!(p.src_flow(), FlowId(0x0102_0304_0506_0708));
    assert!(p.dst_flow().is_none());
    assert!(p.has_extensions());
    assert!(p.payload().is_empty());
    let c = p.control().unwrap();
    assert_eq!(
        (c.flags(), c.verno(), c.ackno()),
        (ControlFlags::SYN, 0x1122_3344, 0)
    );
    let s = p.service().unwrap();
    assert_eq!((s.hop_limit(), s.service_id()), (16, ServiceId(seq(0x20))));
    assert_eq!(p.nonce(), Some(Nonce(seq(0xc0))));
    let src = p.source().unwrap();
    assert_eq!(src.origin(), loc("192.0.2.1:40000"));
    assert_eq!(src.locators().collect::<Vec<_>>(), repr.source);
    assert_eq!(p.auth_tag(), None);
    assert_eq!(p.auth_tag_range(), None);
    assert_eq!(p.auth_input(), None);
    let types: Vec<ExtType> = p.extensions().map(|e| e.ty()).collect();
    assert_eq!(
        types,
        [
            ExtType::CONTROL,
            ExtType::SERVICE,
            ExtType::NONCE,
            ExtType::SOURCE
        ]
    );
    assert_eq!(SalRepr::parse(&p).unwrap(), repr);
}

#[rustfmt::skip]
const DATA_BYTES: [u8; 24] = [
    // version 1, protocol 1 (stream), hdr_len 20: no extension
    0x10, 0x01, 0x00, 0x14,
    0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    // payload
    b'd', b'a', b't', b'a',
];

#[test]
fn data_fixture() {
    let repr = SalRepr::new(
        Protocol::STREAM,
        FlowId(0x8877_6655_4433_2211),
        FlowId(0x0102_0304_0506_0708),
    );
    assert_eq!(repr.buffer_len(), BASE_HEADER_LEN);
    assert_eq!(emit_a5(&repr, 4), DATA_BYTES[..20]);
    assert_eq!(repr.to_bytes(b"data").unwrap(), DATA_BYTES);

    let p = SalPacket::new_checked(&DATA_BYTES[..]).unwrap();
    assert!(!p.has_extensions());
    assert_eq!(p.extensions().count(), 0);
    assert_eq!(p.dst_flow(), FlowId(0x0102_0304_0506_0708));
    assert_eq!(p.header(), &DATA_BYTES[..20]);
    assert_eq!(p.payload(), b"data");
    assert_eq!(SalRepr::parse(&p).unwrap(), repr);
}

fn syn_ack_repr(tag: [u8; 16]) -> SalRepr {
    SalRepr {
        protocol: Protocol::STREAM,
        src_flow: FlowId(0x0a0b_0c0d_0e0f_1011),
        dst_flow: FlowId(0x0102_0304_0506_0708),
        control: Some(ControlRepr {
            flags: ControlFlags::SYN | ControlFlags::ACK,
            verno: 0x5566_7788,
            ackno: 0x1122_3344,
        }),
        service: None,
        nonce: Some(Nonce(seq(0xd0))),
        keyshare: None,
        cookie: None,
        identity: None,
        pad: 0,
        source: vec![],
        auth: Some(tag),
    }
}

#[rustfmt::skip]
const SYN_ACK_BYTES: [u8; 68] = [
    // version 1, protocol 1 (stream), hdr_len 68
    0x10, 0x01, 0x00, 0x44,
    0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    // CONTROL: flags SYN|ACK, verno, ackno = the SYN's verno
    0x81, 0x0c, 0x00, 0x03,
    0x55, 0x66, 0x77, 0x88,
    0x11, 0x22, 0x33, 0x44,
    // NONCE d0..df
    0x83, 0x12,
    0xd0, 0xd1, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf,
    // AUTH: type 0x85, len 18, tag e0..ef (bytes 50..66)
    0x85, 0x12,
    0xe0, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xef,
];

#[test]
fn syn_ack_fixture() {
    let repr = syn_ack_repr(seq(0xe0));
    assert_eq!(emit_a5(&repr, 3), SYN_ACK_BYTES);
    let p = SalPacket::new_checked(&SYN_ACK_BYTES[..]).unwrap();
    assert_eq!(p.auth_tag_range(), Some(52..68));
    assert_eq!(p.auth_tag(), Some(&seq::<16>(0xe0)));
    let [before, zeros, after] = p.auth_input().unwrap();
    assert_eq!(before, &SYN_ACK_BYTES[..52]);
    assert_eq!(zeros, &[0u8; 16]);
    assert!(after.is_empty());
    assert_eq!(SalRepr::parse(&p).unwrap(), repr);
}

/// The AUTH flow an engine follows: emit with a zero tag, MAC the packet, write the tag; the
/// receiver MACs `auth_input()` and compares. SHA-256 stands in for the real keyed MAC.
#[test]
fn auth_tag_covers_header_and_payload() {
    fn mac(chunks: &[&[u8]]) -> [u8; AUTH_TAG_LEN] {
        let mut h = Sha256::new();
        for c in chunks {
            h.update(c);
        }
        let d = h.finalize();
        d[..AUTH_TAG_LEN].try_into().unwrap()
    }
    let repr = syn_ack_repr([0; 16]);
    let mut bytes = repr.to_bytes(b"early data").unwrap();
    let tag = mac(&[&bytes]);
    *SalPacket::new_checked(&mut bytes[..])
        .unwrap()
        .auth_tag_mut()
        .unwrap() = tag;

    let p = SalPacket::new_checked(&bytes[..]).unwrap();
    assert_eq!(p.auth_tag(), Some(&tag));
    assert_eq!(mac(&p.auth_input().unwrap()), tag);
    let [_, _, after] = p.auth_input().unwrap();
    assert_eq!(after, b"early data");

    // Any change to the header or payload changes the MAC input.
    for i in [0usize, 25, 40, bytes.len() - 1] {
        let mut forged = bytes.clone();
        forged[i] ^= 1;
        if let Ok(f) = SalPacket::new_checked(&forged[..]) {
            assert_ne!(mac(&f.auth_input().unwrap()), tag, "byte {i}");
        }
    }
}

#[test]
fn setters_write_the_base_header() {
    let mut buf = [0xa5u8; 23];
    let mut p = SalPacket::new_unchecked(&mut buf[..]);
    p.set_version(1);
    p.set_protocol(Protocol::DATAGRAM);
    p.set_header_len(20);
    p.set_src_flow(FlowId(1));
    p.set_dst_flow(FlowId(u64::MAX));
    p.payload_mut().copy_from_slice(b"abc");
    assert!(p.auth_tag_mut().is_none());
    let p = SalPacket::new_checked(&buf[..]).unwrap();
    assert_eq!(
        SalRepr::parse(&p).unwrap(),
        SalRepr::new(Protocol::DATAGRAM, FlowId(1), FlowId(u64::MAX))
    );
    assert_eq!(p.reserved_flags(), 0);
    assert_eq!(p.payload(), b"abc");
}

#[test]
fn default_port_is_the_originals() {
    assert_eq!(DEFAULT_UDP_PORT, 54324);
}

// ---------------------------------------------------------------------------------------------
// Lenient parts: what receivers ignore or skip
// ---------------------------------------------------------------------------------------------

/// A version-1 packet whose extensions are the concatenation of `exts`, then `payload`.
fn build(exts: &[&[u8]], payload: &[u8]) -> Vec<u8> {
    let ext_len: usize = exts.iter().map(|e| e.len()).sum();
    let hdr_len = u16::try_from(BASE_HEADER_LEN + ext_len).unwrap();
    let mut v = vec![0x10, 0x02];
    v.extend_from_slice(&hdr_len.to_be_bytes());
    v.extend_from_slice(&7u64.to_be_bytes());
    v.extend_from_slice(&9u64.to_be_bytes());
    for e in exts {
        v.extend_from_slice(e);
    }
    v.extend_from_slice(payload);
    v
}

fn check(bytes: &[u8]) -> Result<SalRepr, WireError> {
    let r = SalPacket::new_checked(bytes).map(|p| SalRepr::parse(&p));
    // `parse` and `new_checked` must agree.
    assert_eq!(
        r.as_ref().err(),
        SalRepr::parse(&SalPacket::new_unchecked(bytes))
            .as_ref()
            .err()
    );
    // `check_base` is validation's first half: whenever it refuses, validation refuses with
    // the same error.
    if let Err(e) = SalPacket::new_unchecked(bytes).check_base() {
        assert_eq!(r.as_ref().err(), Some(&e));
    }
    r?
}

const CONTROL_SYN: [u8; 12] = [0x81, 12, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0];
const NONCE: [u8; 18] = [
    0x83, 18, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
];
const AUTH: [u8; 18] = [0x85, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const SOURCE_V4: [u8; 9] = [0x84, 9, 4, 0xd4, 0x34, 10, 0, 0, 1];

#[test]
fn reserved_bits_and_optional_extensions_are_ignored() {
    let plain = check(&build(&[&CONTROL_SYN, &NONCE], b"x")).unwrap();

    // Reserved flag nibble, undefined CONTROL flag bits, SERVICE reserved byte.
    let mut b = build(&[&CONTROL_SYN, &NONCE], b"x");
    b[0] = 0x1f;
    b[20 + 2..20 + 4].copy_from_slice(&0xff81u16.to_be_bytes());
    let r = check(&b).unwrap();
    assert_eq!(
        SalPacket::new_checked(&b[..]).unwrap().reserved_flags(),
        0xf
    );
    assert_eq!(r, plain);
    assert_eq!(r.control.unwrap().flags, ControlFlags::SYN);
    let mut svc = [0u8; 36];
    svc[..4].copy_from_slice(&[0x82, 36, 5, 0xff]);
    assert_eq!(
        check(&build(&[&svc], b""))
            .unwrap()
            .service
            .unwrap()
            .hop_limit,
        5
    );

    // PAD (any length >= 2, repeated) and unknown optional types are skipped: the repr is
    // unchanged but for the total of padding, which a forwarder keeps.
    let pad2 = [0x00, 2];
    let pad5 = [0x00, 5, 0xde, 0xad, 0xff];
    let opt = [0x7f, 4, 1, 2];
    let b = build(&[&CONTROL_SYN, &pad2, &opt, &NONCE, &pad5, &pad2], b"x");
    assert_eq!(
        check(&b).unwrap(),
        SalRepr {
            pad: 9,
            ..plain.clone()
        }
    );
    let p = SalPacket::new_checked(&b[..]).unwrap();
    assert!(matches!(
        p.extensions().nth(2),
        Some(Extension::Unknown {
            ty: ExtType(0x7f),
            body: &[1, 2]
        })
    ));
    // Unknown protocols pass through.
    let mut b = build(&[], b"");
    b[1] = 200;
    assert_eq!(check(&b).unwrap().protocol, Protocol(200));
}

// ---------------------------------------------------------------------------------------------
// One crafted input per error
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated() {
    assert_eq!(check(&[]), Err(WireError::Truncated));
    assert_eq!(check(&build(&[], b"")[..19]), Err(WireError::Truncated));
    // Unchecked views never panic in the extension accessors.
    let p = SalPacket::new_unchecked(&[0x10u8, 0][..]);
    assert_eq!(p.extensions().count(), 0);
    assert!(p.control().is_none() && p.auth_input().is_none());
}

#[test]
fn oversize() {
    let big = build(&[], &vec![0; MAX_PACKET_LEN - BASE_HEADER_LEN]);
    assert!(check(&big).is_ok());
    let bigger = build(&[], &vec![0; MAX_PACKET_LEN - BASE_HEADER_LEN + 1]);
    assert_eq!(check(&bigger), Err(WireError::Oversize(MAX_PACKET_LEN + 1)));

    let repr = SalRepr::new(Protocol::STREAM, FlowId(1), FlowId(2));
    assert_eq!(
        repr.to_bytes(&vec![0; MAX_PACKET_LEN]),
        Err(WireError::Oversize(MAX_PACKET_LEN + 20))
    );
    let mut buf = vec![0; MAX_PACKET_LEN + 1];
    assert_eq!(
        repr.emit(&mut SalPacket::new_unchecked(&mut buf[..])),
        Err(WireError::Oversize(MAX_PACKET_LEN + 1))
    );
}

#[test]
fn bad_version() {
    let mut b = build(&[], b"");
    b[0] = 0x21;
    assert_eq!(check(&b), Err(WireError::BadVersion(2)));
    b[0] = 0x0f;
    assert_eq!(check(&b), Err(WireError::BadVersion(0)));
    // The version is read before anything else.
    assert_eq!(check(&[0x20]), Err(WireError::BadVersion(2)));
}

#[test]
fn header_len() {
    let mut b = build(&[], b"abc");
    b[2..4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(check(&b), Err(WireError::HeaderLenTooShort(19)));
    b[2..4].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(check(&b), Err(WireError::HeaderLenTooShort(0)));
    b[2..4].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(
        check(&b),
        Err(WireError::HeaderLenBeyondPacket {
            hdr_len: 24,
            packet_len: 23
        })
    );
    // hdr_len = packet length: all header, no payload (here 3 bytes of a truncated extension).
    b[2..4].copy_from_slice(&23u16.to_be_bytes());
    assert!(matches!(check(&b), Err(WireError::ExtOverrun { .. })));
}

#[test]
fn extension_too_short() {
    assert_eq!(
        check(&build(&[&[0x00, 1]], b"")),
        Err(WireError::ExtTooShort { ty: 0, len: 1 })
    );
    assert_eq!(
        check(&build(&[&[0x42, 0]], b"")),
        Err(WireError::ExtTooShort { ty: 0x42, len: 0 })
    );
}

#[test]
fn extension_overrun() {
    // Length 10, 4 bytes left before hdr_len (the payload does not count).
    assert_eq!(
        check(&build(&[&[0x00, 10, 0, 0]], b"payload")),
        Err(WireError::ExtOverrun { ty: 0, offset: 20 })
    );
    // A lone type byte at the end of the header.
    assert_eq!(
        check(&build(&[&NONCE, &[0x85]], b"")),
        Err(WireError::ExtOverrun {
            ty: 0x85,
            offset: 38
        })
    );
}

#[test]
fn extension_bad_fixed_length() {
    for (ty, expected) in [(0x81u8, 12u8), (0x82, 36), (0x83, 18), (0x85, 18)] {
        for len in [2, expected - 1, expected + 1] {
            let mut e = vec![0u8; usize::from(len)];
            e[0] = ty;
            e[1] = len;
            assert_eq!(
                check(&build(&[&e], b"")),
                Err(WireError::ExtBadLen { ty, len, expected }),
                "type {ty:#x} len {len}"
            );
        }
    }
}

#[test]
fn duplicate_extension() {
    assert_eq!(
        check(&build(&[&NONCE, &NONCE], b"")),
        Err(WireError::DuplicateExt(0x83))
    );
    assert_eq!(
        check(&build(&[&CONTROL_SYN, &CONTROL_SYN], b"")),
        Err(WireError::DuplicateExt(0x81))
    );
    assert_eq!(
        check(&build(&[&SOURCE_V4, &NONCE, &SOURCE_V4], b"")),
        Err(WireError::DuplicateExt(0x84))
    );
    assert_eq!(
        check(&build(&[&AUTH, &AUTH], b"")),
        Err(WireError::DuplicateExt(0x85))
    );
}

#[test]
fn control_not_first() {
    assert_eq!(
        check(&build(&[&NONCE, &CONTROL_SYN], b"")),
        Err(WireError::ControlNotFirst)
    );
    assert_eq!(
        check(&build(&[&[0, 2], &CONTROL_SYN], b"")),
        Err(WireError::ControlNotFirst)
    );
}

#[test]
fn auth_not_last() {
    assert_eq!(
        check(&build(&[&AUTH, &NONCE], b"")),
        Err(WireError::AuthNotLast)
    );
    assert_eq!(
        check(&build(&[&CONTROL_SYN, &AUTH, &[0, 2]], b"")),
        Err(WireError::AuthNotLast)
    );
    assert_eq!(
        check(&build(&[&AUTH, &[0x10, 2]], b"")),
        Err(WireError::AuthNotLast)
    );
    // AUTH last, with a payload after the header, is fine.
    assert!(check(&build(&[&CONTROL_SYN, &AUTH], b"pp")).is_ok());
}

#[test]
fn unknown_mandatory() {
    for ty in [0x80u8, 0x89, 0xff] {
        assert_eq!(
            check(&build(&[&[ty, 3, 0]], b"")),
            Err(WireError::UnknownMandatory(ty))
        );
    }
    assert!(check(&build(&[&[0x01, 2], &[0x7f, 3, 0]], b"")).is_ok());
}

#[test]
fn source_errors() {
    assert_eq!(
        check(&build(&[&[0x84, 2]], b"")),
        Err(WireError::SourceEmpty)
    );
    // A second IPv4 locator cut after 3 of its 7 bytes.
    assert_eq!(
        check(&build(&[&[0x84, 12, 4, 0, 1, 10, 0, 0, 1, 4, 0, 1]], b"")),
        Err(WireError::SourceTruncated(12))
    );
    assert_eq!(
        check(&build(&[&[0x84, 9, 5, 0, 1, 10, 0, 0, 1]], b"")),
        Err(WireError::BadFamily(5))
    );
    assert_eq!(
        check(&build(
            &[&[0x84, 16, 4, 0, 1, 10, 0, 0, 1, 4, 0, 1, 10, 0, 0, 1]],
            b""
        )),
        Err(WireError::SourceLoop(loc("10.0.0.1:1")))
    );
    // Same address, other port: no loop.
    let r = check(&build(
        &[&[0x84, 16, 4, 0, 1, 10, 0, 0, 1, 4, 0, 2, 10, 0, 0, 1]],
        b"",
    ));
    assert_eq!(r.unwrap().source, [loc("10.0.0.1:1"), loc("10.0.0.1:2")]);
}

#[test]
fn emit_errors() {
    let mut repr = SalRepr::new(Protocol::NONE, FlowId(1), FlowId::NONE);
    // 36 IPv4 locators = 252 bytes fit; 37 do not.
    repr.source = (0..36).map(|i| Locator::from(([10, 0, 0, i], 1))).collect();
    let bytes = repr.to_bytes(b"").unwrap();
    assert_eq!(bytes[21], 254);
    assert_eq!(
        SalRepr::parse(&SalPacket::new_checked(&bytes[..]).unwrap()).unwrap(),
        repr
    );
    repr.source.push(loc("10.0.1.0:1"));
    assert_eq!(repr.to_bytes(b""), Err(WireError::SourceTooLong(259)));

    // Loops are refused on emit as on receipt, comparing what the wire carries (no scope ID).
    repr.source = vec![loc("[fe80::1%2]:5"), loc("[fe80::1]:5")];
    assert_eq!(
        repr.to_bytes(b""),
        Err(WireError::SourceLoop(loc("[fe80::1]:5")))
    );

    let repr = syn_repr();
    let mut buf = [0xa5u8; 113];
    assert_eq!(
        repr.emit(&mut SalPacket::new_unchecked(&mut buf[..])),
        Err(WireError::BufferTooSmall {
            needed: 114,
            available: 113
        })
    );
    assert!(
        buf.iter().all(|&b| b == 0xa5),
        "a failed emit writes nothing"
    );
}

#[test]
fn errors_display_clearly() {
    assert_eq!(
        WireError::UnknownMandatory(0x86).to_string(),
        "unknown extension 0x86 has the must-understand bit set"
    );
    assert_eq!(
        WireError::Oversize(70000).to_string(),
        "packet of 70000 bytes exceeds the 65507-byte maximum"
    );
    assert_eq!(
        WireError::BadVersion(2).to_string(),
        "unsupported SAL version 2 (expected 1)"
    );
}

/// KEYSHARE (docs/wire.md §4.6): the bytes of the extension, its place between NONCE and
/// SOURCE, and the key-phase bit of byte 0 (§12), which emit clears and the setter sets alone.
#[test]
fn keyshare_fixture_and_key_phase() {
    use serval_wire::KeyShareRepr;
    let share = KeyShareRepr {
        group: KeyShareRepr::X25519,
        flags: KeyShareRepr::PLAINTEXT,
        key: seq(0x40),
    };
    let mut repr = SalRepr::new(Protocol::NONE, FlowId(1), FlowId::NONE);
    repr.nonce = Some(Nonce(seq(0xc0)));
    repr.keyshare = Some(share);
    repr.source = vec![loc("10.0.0.1:54324")];
    let bytes = emit_a5(&repr, 0);
    let ks = &bytes[BASE_HEADER_LEN + 18..BASE_HEADER_LEN + 18 + 36];
    let mut expect = vec![0x86, 36, 0x01, 0x01];
    expect.extend(seq::<32>(0x40));
    assert_eq!(ks, &expect[..]);
    assert_eq!(
        bytes[BASE_HEADER_LEN + 18 + 36],
        0x84,
        "SOURCE follows KEYSHARE"
    );
    let mut p = SalPacket::new_checked(bytes.clone()).unwrap();
    let parsed = SalRepr::parse(&p).unwrap();
    assert_eq!(parsed.keyshare, Some(share));
    assert!(parsed.keyshare.unwrap().plaintext());
    assert!(!p.key_phase());
    p.set_key_phase(true);
    assert_eq!(p.as_ref()[0], 0x11);
    assert!(p.key_phase());
    assert_eq!(
        SalRepr::parse(&p).unwrap(),
        parsed,
        "the phase bit changes nothing else"
    );
    p.set_key_phase(false);
    assert_eq!(p.as_ref()[0], 0x10);
    // A KEYSHARE of the wrong length is malformed.
    assert_eq!(
        check(&build(
            &[&[[0x86, 35, 1, 0].as_slice(), &[0; 31]].concat()],
            b""
        )),
        Err(WireError::ExtBadLen {
            ty: 0x86,
            len: 35,
            expected: 36
        })
    );
}
