//! Keys for Serval: Ed25519 private-key files and public-key lines, signed registrations,
//! the router's return-routability cookies, and self-certifying serviceIDs.
//!
//! Everything here is deterministic and does no I/O: generating a key takes the caller's
//! random source ([`ring::rand::SecureRandom`]; the CLI passes `SystemRandom`), key files are
//! read and written by the caller as text, and signing is Ed25519 (RFC 8032, deterministic).
//! The formats are specified in `docs/security.md` ("Keys and signed registrations") and
//! `docs/wire.md` §6 and §11.
//!
//! * A **private key file** is `-----BEGIN SERVAL PRIVATE KEY-----`, the base64 (standard
//!   alphabet, padded, lines of at most 64 characters) of ring's Ed25519 PKCS#8 v2 document,
//!   and `-----END SERVAL PRIVATE KEY-----` ([`PrivateKey::to_pem`], [`PrivateKey::from_pem`]).
//! * A **public key line** is `ed25519:` and the unpadded base64url of the 32-byte key, 43
//!   characters ([`PublicKey::to_line`], [`PublicKey::parse_line`]).
//!
//! ```
//! use ring::rand::SystemRandom;
//! use serval_keys::{PrivateKey, PublicKey, sign_registration, verify_registration};
//! use serval_wire::{RegistrationRepr, ServiceId, ServicePrefix};
//!
//! let key = PrivateKey::generate(&SystemRandom::new())?;
//! let line = key.public_key().to_line();
//! assert_eq!(PublicKey::parse_line(&line)?, key.public_key());
//! let again = PrivateKey::from_pem(&key.to_pem())?;
//! assert_eq!(again.public_key(), key.public_key());
//!
//! let prefix = ServicePrefix::exact(ServiceId::from_name("web.example.com")?);
//! let request = sign_registration(&key, &RegistrationRepr::register(1, 2, prefix, 1, 0, 3000));
//! assert!(verify_registration(&key.public_key(), &request).is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cookie;

/// The operating system's random source, for callers with no other (key generation in the
/// CLI, a router's cookie secrets).
pub use ring::rand::SystemRandom;

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serval_wire::registration::{SIGNATURE_LEN, Signature};
use serval_wire::{RegistrationRepr, ServiceId};
use sha2::{Digest, Sha256};

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// What a public key line starts with.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";
/// The first line of a private key file.
pub const PEM_BEGIN: &str = "-----BEGIN SERVAL PRIVATE KEY-----";
/// The last line of a private key file.
pub const PEM_END: &str = "-----END SERVAL PRIVATE KEY-----";
/// What a registration signature signs before the message's bytes (domain separation: a
/// signature made for a registration can never pass for anything else signed by the key).
pub const REGISTRATION_CONTEXT: &[u8] = b"serval registration v1\0";
/// What the self-certifying part of a serviceID hashes before the public key.
pub const SELF_CERT_CONTEXT: &[u8] = b"serval-self-cert";
/// Bits of a self-certifying serviceID taken from the name's ID (the rest commit to the key).
pub const SELF_CERT_NAME_BITS: u16 = 128;

/// Why a key, a key file or a signature was refused. Each is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A public key line does not start with `ed25519:`.
    #[error(
        "a public key is `ed25519:` followed by 43 base64url characters (as `serval keygen` prints it), not {0:?}"
    )]
    NotPublicKeyLine(String),
    /// The text after `ed25519:` is not unpadded base64url of 32 bytes.
    #[error("public key {0:?} is not 43 base64url characters of a 32-byte key")]
    BadPublicKey(String),
    /// A private key file lacks its BEGIN or END line.
    #[error("not a Serval private key file (expected `{PEM_BEGIN}` … `{PEM_END}`)")]
    NotPem,
    /// The base64 between the BEGIN and END lines does not decode.
    #[error("private key file: the base64 between its BEGIN and END lines is damaged")]
    BadBase64,
    /// The decoded document is not an Ed25519 PKCS#8 v2 key ring accepts.
    #[error("private key file: not an Ed25519 PKCS#8 v2 key ({0})")]
    BadPrivateKey(String),
    /// The random source failed while generating a key.
    #[error("cannot generate a key: the system's random source failed")]
    Random,
    /// A registration that must be signed carries no signature.
    #[error("registration is not signed")]
    Unsigned,
    /// The signature does not verify with the key.
    #[error("registration signature does not verify with the key")]
    BadSignature,
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// The public key line: `ed25519:` and 43 base64url characters (no padding).
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }

    /// Reads a public key line (surrounding white space is ignored).
    pub fn parse_line(text: &str) -> Result<PublicKey, KeyError> {
        let text = text.trim();
        let Some(b64) = text.strip_prefix(PUBLIC_KEY_PREFIX) else {
            return Err(KeyError::NotPublicKeyLine(shorten(text)));
        };
        let bad = || KeyError::BadPublicKey(shorten(text));
        // Decoding checks the alphabet and that no bits past the 32 bytes are set (canonical).
        if b64.len() != 43 {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(b64).map_err(|_| bad())?;
        let key: [u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| bad())?;
        Ok(PublicKey(key))
    }

    /// Verifies an Ed25519 `signature` of `message` (with no context added).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| KeyError::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_line())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_line())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        PublicKey::parse_line(s)
    }
}

/// At most 60 characters of untrusted text, for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// An Ed25519 private key (with its public key). Cheap to clone; `Debug` shows only the
/// public key; equal when the public keys are.
#[derive(Clone)]
pub struct PrivateKey {
    pair: Arc<Ed25519KeyPair>,
    pkcs8: Arc<Vec<u8>>,
}

impl PrivateKey {
    /// A new key from `rng`.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<PrivateKey, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| KeyError::Random)?;
        PrivateKey::from_pkcs8(doc.as_ref())
    }

    /// The key in an Ed25519 PKCS#8 v2 document (the one ring generates, with the public key).
    pub fn from_pkcs8(der: &[u8]) -> Result<PrivateKey, KeyError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(der).map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        Ok(PrivateKey {
            pair: Arc::new(pair),
            pkcs8: Arc::new(der.to_vec()),
        })
    }

    /// Reads a private key file's text.
    pub fn from_pem(text: &str) -> Result<PrivateKey, KeyError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(PEM_BEGIN) {
            return Err(KeyError::NotPem);
        }
        let mut b64 = String::new();
        let mut ended = false;
        for line in lines.by_ref() {
            if line == PEM_END {
                ended = true;
                break;
            }
            b64.push_str(line);
        }
        if !ended || lines.next().is_some() {
            return Err(KeyError::NotPem);
        }
        let der = STANDARD.decode(b64).map_err(|_| KeyError::BadBase64)?;
        PrivateKey::from_pkcs8(&der)
    }

    /// The private key file's text (ends with a newline).
    pub fn to_pem(&self) -> String {
        let b64 = STANDARD.encode(self.pkcs8.as_slice());
        let mut out = String::with_capacity(b64.len() + 100);
        out.push_str(PEM_BEGIN);
        out.push('\n');
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(PEM_END);
        out.push('\n');
        out
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        let mut k = [0u8; PUBLIC_KEY_LEN];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    /// The Ed25519 signature of `message` (with no context added).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key().to_line())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.public_key() == other.public_key()
    }
}

impl Eq for PrivateKey {}

/// Reads a file that names a public key: a public key line, or a private key file (whose
/// public key is derived). What `serval id --key` accepts.
pub fn public_key_from_text(text: &str) -> Result<PublicKey, KeyError> {
    if text.trim_start().starts_with("-----BEGIN") {
        PrivateKey::from_pem(text).map(|k| k.public_key())
    } else {
        PublicKey::parse_line(text)
    }
}

/// What a registration signature signs: [`REGISTRATION_CONTEXT`] then the payload's first 76
/// bytes ([`RegistrationRepr::signed_bytes`]: the fixed part and the Cookie field).
pub fn registration_message(request: &RegistrationRepr) -> Vec<u8> {
    let mut m = Vec::with_capacity(REGISTRATION_CONTEXT.len() + 76);
    m.extend_from_slice(REGISTRATION_CONTEXT);
    m.extend_from_slice(&request.signed_bytes());
    m
}

/// `request` signed by `key` (the 140-byte form; a missing Cookie field becomes an empty
/// one, as on the wire).
pub fn sign_registration(key: &PrivateKey, request: &RegistrationRepr) -> RegistrationRepr {
    let mut signed = RegistrationRepr {
        cookie: Some(request.cookie.unwrap_or_default()),
        signature: None,
        ..*request
    };
    signed.signature = Some(Signature(key.sign(&registration_message(&signed))));
    signed
}

/// Checks that `request` is signed by `key`.
pub fn verify_registration(key: &PublicKey, request: &RegistrationRepr) -> Result<(), KeyError> {
    let sig = request.signature.ok_or(KeyError::Unsigned)?;
    key.verify(&registration_message(request), &sig.0)
}

/// The self-certifying serviceID of the name whose ID is `name` and the key `key`: the first
/// [`SELF_CERT_NAME_BITS`] (128) bits of `name`, then the first 16 bytes of
/// SHA-256([`SELF_CERT_CONTEXT`] ‖ the key's 32 bytes). So it falls under the name's domain
/// prefixes (for names of up to five labels) and under the name's `/128` prefix, and a client
/// connecting by it can check the server's key against it with no CA (`docs/wire.md` §6).
pub fn self_certifying_id(name: &ServiceId, key: &PublicKey) -> ServiceId {
    let mut h = Sha256::new();
    h.update(SELF_CERT_CONTEXT);
    h.update(key.0);
    let digest = h.finalize();
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&name.as_bytes()[..16]);
    id[16..].copy_from_slice(&digest[..16]);
    ServiceId(id)
}

/// Whether `id` is the self-certifying serviceID of `key` (whatever name its first half comes
/// from).
pub fn commits_to(id: &ServiceId, key: &PublicKey) -> bool {
    self_certifying_id(id, key) == *id
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn self_cert_fixture() {
        // The all-zero key under web.example.com: the first 128 bits are the name's.
        let name = ServiceId::from_name("web.example.com").unwrap();
        let id = self_certifying_id(&name, &PublicKey([0; 32]));
        assert_eq!(
            id.to_string()[..32],
            "cf47db499cdbb2c24ecc10b325e6b795".to_owned()
        );
        let mut h = Sha256::new();
        h.update(b"serval-self-cert");
        h.update([0u8; 32]);
        assert_eq!(&id.as_bytes()[16..], &h.finalize()[..16]);
        assert!(commits_to(&id, &PublicKey([0; 32])));
        assert!(!commits_to(&id, &PublicKey([1; 32])));
        // Under the domain prefix and the name's /128.
        let domain = serval_wire::ServicePrefix::from_domain("example.com").unwrap();
        assert!(domain.contains(&id));
        assert!(serval_wire::ServicePrefix::new(name, 128).contains(&id));
    }
}
