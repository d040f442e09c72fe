//! Locators: where a packet goes right now.
//!
//! A Serval-in-Rust endpoint runs over UDP, so a locator is an IP address *and* a UDP port. On the
//! wire a locator is a family byte, the port, then the address:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  family (4|6) |           UDP port            |   address ... |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |       ... 4 (IPv4) or 16 (IPv6) bytes of address, network order |
//! ```
//!
//! 7 bytes for IPv4, 19 for IPv6. IPv6 flow labels and scope IDs are not carried.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::WireError;

/// Family byte of an IPv4 locator.
pub const FAMILY_IPV4: u8 = 4;
/// Family byte of an IPv6 locator.
pub const FAMILY_IPV6: u8 = 6;
/// Encoded size of an IPv4 locator.
pub const LOCATOR_V4_LEN: usize = 7;
/// Encoded size of an IPv6 locator.
pub const LOCATOR_V6_LEN: usize = 19;

/// A network locator: an IPv4 or IPv6 address with a UDP port.
pub type Locator = SocketAddr;

/// Bytes `loc` takes on the wire.
pub const fn locator_len(loc: &Locator) -> usize {
    match loc {
        SocketAddr::V4(_) => LOCATOR_V4_LEN,
        SocketAddr::V6(_) => LOCATOR_V6_LEN,
    }
}

/// Writes `loc` at the start of `buf` and returns the bytes written.
///
/// # Panics
/// If `buf` is shorter than [`locator_len`]`(loc)`; callers size buffers with it first.
pub fn emit_locator(loc: &Locator, buf: &mut [u8]) -> usize {
    buf[1..3].copy_from_slice(&loc.port().to_be_bytes());
    match loc.ip() {
        IpAddr::V4(a) => {
            buf[0] = FAMILY_IPV4;
            buf[3..7].copy_from_slice(&a.octets());
            LOCATOR_V4_LEN
        }
        IpAddr::V6(a) => {
            buf[0] = FAMILY_IPV6;
            buf[3..19].copy_from_slice(&a.octets());
            LOCATOR_V6_LEN
        }
    }
}

/// Reads one locator from the start of `buf`; returns it and the bytes it took.
pub fn parse_locator(buf: &[u8]) -> Result<(Locator, usize), WireError> {
    let family = *buf.first().ok_or(WireError::Truncated)?;
    let need = match family {
        FAMILY_IPV4 => LOCATOR_V4_LEN,
        FAMILY_IPV6 => LOCATOR_V6_LEN,
        other => return Err(WireError::BadFamily(other)),
    };
    let b = buf.get(..need).ok_or(WireError::Truncated)?;
    let port = u16::from_be_bytes([b[1], b[2]]);
    let ip = if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(b[3], b[4], b[5], b[6]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[3..19]);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    Ok((SocketAddr::new(ip, port), need))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_families() {
        for loc in [
            "192.0.2.7:54324".parse::<Locator>().unwrap(),
            "[2001:db8::1]:9".parse().unwrap(),
        ] {
            let mut buf = [0xa5u8; 32];
            let n = emit_locator(&loc, &mut buf);
            assert_eq!(n, locator_len(&loc));
            assert_eq!(parse_locator(&buf[..n]).unwrap(), (loc, n));
            assert_eq!(parse_locator(&buf[..n - 1]), Err(WireError::Truncated));
        }
        assert_eq!(parse_locator(&[5, 0, 0]), Err(WireError::BadFamily(5)));
        assert_eq!(parse_locator(&[]), Err(WireError::Truncated));
    }

    #[test]
    fn ipv4_fixture() {
        let loc: Locator = "10.1.2.3:258".parse().unwrap();
        let mut buf = [0xa5u8; 7];
        emit_locator(&loc, &mut buf);
        assert_eq!(buf, [4, 0x01, 0x02, 10, 1, 2, 3]);
    }
}
