//! Registration messages (protocol 3): byte fixtures (the examples of `docs/wire.md` §11.4),
//! every [`RegError`] reached, round trips, and arbitrary bytes never panicking.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use proptest::prelude::*;
use serval_wire::registration::{
    REGISTRATION_COOKIE_PAYLOAD_LEN, REGISTRATION_PACKET_LEN, REGISTRATION_PAYLOAD_LEN,
    REGISTRATION_SIGNED_PAYLOAD_LEN, RegistrationMessage, field,
};
use serval_wire::{
    Cookie, FlowId, MessageType, Protocol, RegError, RegistrationRepr, RejectReason, SalPacket,
    SalRepr, ServiceId, ServicePrefix, Signature, WireError,
};

/// The ID whose bytes are 0x20, 0x21, … 0x3f.
fn id_20_3f() -> ServiceId {
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = 0x20 + i as u8;
    }
    ServiceId(id)
}

fn register_fixture() -> RegistrationRepr {
    RegistrationRepr::register(
        0x0102_0304,
        0x1112_1314_1516_1718,
        ServicePrefix::exact(id_20_3f()),
        3,
        7,
        3000,
    )
}

/// The REGISTER of §11.4, byte for byte.
#[rustfmt::skip]
const REGISTER_BYTES: [u8; 80] = [
    // base header: v1, protocol 3, hdr_len 20, flows 0
    0x10, 0x03, 0x00, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    // type REGISTER, reason 0, prefix length 256
    0x01, 0x00, 0x01, 0x00, //
    // request ID
    0x01, 0x02, 0x03, 0x04, //
    // instance
    0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, //
    // weight 3, priority 7, TTL 3000 ms
    0, 0, 0, 3, 0, 0, 0, 7, 0x00, 0x00, 0x0b, 0xb8, //
    // prefix ID
    0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f,
    0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f,
];

#[test]
fn register_fixture_bytes() {
    let bytes = register_fixture().to_packet();
    assert_eq!(bytes, REGISTER_BYTES);
    let packet = SalPacket::new_checked(&bytes[..]).unwrap();
    assert_eq!(
        RegistrationRepr::parse_packet(&packet),
        Ok(register_fixture())
    );
    let view = RegistrationMessage::new_checked(packet.payload()).unwrap();
    assert_eq!(view.message_type(), Ok(MessageType::Register));
    assert_eq!(view.request_id(), 0x0102_0304);
    assert_eq!(view.instance(), 0x1112_1314_1516_1718);
    assert_eq!(view.prefix_len(), 256);
    assert_eq!(view.prefix_id(), id_20_3f());
    assert_eq!(
        (view.weight(), view.priority(), view.ttl_ms()),
        (3, 7, 3000)
    );
}

#[test]
fn answers_differ_only_in_type_reason_and_ttl() {
    let req = register_fixture();
    let ack = req.ack(2500).to_packet();
    let mut expected = REGISTER_BYTES;
    expected[20] = 3; // ACK
    expected[20 + field::TTL.start..20 + field::TTL.end].copy_from_slice(&2500u32.to_be_bytes());
    assert_eq!(ack, expected);

    let reject = req.reject(RejectReason::NOT_ACCEPTED).to_packet();
    let mut expected = REGISTER_BYTES;
    expected[20] = 4; // REJECT
    expected[21] = 1; // not accepted
    expected[20 + field::TTL.start..20 + field::TTL.end].fill(0);
    assert_eq!(reject, expected);

    let unreg = req.unregister(9).to_packet();
    assert_eq!(unreg[20], 2);
    assert_eq!(&unreg[24..28], &[0, 0, 0, 9]);
    assert_eq!(&unreg[44..48], &[0, 0, 0, 0]);

    // Every answer is exactly as long as the request: no amplification.
    assert_eq!(ack.len(), REGISTER_BYTES.len());
    assert!(req.is_answered_by(&req.ack(1)));
    assert!(req.is_answered_by(&req.reject(RejectReason::LIMIT)));
    assert!(!req.is_answered_by(&req));
    assert!(!req.is_answered_by(&RegistrationRepr {
        request_id: 5,
        ..req.ack(1)
    }));
    assert!(!req.is_answered_by(&RegistrationRepr {
        instance: 5,
        ..req.ack(1)
    }));
}

#[test]
fn short_prefix_fixture() {
    // `ab/8`: one byte of ID, the rest zero.
    let prefix = ServicePrefix::parse("ab/8").unwrap();
    let r = RegistrationRepr::register(1, 2, prefix, 1, 0, 0);
    let bytes = r.to_packet();
    assert_eq!(&bytes[20..24], &[0x01, 0x00, 0x00, 0x08]);
    assert_eq!(bytes[48], 0xab);
    assert!(bytes[49..].iter().all(|&b| b == 0));
    let p = SalPacket::new_checked(&bytes[..]).unwrap();
    assert_eq!(RegistrationRepr::parse_packet(&p), Ok(r));
}

fn payload_with(f: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut b = REGISTER_BYTES[20..].to_vec();
    f(&mut b);
    b
}

#[test]
fn every_error_is_reached() {
    let check = |b: &[u8]| RegistrationMessage::new_checked(b).map(|_| ());
    assert_eq!(check(&REGISTER_BYTES[20..79]), Err(RegError::BadLength(59)));
    assert_eq!(check(&[0u8; 61]), Err(RegError::BadLength(61)));
    for n in [75, 77, 139, 141] {
        assert_eq!(check(&vec![0u8; n]), Err(RegError::BadLength(n)));
    }
    // Type 5 (COOKIE) is unknown in the 60-byte form, known in the longer ones.
    assert_eq!(
        check(&payload_with(|b| b[0] = 5)),
        Err(RegError::UnknownType(5))
    );
    let mut long = payload_with(|b| b[0] = 5);
    long.extend_from_slice(&[0; 16]);
    assert_eq!(check(&long), Ok(()));
    long[0] = 6;
    assert_eq!(check(&long), Err(RegError::UnknownType(6)));
    assert_eq!(
        check(&payload_with(|b| b[0] = 9)),
        Err(RegError::UnknownType(9))
    );
    assert_eq!(
        check(&payload_with(|b| b[1] = 2)),
        Err(RegError::BadReason { ty: 1, reason: 2 })
    );
    assert_eq!(
        check(&payload_with(|b| b[0] = 4)),
        Err(RegError::BadReason { ty: 4, reason: 0 })
    );
    assert_eq!(
        check(&payload_with(
            |b| b[2..4].copy_from_slice(&257u16.to_be_bytes())
        )),
        Err(RegError::BadPrefixLen(257))
    );
    // Length 255 with the last bit of the ID set.
    assert_eq!(
        check(&payload_with(
            |b| b[2..4].copy_from_slice(&255u16.to_be_bytes())
        )),
        Err(RegError::PrefixHostBits)
    );
    assert_eq!(
        check(&payload_with(|b| b[16..20].fill(0))),
        Err(RegError::ZeroWeight)
    );

    // Packet-level checks.
    let parse = |b: &[u8]| RegistrationRepr::parse_packet(&SalPacket::new_unchecked(b));
    let mut p = REGISTER_BYTES;
    p[1] = 2;
    assert_eq!(
        parse(&p),
        Err(RegError::NotRegistration(Protocol::DATAGRAM))
    );
    let mut p = REGISTER_BYTES;
    p[11] = 1;
    assert_eq!(parse(&p), Err(RegError::FlowNotZero));
    let mut p = REGISTER_BYTES;
    p[19] = 1;
    assert_eq!(parse(&p), Err(RegError::FlowNotZero));
    assert_eq!(
        parse(&REGISTER_BYTES[..10]),
        Err(RegError::Wire(WireError::Truncated))
    );
    assert_eq!(parse(&REGISTER_BYTES[..20]), Err(RegError::BadLength(0)));

    // Emit.
    let mut small = [0u8; 59];
    assert_eq!(
        register_fixture().emit(&mut small),
        Err(RegError::BufferTooSmall {
            needed: 60,
            available: 59
        })
    );
    let zero = RegistrationRepr {
        weight: 0,
        ..register_fixture()
    };
    assert_eq!(zero.emit(&mut [0u8; 60]), Err(RegError::ZeroWeight));
    // `to_packet` never writes a weight of 0.
    let bytes = zero.to_packet();
    assert_eq!(&bytes[36..40], &[0, 0, 0, 1]);
    // A COOKIE needs a cookie (to_packet writes an empty one).
    let no_cookie = RegistrationRepr {
        ty: MessageType::Cookie,
        ..register_fixture()
    };
    assert_eq!(
        no_cookie.emit(&mut [0u8; 140]),
        Err(RegError::CookieMissing)
    );
    assert_eq!(no_cookie.to_packet().len(), 96);
    let signed = RegistrationRepr {
        signature: Some(Signature([1; 64])),
        ..register_fixture()
    };
    assert_eq!(
        signed.emit(&mut [0u8; 139]),
        Err(RegError::BufferTooSmall {
            needed: 140,
            available: 139
        })
    );
}

#[test]
fn extensions_before_the_payload_are_skipped() {
    // A future sender may add extensions (an AUTH tag, say); the payload follows them.
    let mut header = SalRepr::new(Protocol::REGISTRATION, FlowId::NONE, FlowId::NONE);
    header.auth = Some([0x55; 16]);
    let mut payload = [0u8; REGISTRATION_PAYLOAD_LEN];
    register_fixture().emit(&mut payload).unwrap();
    let bytes = header.to_bytes(&payload).unwrap();
    let p = SalPacket::new_checked(&bytes[..]).unwrap();
    assert_eq!(RegistrationRepr::parse_packet(&p), Ok(register_fixture()));
}

/// The cookie of §11.4: slot 0x00000102, then the MAC bytes 0xc0, 0xc1, … 0xcb.
fn cookie_fixture() -> Cookie {
    let mut c = [0u8; 16];
    c[..4].copy_from_slice(&[0, 0, 1, 2]);
    for (i, b) in c[4..].iter_mut().enumerate() {
        *b = 0xc0 + i as u8;
    }
    Cookie(c)
}

#[test]
fn cookie_form_fixture_bytes() {
    // The first REGISTER of §11.4 in the 76-byte form: an empty cookie.
    let first = register_fixture().with_cookie(Cookie::EMPTY);
    let bytes = first.to_packet();
    assert_eq!(bytes.len(), 96);
    assert_eq!(&bytes[..80], &REGISTER_BYTES[..]);
    assert_eq!(&bytes[80..], &[0u8; 16]);
    let p = SalPacket::new_checked(&bytes[..]).unwrap();
    assert_eq!(p.payload().len(), REGISTRATION_COOKIE_PAYLOAD_LEN);
    assert_eq!(RegistrationRepr::parse_packet(&p), Ok(first));

    // The router's COOKIE: type 5, TTL 0, the cookie in place of the empty one.
    let answer = first.cookie_answer(cookie_fixture());
    let a = answer.to_packet();
    let mut expected = bytes.clone();
    expected[20] = 5;
    expected[44..48].fill(0);
    expected[80..96].copy_from_slice(&[
        0x00, 0x00, 0x01, 0x02, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
        0xcb,
    ]);
    assert_eq!(a, expected);
    assert!(first.is_answered_by(&answer));
    let parsed = RegistrationRepr::parse_packet(&SalPacket::new_checked(&a[..]).unwrap()).unwrap();
    assert_eq!(parsed.ty, MessageType::Cookie);
    assert_eq!(parsed.cookie, Some(cookie_fixture()));

    // The REGISTER again with the cookie, and its ACK (which may carry a fresher cookie).
    let again = first.with_cookie(cookie_fixture());
    let mut expected = bytes.clone();
    expected[80..96].copy_from_slice(&cookie_fixture().0);
    assert_eq!(again.to_packet(), expected);
    let ack = again.ack(2500).to_packet();
    assert_eq!(ack.len(), 96);
    assert_eq!(ack[20], 3);
    // A 60-byte request has no room for a cookie: its REJECT says so, in 80 bytes.
    let reject = register_fixture()
        .reject(RejectReason::COOKIE_REQUIRED)
        .to_packet();
    assert_eq!(reject.len(), 80);
    assert_eq!(&reject[20..22], &[4, 5]);
}

#[test]
fn signed_form_fixture_bytes() {
    // The signed REGISTER of §11.4: the cookie form, then 64 signature bytes (here 0x40…0x7f;
    // serval-keys' tests check real signatures).
    let mut sig = [0u8; 64];
    for (i, b) in sig.iter_mut().enumerate() {
        *b = 0x40 + i as u8;
    }
    let signed = RegistrationRepr {
        signature: Some(Signature(sig)),
        ..register_fixture().with_cookie(cookie_fixture())
    };
    let bytes = signed.to_packet();
    assert_eq!(bytes.len(), 160);
    assert_eq!(&bytes[..80], &REGISTER_BYTES[..]);
    assert_eq!(&bytes[80..96], &cookie_fixture().0);
    assert_eq!(&bytes[96..], &sig[..]);
    let p = SalPacket::new_checked(&bytes[..]).unwrap();
    assert_eq!(p.payload().len(), REGISTRATION_SIGNED_PAYLOAD_LEN);
    assert_eq!(RegistrationRepr::parse_packet(&p), Ok(signed));
    // What the signature covers: payload bytes 0..76.
    assert_eq!(&signed.signed_bytes()[..], &bytes[20..96]);
    // Answers keep the length, with a zero signature.
    for answer in [
        signed.ack(2500),
        signed.reject(RejectReason::UNAUTHORIZED),
        signed.cookie_answer(Cookie([9; 16])),
    ] {
        let a = answer.to_packet();
        assert_eq!(a.len(), 160);
        assert!(a[96..].iter().all(|&b| b == 0));
    }
    let rej = signed.reject(RejectReason::UNAUTHORIZED).to_packet();
    assert_eq!(&rej[20..22], &[4, 4]);
    // A signature without a cookie is sent with an empty Cookie field.
    let no_cookie = RegistrationRepr {
        signature: Some(Signature(sig)),
        ..register_fixture()
    };
    let b = no_cookie.to_packet();
    assert_eq!(&b[80..96], &[0u8; 16]);
    let back = RegistrationRepr::parse_packet(&SalPacket::new_checked(&b[..]).unwrap()).unwrap();
    assert_eq!(back.cookie, Some(Cookie::EMPTY));
}

#[test]
fn display_is_one_readable_line() {
    let s = register_fixture()
        .reject(RejectReason::NOT_ACCEPTED)
        .to_string();
    assert!(
        s.starts_with("REJECT (prefix not accepted by this router) #16909060 "),
        "{s}"
    );
    assert!(!s.contains('\n'));
}

fn repr() -> impl Strategy<Value = RegistrationRepr> {
    (
        base_repr(),
        0u8..3,
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(r, form, cookie, s1, s2)| {
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&s1);
            sig[32..].copy_from_slice(&s2);
            match form {
                // COOKIE exists only in the longer forms.
                0 if r.ty != MessageType::Cookie => r,
                1 | 0 => RegistrationRepr {
                    cookie: Some(Cookie(cookie)),
                    ..r
                },
                _ => RegistrationRepr {
                    cookie: Some(Cookie(cookie)),
                    signature: Some(Signature(sig)),
                    ..r
                },
            }
        })
}

fn base_repr() -> impl Strategy<Value = RegistrationRepr> {
    (
        0u8..5,
        1u8..=255,
        any::<u32>(),
        any::<u64>(),
        any::<[u8; 32]>(),
        0u16..=256,
        1u32..,
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(t, reason, request_id, instance, id, len, weight, priority, ttl_ms)| {
                let ty = match t {
                    0 => MessageType::Register,
                    1 => MessageType::Unregister,
                    2 => MessageType::Ack,
                    3 => MessageType::Cookie,
                    _ => MessageType::Reject(RejectReason(reason)),
                };
                RegistrationRepr {
                    ty,
                    request_id,
                    instance,
                    prefix: ServicePrefix::new(ServiceId(id), len),
                    weight,
                    priority,
                    ttl_ms,
                    cookie: None,
                    signature: None,
                }
            },
        )
}

proptest! {
    #[test]
    fn round_trip(r in repr()) {
        let bytes = r.to_packet();
        prop_assert_eq!(bytes.len(), r.packet_len());
        prop_assert!(matches!(bytes.len(), REGISTRATION_PACKET_LEN | 96 | 160));
        let p = SalPacket::new_checked(&bytes[..]).unwrap();
        prop_assert_eq!(RegistrationRepr::parse_packet(&p), Ok(r));
        // Answers are exactly as long as the request: no amplification.
        prop_assert_eq!(r.ack(1).to_packet().len(), bytes.len());
        prop_assert_eq!(r.reject(RejectReason::UNAUTHORIZED).to_packet().len(), bytes.len());
        if r.cookie.is_some() {
            prop_assert_eq!(r.cookie_answer(Cookie([7; 16])).to_packet().len(), bytes.len());
        }
    }

    #[test]
    fn arbitrary_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..150)) {
        let r = RegistrationMessage::new_checked(&bytes[..]).and_then(|m| RegistrationRepr::parse(&m));
        if let Ok(repr) = r {
            // Whatever parses re-emits to the same bytes.
            let mut out = vec![0u8; repr.buffer_len()];
            repr.emit(&mut out).unwrap();
            prop_assert_eq!(&out[..], &bytes[..]);
        }
    }

    #[test]
    fn arbitrary_packets_never_panic(
        mut bytes in prop::collection::vec(any::<u8>(), 0..180),
        fix_header in any::<bool>(),
    ) {
        if fix_header && bytes.len() >= 20 {
            // Make most of them get past the SAL header to the payload checks.
            bytes[..20].copy_from_slice(&REGISTER_BYTES[..20]);
        }
        let _ = RegistrationRepr::parse_packet(&SalPacket::new_unchecked(&bytes[..]));
        if let Ok(p) = SalPacket::new_checked(&bytes[..]) {
            let _ = RegistrationRepr::parse_packet(&p);
        }
    }

    #[test]
    fn mutated_fixture_never_panics_and_stays_canonical(i in 0usize..80, v in any::<u8>()) {
        let mut bytes = REGISTER_BYTES;
        bytes[i] = v;
        if let Ok(p) = SalPacket::new_checked(&bytes[..])
            && let Ok(r) = RegistrationRepr::parse_packet(&p)
        {
            // The reserved flag bits of byte 0 are ignored on receipt and sent as 0.
            let out = r.to_packet();
            prop_assert_eq!(out[0], 0x10);
            prop_assert_eq!(&out[1..], &bytes[1..]);
        }
    }
}
