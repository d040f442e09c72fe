//! Arbitrary bytes as a SAL packet: validation, iteration and parsing never panic, `parse` agrees
//! with `new_checked`, and a parsed header re-emits to bytes that parse to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serval_wire::{SalPacket, SalRepr};

fuzz_target!(|data: &[u8]| {
    // Unchecked view: the extension accessors must not panic either.
    let raw = SalPacket::new_unchecked(data);
    let _ = raw.extensions().count();
    let _ = (
        raw.control(),
        raw.service(),
        raw.nonce(),
        raw.source(),
        raw.auth_input(),
    );

    let checked = SalPacket::new_checked(data);
    let parsed = SalRepr::parse(&raw);
    assert_eq!(checked.as_ref().err(), parsed.as_ref().err());
    let Ok(packet) = checked else { return };

    let mut exts = packet.extensions();
    while let Some(ext) = exts
        .try_next()
        .expect("a checked packet has well-formed extensions")
    {
        let _ = ext.ty();
    }
    assert_eq!(exts.offset(), usize::from(packet.header_len()));
    let _ = (
        packet.protocol(),
        packet.src_flow(),
        packet.dst_flow(),
        packet.payload(),
    );

    let repr = parsed.expect("checked above");
    let mut buf = vec![0xa5; repr.buffer_len()];
    repr.emit(&mut SalPacket::new_unchecked(&mut buf[..]))
        .expect("a parsed header re-emits");
    let again = SalPacket::new_checked(&buf[..]).expect("an emitted header validates");
    assert_eq!(SalRepr::parse(&again).expect("and parses"), repr);
});
