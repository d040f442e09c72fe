//! The snapshot container (docs/snapshot.md): layout, typed refusals, and no panic on any
//! input.
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use proptest::prelude::*;
use serval_engine::Instant;
use serval_engine::snapshot::{
    BlockWriter, FORMAT_VERSION, HEADER_LEN, MAGIC, SnapshotError, SnapshotReader, SnapshotWriter,
    block, crc32c, path_section,
};
use serval_engine::transport::conn::{Transport, TransportConfig};

const NOW: Instant = Instant::from_nanos(5_000_000_000);

/// A snapshot with a few blocks, added out of order.
fn sample() -> Vec<u8> {
    let mut w = SnapshotWriter::new(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10, 7, NOW);
    let mut b = w.body();
    b.u32(1);
    w.add(block::PATH, b).unwrap();
    let mut b = w.body();
    b.raw(b"stream");
    w.add(block::STREAM, b).unwrap();
    let mut b = w.body();
    b.u32(2);
    w.add(block::PATH, b).unwrap();
    w.finish().unwrap()
}

/// Header, the given raw blocks, and a correct length and CRC.
fn assemble(flags: u16, blocks: &[(u16, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&[0xab; 16]);
    v.extend_from_slice(&3u32.to_be_bytes());
    for (ty, body) in blocks {
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
    }
    reseal(&mut v, 4);
    v
}

/// Appends (`extra` = 4) or rewrites (`extra` = 0) the trailer after fixing the length.
fn reseal(v: &mut Vec<u8>, extra: usize) {
    let len = (v.len() + extra) as u32;
    v[8..12].copy_from_slice(&len.to_be_bytes());
    if extra == 0 {
        v.truncate(v.len() - 4);
    }
    let crc = crc32c(v);
    v.extend_from_slice(&crc.to_be_bytes());
}

#[test]
fn layout_is_as_documented() {
    let s = sample();
    assert_eq!(&s[..4], b"SVSN");
    assert_eq!(&s[4..6], &[0, 1], "version 1");
    assert_eq!(&s[6..8], &[0, 0], "no flags");
    assert_eq!(
        u32::from_be_bytes(s[8..12].try_into().unwrap()) as usize,
        s.len()
    );
    assert_eq!(s[12], 0x01);
    assert_eq!(s[27], 0x10, "export ID, big-endian");
    assert_eq!(&s[28..32], &[0, 0, 0, 7], "move epoch");
    assert_eq!(HEADER_LEN, 32);
    // Blocks sorted by type, PATH blocks in the order they were added.
    assert_eq!(&s[32..38], &[0x00, 0x03, 0, 0, 0, 6]);
    assert_eq!(&s[38..44], b"stream");
    assert_eq!(&s[44..50], &[0x00, 0x10, 0, 0, 0, 4]);
    assert_eq!(&s[50..54], &[0, 0, 0, 1]);
    assert_eq!(&s[54..60], &[0x00, 0x10, 0, 0, 0, 4]);
    assert_eq!(&s[60..64], &[0, 0, 0, 2]);
    let n = s.len() - 4;
    assert_eq!(&s[n..], &crc32c(&s[..n]).to_be_bytes());

    let r = SnapshotReader::parse(&s).unwrap();
    assert_eq!(r.export_id(), 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
    assert_eq!(r.move_epoch(), 7);
    assert_eq!(
        r.block_types().collect::<Vec<_>>(),
        [block::STREAM, block::PATH, block::PATH]
    );
    let paths: Vec<u32> = r
        .blocks(block::PATH, NOW)
        .map(|mut b| b.u32().unwrap())
        .collect();
    assert_eq!(paths, [1, 2]);
    assert!(r.block(block::SAL, NOW).is_none());
    assert_eq!(
        r.require(block::SAL, NOW).err(),
        Some(SnapshotError::Malformed {
            block: block::SAL,
            reason: "required block missing"
        })
    );
}

#[test]
fn instants_are_rebased_on_the_importers_clock() {
    let mut w = SnapshotWriter::new(1, 0, NOW);
    let mut b = w.body();
    b.instant(NOW + core::time::Duration::from_millis(5));
    b.instant(Instant::from_nanos(2_000_000_000));
    b.opt_instant(None);
    w.add(block::COUNTERS, b).unwrap();
    let s = w.finish().unwrap();
    let r = SnapshotReader::parse(&s).unwrap();
    let later = Instant::from_nanos(1_000_000_000_000);
    let mut b = r.block(block::COUNTERS, later).unwrap();
    assert_eq!(
        b.instant().unwrap(),
        later + core::time::Duration::from_millis(5)
    );
    assert_eq!(
        b.instant().unwrap(),
        later - core::time::Duration::from_secs(3)
    );
    assert_eq!(b.opt_instant().unwrap(), None);
    assert_eq!(b.remaining(), 0);
    assert!(
        b.u8().is_err(),
        "reading past the end is an error, not a panic"
    );
}

#[test]
fn foreign_version_truncated_and_corrupt_are_refused() {
    let s = sample();
    let parse = |b: &[u8]| SnapshotReader::parse(b).err();

    let mut foreign = s.clone();
    foreign[0] = b'X';
    assert_eq!(parse(&foreign), Some(SnapshotError::Foreign));
    assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Some(SnapshotError::Foreign));
    assert_eq!(
        parse(b""),
        Some(SnapshotError::Truncated {
            expected: 0,
            actual: 0
        })
    );
    assert!(matches!(
        parse(b"SVS"),
        Some(SnapshotError::Truncated { .. })
    ));

    let mut v2 = s.clone();
    v2[5] = 2;
    assert_eq!(parse(&v2), Some(SnapshotError::Version(2)));

    for cut in [s.len() - 1, s.len() - 5, 40, 33, 12, 6] {
        assert!(
            matches!(parse(&s[..cut]), Some(SnapshotError::Truncated { .. })),
            "cut at {cut}: {:?}",
            parse(&s[..cut])
        );
    }
    let mut longer = s.clone();
    longer.push(0);
    assert_eq!(
        parse(&longer),
        Some(SnapshotError::Truncated {
            expected: s.len() as u64,
            actual: s.len() as u64 + 1
        })
    );

    for at in [12, 20, 31, 33, 40, s.len() - 1] {
        let mut bad = s.clone();
        bad[at] ^= 0x40;
        assert_eq!(parse(&bad), Some(SnapshotError::Corrupt), "flip at {at}");
    }
}

#[test]
fn critical_rule_for_blocks_and_flags() {
    // Unknown, not critical: skipped.
    let s = assemble(
        0,
        &[
            (block::STREAM, b"x"),
            (0x0007, b"future"),
            (block::PATH, b""),
        ],
    );
    let r = SnapshotReader::parse(&s).unwrap();
    assert_eq!(
        r.block_types().collect::<Vec<_>>(),
        [block::STREAM, block::PATH]
    );
    // Unknown and critical: refused.
    let s = assemble(0, &[(block::STREAM, b"x"), (0x8077, b"future")]);
    assert_eq!(
        SnapshotReader::parse(&s).err(),
        Some(SnapshotError::UnknownCritical { block: 0x8077 })
    );
    // APP is known (and critical): kept.
    let s = assemble(0, &[(block::APP, b"blob"), (block::APP, b"blob2")]);
    assert_eq!(SnapshotReader::parse(&s).unwrap().block_types().count(), 2);
    // Flags: low byte advisory, high byte critical.
    assert!(SnapshotReader::parse(&assemble(0x0001, &[])).is_ok());
    assert_eq!(
        SnapshotReader::parse(&assemble(0x0200, &[])).err(),
        Some(SnapshotError::UnsupportedFlags(0x0200))
    );
    // The one critical flag defined, DELTA: known, and never importable alone.
    assert_eq!(
        SnapshotReader::parse(&assemble(0x0100, &[])).err(),
        Some(SnapshotError::Delta)
    );
    assert_eq!(
        SnapshotReader::parse(&assemble(0x0300, &[])).err(),
        Some(SnapshotError::UnsupportedFlags(0x0300))
    );
}

#[test]
fn framing_order_and_repetition_are_checked() {
    let order = assemble(0, &[(block::PATH, b""), (block::STREAM, b"")]);
    assert!(matches!(
        SnapshotReader::parse(&order).err(),
        Some(SnapshotError::Malformed {
            block: block::STREAM,
            ..
        })
    ));
    let twice = assemble(0, &[(block::STREAM, b""), (block::STREAM, b"")]);
    assert!(matches!(
        SnapshotReader::parse(&twice).err(),
        Some(SnapshotError::Malformed {
            block: block::STREAM,
            ..
        })
    ));
    // A block claiming more bytes than there are.
    let mut long = assemble(0, &[(block::STREAM, b"abcd")]);
    long[34..38].copy_from_slice(&100u32.to_be_bytes());
    reseal(&mut long, 0);
    assert!(matches!(
        SnapshotReader::parse(&long).err(),
        Some(SnapshotError::Malformed { block: 0, .. })
    ));
    // A truncated block header.
    let mut short = assemble(0, &[]);
    short.truncate(short.len() - 4);
    short.extend_from_slice(&[0x00, 0x03, 0x00]);
    reseal(&mut short, 4);
    assert!(matches!(
        SnapshotReader::parse(&short).err(),
        Some(SnapshotError::Malformed { block: 0, .. })
    ));
    // The writer refuses a second block of a type that may appear once.
    let mut w = SnapshotWriter::new(1, 0, NOW);
    w.add(block::STREAM, BlockWriter::new(NOW)).unwrap();
    assert!(matches!(
        w.add(block::STREAM, BlockWriter::new(NOW)),
        Err(SnapshotError::Malformed { .. })
    ));
}

#[test]
fn another_layer_appends_a_section_to_a_path_block() {
    let t = Transport::new(&TransportConfig::default(), NOW);
    let mut w = SnapshotWriter::new(1, 0, NOW);
    t.export(&mut w).unwrap();
    w.append(block::PATH, 0, |b| {
        b.section(path_section::ADDRESSING, |b| b.u64(0xf10d))
    })
    .unwrap();
    assert!(
        w.append(block::PATH, 1, |_| {}).is_err(),
        "only one PATH block"
    );
    assert!(w.append(block::SAL, 0, |_| {}).is_err(), "no SAL block");
    let s = w.finish().unwrap();
    let r = SnapshotReader::parse(&s).unwrap();
    let mut path = r.block(block::PATH, NOW).unwrap();
    assert_eq!(path.u32().unwrap(), 0, "path ID");
    let kinds: Vec<u8> = core::iter::from_fn(|| path.section().unwrap().map(|(k, _)| k)).collect();
    assert_eq!(kinds, [path_section::TRANSPORT, path_section::ADDRESSING]);
    // The transport skips the section it does not know.
    let t2 = Transport::import(&r, NOW, &TransportConfig::default()).unwrap();
    assert_eq!(t2.stats(), t.stats());
}

#[test]
fn a_transport_refuses_a_snapshot_without_its_blocks() {
    let s = sample();
    let r = SnapshotReader::parse(&s).unwrap();
    assert!(matches!(
        Transport::import(&r, NOW, &TransportConfig::default()),
        Err(SnapshotError::Malformed { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random bytes, with or without a valid header and CRC, never make the reader or the
    /// transport's import panic.
    #[test]
    fn random_bytes_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..600),
        framed in any::<bool>(),
    ) {
        let bytes = if framed {
            let mut v = assemble(0, &[]);
            v.truncate(v.len() - 4);
            v.extend_from_slice(&body);
            reseal(&mut v, 4);
            v
        } else {
            body
        };
        if let Ok(r) = SnapshotReader::parse(&bytes) {
            for ty in r.block_types().collect::<Vec<_>>() {
                let mut b = r.block(ty, NOW).unwrap();
                while b.u64().is_ok() {}
            }
            let _ = Transport::import(&r, NOW, &TransportConfig::default());
        }
    }

    /// Random blocks of the transport's types, framed correctly, never make import panic.
    #[test]
    fn random_transport_blocks_never_panic(
        stream in proptest::collection::vec(any::<u8>(), 0..300),
        transport in proptest::collection::vec(any::<u8>(), 0..120),
        path in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let s = assemble(
            0,
            &[(block::STREAM, &stream), (block::TRANSPORT, &transport), (block::PATH, &path)],
        );
        let r = SnapshotReader::parse(&s).unwrap();
        prop_assert!(Transport::import(&r, NOW, &TransportConfig::default()).is_err());
    }
}
