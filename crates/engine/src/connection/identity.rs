//! Who the server is: the optional proof a server gives in its SYN-ACK, and the client's check.
//!
//! Without it, a flow is encrypted against passive observers only (as tcpcrypt): whoever
//! answers the SYN — the real instance, or an active attacker on the SYN's path — gets a
//! private channel with the client. With it, the client knows it talks to the holder of a key:
//!
//! * A client that wants the proof sets the IDENTITY flag of its KEYSHARE and pads its SYN with
//!   as many bytes as the proof takes, so the SYN-ACK is never larger than the SYN.
//! * A server with a key (`EndpointConfig::identity`, the instance's `--key`) answers such a SYN
//!   with IDENTITY: its Ed25519 public key and its signature over
//!   `"serval2 server identity" || th`, th being the handshake's transcript hash (both key
//!   shares, nonces, flowIDs and the serviceID), so the proof cannot be replayed into another
//!   handshake.
//! * The client checks the signature and then that the key is the one it expects
//!   ([`PeerIdentity`]): a pinned key, or the key the serviceID itself commits to (a
//!   self-certifying serviceID, `serval id --key`), or a key an X.509 certificate chain
//!   certifies for the service's name, issued by a CA the client trusts (`--ca`; [`x509`]).
//!   Any failure fails the connect with [`IdentityError`], and the half-open flow at the
//!   server is reset.
//! * A client that wants a certificate chain also sets the CERTIFICATE flag and pads its SYN
//!   to [`CERT_SYN_LEN`] bytes; a server with a chain ([`CertificateChain`]) sends it as the
//!   SYN-ACK's sealed payload (so a passive observer does not see which name it proves).

pub mod x509;

use std::time::Duration;

use serval_keys::{PrivateKey, PublicKey};
use serval_wire::ext::{CONTROL_LEN, IDENTITY_LEN, KEYSHARE_LEN, NONCE_EXT_LEN};
use serval_wire::header::BASE_HEADER_LEN;
use serval_wire::{IdentityRepr, ServiceId};

use super::protect::TAG_LEN;
use crate::frame::PN_LEN;

pub use self::x509::{
    CERT_SYN_LEN, CertError, CertProblem, CertificateChain, MAX_CHAIN_BLOCK, MAX_CHAIN_CERTS,
    RevocationLists, ServerName, TrustAnchors,
};

/// What a signature of the server's covers, before the transcript hash.
const CONTEXT: &[u8] = b"serval2 server identity";

/// The length of a SYN-ACK that carries IDENTITY: a SYN asking for it must be at least as long
/// (the client pads it), so the answer never amplifies.
pub const SYN_ACK_WITH_IDENTITY: usize =
    BASE_HEADER_LEN + CONTROL_LEN + NONCE_EXT_LEN + KEYSHARE_LEN + IDENTITY_LEN + PN_LEN + TAG_LEN;

/// The server identity a client requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The server must prove it holds this key (`--peer-key`).
    Key(PublicKey),
    /// The server must prove it holds the key the serviceID commits to (a self-certifying
    /// serviceID: its low 128 bits are a hash of the key; `serval id --key`).
    SelfCertifying,
    /// The server must prove it holds a key that a certificate chain, issued by one of these
    /// CAs, certifies for the name the client connected to (`--ca`). The client must connect
    /// by name ([`Endpoint::connect_name`](crate::endpoint::Endpoint::connect_name)), and its
    /// endpoint must know the wall-clock time
    /// ([`EndpointConfig::unix_time_origin`](crate::endpoint::EndpointConfig::unix_time_origin)).
    Ca(TrustAnchors),
}

impl PeerIdentity {
    /// Whether the server must send its certificate chain.
    pub(crate) fn wants_chain(&self) -> bool {
        matches!(self, PeerIdentity::Ca(_))
    }
}

/// Why a server's identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The SYN-ACK carried no proof (the server has no key, or the SYN reached it too short to
    /// pay for the proof).
    #[error("the server gave no proof of its identity (it has no key, or does not offer it)")]
    NotProven,
    /// The proof's kind is unknown, or its signature does not verify over this handshake.
    #[error("the server's identity proof does not verify")]
    BadSignature,
    /// The server proved a key, but not the pinned one.
    #[error("the server's key is {got}, not the pinned {expected}")]
    WrongKey {
        /// The pinned key.
        expected: PublicKey,
        /// The key the server proved.
        got: PublicKey,
    },
    /// The server proved a key the serviceID does not commit to.
    #[error("the server's key {got} is not the one serviceID {service} commits to")]
    NotCommitted {
        /// The serviceID connected to.
        service: ServiceId,
        /// The key the server proved.
        got: PublicKey,
    },
    /// The server's certificate chain does not certify its key for the name.
    #[error("{0}")]
    Certificate(CertProblem),
}

/// What a client checks a certificate chain with, besides its anchors.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CertCheck<'a> {
    /// The name connected to.
    pub name: Option<&'a ServerName>,
    /// Wall-clock time now, since the UNIX epoch.
    pub unix_now: Option<Duration>,
    /// The SYN-ACK's opened payload: the CERTIFICATES block, or empty.
    pub chain: &'a [u8],
}

fn message(th: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + th.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(th);
    m
}

/// The server's proof for the handshake whose transcript hash is `th`.
pub(crate) fn prove(key: &PrivateKey, th: &[u8; 32]) -> IdentityRepr {
    IdentityRepr {
        kind: IdentityRepr::ED25519,
        key: key.public_key().0,
        signature: key.sign(&message(th)),
    }
}

/// Checks a SYN-ACK's proof (or its absence) against what the client requires.
pub(crate) fn check(
    required: &PeerIdentity,
    service: &ServiceId,
    th: &[u8; 32],
    proof: Option<&IdentityRepr>,
    cert: CertCheck<'_>,
) -> Result<PublicKey, IdentityError> {
    let proof = proof.ok_or(IdentityError::NotProven)?;
    let got = PublicKey(proof.key);
    if proof.kind != IdentityRepr::ED25519 || got.verify(&message(th), &proof.signature).is_err() {
        return Err(IdentityError::BadSignature);
    }
    match required {
        PeerIdentity::Key(expected) if *expected != got => Err(IdentityError::WrongKey {
            expected: *expected,
            got,
        }),
        PeerIdentity::SelfCertifying if !serval_keys::commits_to(service, &got) => {
            Err(IdentityError::NotCommitted {
                service: *service,
                got,
            })
        }
        PeerIdentity::Ca(anchors) => {
            x509::verify(anchors, cert.name, cert.unix_now, cert.chain, &got)
                .map_err(IdentityError::Certificate)?;
            Ok(got)
        }
        _ => Ok(got),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(_: u8) -> PrivateKey {
        PrivateKey::generate(&ring::rand::SystemRandom::new()).expect("key")
    }

    #[test]
    fn proofs_bind_the_key_and_the_handshake() {
        let k = key(1);
        let th = [7u8; 32];
        let name = ServiceId::from_name("web.example.com").expect("name");
        let id = serval_keys::self_certifying_id(&name, &k.public_key());
        let proof = prove(&k, &th);
        let pinned = PeerIdentity::Key(k.public_key());
        assert_eq!(
            check(&pinned, &name, &th, Some(&proof), CertCheck::default()),
            Ok(k.public_key())
        );
        assert_eq!(
            check(
                &PeerIdentity::SelfCertifying,
                &id,
                &th,
                Some(&proof),
                CertCheck::default()
            ),
            Ok(k.public_key())
        );
        // Another handshake: the proof does not carry over.
        assert_eq!(
            check(
                &pinned,
                &name,
                &[8u8; 32],
                Some(&proof),
                CertCheck::default()
            ),
            Err(IdentityError::BadSignature)
        );
        // Another key, validly signed: the pin and the ID both refuse it.
        let other = prove(&key(2), &th);
        assert!(matches!(
            check(&pinned, &name, &th, Some(&other), CertCheck::default()),
            Err(IdentityError::WrongKey { .. })
        ));
        assert!(matches!(
            check(
                &PeerIdentity::SelfCertifying,
                &id,
                &th,
                Some(&other),
                CertCheck::default()
            ),
            Err(IdentityError::NotCommitted { .. })
        ));
        // Our key with the other key's signature, a bit flipped, no proof at all.
        let mut swapped = proof;
        swapped.signature = other.signature;
        assert_eq!(
            check(&pinned, &name, &th, Some(&swapped), CertCheck::default()),
            Err(IdentityError::BadSignature)
        );
        let mut flipped = proof;
        flipped.signature[10] ^= 1;
        assert_eq!(
            check(&pinned, &name, &th, Some(&flipped), CertCheck::default()),
            Err(IdentityError::BadSignature)
        );
        assert_eq!(
            check(&pinned, &name, &th, None, CertCheck::default()),
            Err(IdentityError::NotProven)
        );
    }
}
