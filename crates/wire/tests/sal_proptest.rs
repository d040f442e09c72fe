//! Property tests for the SAL header: representations round-trip, and no input panics.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use serval_wire::KeyShareRepr;
use serval_wire::ext::{SOURCE_MAX_LOCATOR_BYTES, field as ext_field};
use serval_wire::header::BASE_HEADER_LEN;
use serval_wire::locator::locator_len;
use serval_wire::{
    ControlFlags, ControlRepr, Extension, FlowId, Locator, Nonce, Protocol, SalPacket, SalRepr,
    ServiceId, ServiceRepr, WireError,
};

fn locator() -> impl Strategy<Value = Locator> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(a, p)| SocketAddr::new(Ipv4Addr::from(a).into(), p)),
        // A few fixed ports so that equal addresses with equal ports (loops) come up.
        (any::<[u8; 16]>(), prop_oneof![Just(54324u16), any::<u16>()])
            .prop_map(|(a, p)| SocketAddr::new(Ipv6Addr::from(a).into(), p)),
    ]
}

/// Distinct locators that fit in one SOURCE extension.
fn source_list() -> impl Strategy<Value = Vec<Locator>> {
    prop::collection::vec(locator(), 0..40).prop_map(|v| {
        let mut seen = HashSet::new();
        let mut bytes = 0;
        v.into_iter()
            .filter(|l| seen.insert(*l))
            .take_while(|l| {
                bytes += locator_len(l);
                bytes <= SOURCE_MAX_LOCATOR_BYTES
            })
            .collect()
    })
}

fn sal_repr() -> impl Strategy<Value = SalRepr> {
    (
        any::<u8>(),
        any::<u64>(),
        any::<u64>(),
        prop::option::of((any::<u16>(), any::<u32>(), any::<u32>())),
        prop::option::of((any::<u8>(), any::<[u8; 32]>())),
        prop::option::of(any::<[u8; 16]>()),
        source_list(),
        prop::option::of(any::<[u8; 16]>()),
        prop::option::of((any::<u8>(), any::<u8>(), any::<[u8; 32]>())),
        prop::option::of(any::<[u8; 20]>()),
    )
        .prop_map(
            |(protocol, src, dst, control, service, nonce, source, auth, keyshare, cookie)| {
                SalRepr {
                    protocol: Protocol(protocol),
                    src_flow: FlowId(src),
                    dst_flow: FlowId(dst),
                    control: control.map(|(f, verno, ackno)| ControlRepr {
                        flags: ControlFlags::from_bits_truncate(f),
                        verno,
                        ackno,
                    }),
                    service: service.map(|(hop_limit, id)| ServiceRepr {
                        hop_limit,
                        id: ServiceId(id),
                    }),
                    nonce: nonce.map(Nonce),
                    keyshare: keyshare.map(|(group, flags, key)| KeyShareRepr {
                        group,
                        flags,
                        key,
                    }),
                    cookie,
                    identity: None,
                    pad: 0,
                    source,
                    auth,
                }
            },
        )
}

/// Everything a receiver might do with bytes; must never panic. Returns the parse result.
fn exercise(bytes: &[u8]) -> Result<SalRepr, WireError> {
    // Unchecked views: extension accessors never panic, whatever the bytes.
    let raw = SalPacket::new_unchecked(bytes);
    let _ = raw.extensions().count();
    let _ = (raw.control(), raw.service(), raw.nonce(), raw.source());
    let _ = (raw.auth_tag(), raw.auth_input(), raw.has_extensions());
    let parsed = SalRepr::parse(&raw);

    let checked = SalPacket::new_checked(bytes);
    assert_eq!(checked.as_ref().err(), parsed.as_ref().err());
    if let Ok(p) = checked {
        // A checked packet: every accessor works, and iteration sees every extension.
        let _ = (p.version(), p.protocol(), p.src_flow(), p.dst_flow());
        let _ = (p.header(), p.payload(), p.reserved_flags());
        let mut exts = p.extensions();
        let mut n = 0;
        while let Some(e) = exts.try_next().unwrap() {
            n += 1;
            if let Extension::Source(s) = e {
                assert!(s.locators().count() >= 1);
            }
        }
        assert_eq!(p.extensions().count(), n);
        assert_eq!(
            usize::from(p.header_len()) - exts.offset(),
            0,
            "iteration consumed the whole header"
        );
        if let Some(range) = p.auth_tag_range() {
            assert_eq!(range.end, usize::from(p.header_len()));
        }
        let repr = parsed.clone().unwrap();
        // Re-emitting a parsed header gives a packet that parses to the same repr.
        let again = repr.to_bytes(p.payload()).unwrap();
        let q = SalPacket::new_checked(&again[..]).unwrap();
        assert_eq!(SalRepr::parse(&q).unwrap(), repr);
        assert_eq!(q.payload(), p.payload());
    }
    parsed
}

/// A version-1 base header followed by `exts` as the extension area, then `payload`.
fn with_extensions(exts: &[Vec<u8>], payload: &[u8]) -> Vec<u8> {
    let area: Vec<u8> = exts.concat();
    let hdr_len = (BASE_HEADER_LEN + area.len()) as u16;
    let mut v = vec![0x10, 1];
    v.extend_from_slice(&hdr_len.to_be_bytes());
    v.extend_from_slice(&[1; 16]);
    v.extend_from_slice(&area);
    v.extend_from_slice(payload);
    v
}

/// An extension that is often, but not always, well-formed.
fn extension() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![
        Just(0x00u8),
        Just(0x81),
        Just(0x82),
        Just(0x83),
        Just(0x84),
        Just(0x85),
        Just(0x86),
        Just(0x87),
        Just(0x88),
        Just(0x89),
        Just(0x7f),
        any::<u8>(),
    ];
    let fixed = |ty: u8| match ty {
        0x81 => Some(12),
        0x82 => Some(36),
        0x83 | 0x85 => Some(18),
        _ => None,
    };
    (
        ty,
        prop::collection::vec(any::<u8>(), 0..48),
        any::<u8>(),
        0u8..8,
    )
        .prop_map(move |(ty, mut body, lenbyte, mode)| {
            let mut e = vec![ty, 0];
            if ty == 0x84 && mode < 6 {
                // A plausible SOURCE: locators of family 4 or 6.
                body.clear();
                for i in 0..mode {
                    if i % 2 == 0 {
                        body.extend_from_slice(&[4, 0, i, 10, 0, 0, i % 3]);
                    } else {
                        body.extend_from_slice(&[6, 0, 1]);
                        body.extend_from_slice(&[0; 15]);
                        body.push(i);
                    }
                }
            } else if let Some(n) = fixed(ty).filter(|_| mode < 6) {
                body.resize(n - 2, 0x5a);
            }
            e.extend_from_slice(&body);
            // Mostly the right length byte, sometimes anything.
            e[1] = if mode == 7 {
                lenbyte
            } else {
                e.len().min(255) as u8
            };
            e
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn repr_round_trips(repr in sal_repr(), payload in prop::collection::vec(any::<u8>(), 0..64)) {
        let len = repr.buffer_len();
        let mut buf = vec![0xa5u8; len + payload.len()];
        let mut packet = SalPacket::new_unchecked(&mut buf[..]);
        repr.emit(&mut packet).unwrap();
        packet.payload_mut().copy_from_slice(&payload);

        let p = SalPacket::new_checked(&buf[..]).unwrap();
        prop_assert_eq!(usize::from(p.header_len()), len);
        prop_assert_eq!(p.payload(), &payload[..]);
        prop_assert_eq!(p.protocol(), repr.protocol);
        prop_assert_eq!(p.src_flow(), repr.src_flow);
        prop_assert_eq!(p.dst_flow(), repr.dst_flow);
        prop_assert_eq!(p.has_extensions(), len > BASE_HEADER_LEN);
        prop_assert_eq!(&SalRepr::parse(&p).unwrap(), &repr);
        prop_assert_eq!(repr.to_bytes(&payload).unwrap(), buf.clone());
        exercise(&buf).unwrap();
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = exercise(&bytes);
    }

    #[test]
    fn arbitrary_version1_bytes_never_panic(
        hdr_len in 0u16..600,
        rest in prop::collection::vec(any::<u8>(), 16..600),
    ) {
        let mut bytes = vec![0x10, 0];
        bytes.extend_from_slice(&hdr_len.to_be_bytes());
        bytes.extend_from_slice(&rest);
        let _ = exercise(&bytes);
    }

    #[test]
    fn arbitrary_extension_sequences_never_panic(
        exts in prop::collection::vec(extension(), 0..8),
        payload in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let bytes = with_extensions(&exts, &payload);
        if bytes.len() <= u16::MAX as usize {
            let _ = exercise(&bytes);
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        repr in sal_repr(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = repr.to_bytes(b"payload").unwrap();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let _ = exercise(&bytes);
    }
}

#[test]
fn extension_field_ranges_match_lengths() {
    assert_eq!(ext_field::CONTROL_ACKNO.end, 12);
    assert_eq!(ext_field::SERVICE_ID.end, 36);
    assert_eq!(ext_field::NONCE.end, 18);
    assert_eq!(ext_field::AUTH_TAG.end, 18);
}
