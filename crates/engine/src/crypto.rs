//! Per-flow keys and the AUTH tag on control packets.
//!
//! Both ends pick a random 16-byte nonce and exchange them in the SYN and SYN-ACK (NONCE
//! extension). From the two nonces, the two flowIDs and the serviceID, each end derives one key
//! per direction with HKDF-SHA256 (RFC 5869):
//!
//! ```text
//! prk      = HKDF-Extract(salt = "serval-flow-v1", ikm = client nonce || server nonce)
//! key(dir) = HKDF-Expand(prk, info = dir || client flowID || server flowID || serviceID, 32)
//!            dir = "c2s" for packets the client sends, "s2c" for the server's
//! ```
//!
//! Every control packet after the SYN (SYN-ACK, ACK of the handshake, RSYN, RSYN-ACK, FIN, RST)
//! carries an AUTH extension whose tag is the first 16 bytes of HMAC-SHA256(key(dir), packet with
//! the tag zeroed) — the bytes [`SalPacket::auth_input`] yields. Tags are compared in constant
//! time.
//!
//! What this protects against, as in the original Serval: an *off-path* host, which never saw
//! the nonces, cannot migrate, close or reset a flow. The nonces travel in the clear, so an
//! on-path observer can derive the keys; confidentiality and on-path integrity are a later layer.
//! Separate keys per direction stop a control packet from being reflected back to its sender.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serval_wire::ext::AUTH_TAG_LEN;
use serval_wire::{FlowId, Nonce, SalPacket, ServiceId};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const SALT: &[u8] = b"serval-flow-v1";

/// Which end of a flow sent a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the end that sent the SYN.
    ClientToServer,
    /// From the end that answered it.
    ServerToClient,
}

/// The two directional keys of one flow. Plain bytes, so they can move with exported state.
#[derive(Clone, PartialEq, Eq)]
pub struct FlowKeys {
    c2s: [u8; 32],
    s2c: [u8; 32],
}

impl core::fmt::Debug for FlowKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FlowKeys(..)")
    }
}

impl FlowKeys {
    /// Derives the keys of a flow from what both ends exchanged in the handshake.
    pub fn derive(
        client_nonce: &Nonce,
        server_nonce: &Nonce,
        client_flow: FlowId,
        server_flow: FlowId,
        service: &ServiceId,
    ) -> FlowKeys {
        let mut ikm = [0u8; 32];
        ikm[..16].copy_from_slice(&client_nonce.0);
        ikm[16..].copy_from_slice(&server_nonce.0);
        let hk = Hkdf::<Sha256>::new(Some(SALT), &ikm);
        let expand = |dir: &[u8]| {
            let mut info = Vec::with_capacity(3 + 16 + 32);
            info.extend_from_slice(dir);
            info.extend_from_slice(&client_flow.0.to_be_bytes());
            info.extend_from_slice(&server_flow.0.to_be_bytes());
            info.extend_from_slice(service.as_bytes());
            let mut okm = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
            if hk.expand(&info, &mut okm).is_err() {
                unreachable!("HKDF-SHA256 output of 32 bytes is always valid");
            }
            okm
        };
        FlowKeys {
            c2s: expand(b"c2s"),
            s2c: expand(b"s2c"),
        }
    }

    fn key(&self, dir: Direction) -> &[u8; 32] {
        match dir {
            Direction::ClientToServer => &self.c2s,
            Direction::ServerToClient => &self.s2c,
        }
    }

    fn mac(&self, dir: Direction, pieces: [&[u8]; 3]) -> HmacSha256 {
        let mut mac = match HmacSha256::new_from_slice(self.key(dir)) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        for p in pieces {
            mac.update(p);
        }
        mac
    }

    /// Fills in the AUTH tag of `packet`, sent in direction `dir`. Returns `false` (and changes
    /// nothing) if the packet has no AUTH extension.
    pub fn seal<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        dir: Direction,
        packet: &mut SalPacket<T>,
    ) -> bool {
        let Some(pieces) = packet.auth_input() else {
            return false;
        };
        let tag = self.mac(dir, pieces).finalize().into_bytes();
        match packet.auth_tag_mut() {
            Some(slot) => {
                slot.copy_from_slice(&tag[..AUTH_TAG_LEN]);
                true
            }
            None => false,
        }
    }

    /// Whether `packet`, received from direction `dir`, carries a valid AUTH tag. A packet
    /// without AUTH is not authentic.
    pub fn verify<T: AsRef<[u8]>>(&self, dir: Direction, packet: &SalPacket<T>) -> bool {
        let (Some(pieces), Some(tag)) = (packet.auth_input(), packet.auth_tag()) else {
            return false;
        };
        self.mac(dir, pieces).verify_truncated_left(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_wire::ext::{ControlFlags, ControlRepr};
    use serval_wire::{Protocol, SalRepr};

    fn keys() -> FlowKeys {
        FlowKeys::derive(
            &Nonce([1; 16]),
            &Nonce([2; 16]),
            FlowId(10),
            FlowId(20),
            &ServiceId([3; 32]),
        )
    }

    fn rsyn() -> Vec<u8> {
        let mut repr = SalRepr::new(Protocol::NONE, FlowId(10), FlowId(20));
        repr.control = Some(ControlRepr {
            flags: ControlFlags::RSYN,
            verno: 7,
            ackno: 0,
        });
        repr.auth = Some([0; AUTH_TAG_LEN]);
        repr.to_bytes(b"payload").unwrap()
    }

    #[test]
    fn sealed_packets_verify_and_tampering_fails() {
        let k = keys();
        let mut bytes = rsyn();
        let mut p = SalPacket::new_checked(&mut bytes[..]).unwrap();
        assert!(k.seal(Direction::ClientToServer, &mut p));
        let p = SalPacket::new_checked(&bytes[..]).unwrap();
        assert!(k.verify(Direction::ClientToServer, &p));
        // The other direction's key does not verify it (no reflection).
        assert!(!k.verify(Direction::ServerToClient, &p));
        // Flipping any bit, header or payload, breaks it.
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            if let Ok(p) = SalPacket::new_checked(&t[..]) {
                assert!(!k.verify(Direction::ClientToServer, &p), "byte {i}");
            }
        }
    }

    #[test]
    fn keys_depend_on_every_input() {
        let base = keys();
        let variants = [
            FlowKeys::derive(
                &Nonce([9; 16]),
                &Nonce([2; 16]),
                FlowId(10),
                FlowId(20),
                &ServiceId([3; 32]),
            ),
            FlowKeys::derive(
                &Nonce([1; 16]),
                &Nonce([9; 16]),
                FlowId(10),
                FlowId(20),
                &ServiceId([3; 32]),
            ),
            FlowKeys::derive(
                &Nonce([1; 16]),
                &Nonce([2; 16]),
                FlowId(11),
                FlowId(20),
                &ServiceId([3; 32]),
            ),
            FlowKeys::derive(
                &Nonce([1; 16]),
                &Nonce([2; 16]),
                FlowId(10),
                FlowId(21),
                &ServiceId([3; 32]),
            ),
            FlowKeys::derive(
                &Nonce([1; 16]),
                &Nonce([2; 16]),
                FlowId(10),
                FlowId(20),
                &ServiceId([4; 32]),
            ),
        ];
        for v in variants {
            assert_ne!(v.c2s, base.c2s);
            assert_ne!(v.s2c, base.s2c);
        }
        assert_ne!(base.c2s, base.s2c);
    }

    #[test]
    fn packet_without_auth_is_not_authentic() {
        let bytes = SalRepr::new(Protocol::NONE, FlowId(10), FlowId(20))
            .to_bytes(&[])
            .unwrap();
        let p = SalPacket::new_checked(&bytes[..]).unwrap();
        assert!(!keys().verify(Direction::ClientToServer, &p));
    }
}
