//! The third kind of proof: an X.509 certificate chain for the service's DNS name, checked
//! with webpki against the client's trust anchors (`--ca`).
//!
//! The server's leaf certificate certifies the instance's Ed25519 key — the key that signs its
//! registrations and the IDENTITY signature over the handshake — so the chain binds that key to
//! a name, and the IDENTITY signature binds the key to this handshake. The chain travels as
//! the SYN-ACK's sealed payload, in the CERTIFICATES block of docs/wire.md:
//!
//! ```text
//! +--------+--------+-----------------+---------------------+-----+
//! | kind=1 | count  | len (u16, BE)   | DER (len bytes) ... | ... |  count × (len, DER)
//! +--------+--------+-----------------+---------------------+-----+
//! ```
//!
//! `kind` 1 is an X.509 chain, leaf first; `count` is 1 to [`MAX_CHAIN_CERTS`]; nothing may
//! follow the last certificate. The block is at most [`MAX_CHAIN_BLOCK`] bytes, so that the
//! SYN-ACK carrying it fits in the [`CERT_SYN_LEN`]-byte SYN that asked for it.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, DnsName, TrustAnchor, UnixTime,
};
use serval_keys::PublicKey;
use serval_wire::ServiceId;
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use super::SYN_ACK_WITH_IDENTITY;

/// How long a SYN that asks for a certificate chain is (the client pads it with zeros after
/// its header): the SYN-ACK with the chain may be no larger. 1200 bytes, like QUIC's first
/// packet, crosses any IPv4 or IPv6 path (IPv6's minimum MTU of 1280 leaves 1232 for UDP's
/// payload) with room for the SOURCE locators routers add.
pub const CERT_SYN_LEN: usize = 1200;

/// Longest CERTIFICATES block a server sends: what a [`CERT_SYN_LEN`] SYN pays for beyond the
/// SYN-ACK with IDENTITY. A longer chain is refused when the server is configured
/// ([`CertificateChain::from_der`]).
pub const MAX_CHAIN_BLOCK: usize = CERT_SYN_LEN - SYN_ACK_WITH_IDENTITY;

/// Most certificates in a chain (the leaf and its intermediates; the root is not sent).
pub const MAX_CHAIN_CERTS: usize = 4;

/// The CERTIFICATES kind of an X.509 chain, DER, leaf first.
const KIND_X509: u8 = 1;

/// The DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before its 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The signatures a client accepts from the CAs of a chain and of a revocation list: Ed25519,
/// ECDSA on P-256 and P-384, and RSA (PKCS#1 v1.5 and PSS, 2048 to 8192 bits), as CAs issue
/// them. The leaf's own key is always the instance's Ed25519 key (checked apart); an RSA CA's
/// 256-byte and longer signatures make a chain harder to fit in [`MAX_CHAIN_BLOCK`], which the
/// server checks when it starts.
static ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ED25519,
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// What is wrong with a certificate file or a server name given to the engine (configuration,
/// not a peer's answer: see [`IdentityError`](super::IdentityError) for those).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The PEM text holds no certificate.
    #[error("no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    Empty,
    /// A PEM block or its DER does not parse.
    #[error("certificate {index} does not parse: {reason}")]
    Malformed {
        /// Which certificate, counting from 1.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The chain has more certificates than [`MAX_CHAIN_CERTS`].
    #[error("{count} certificates, more than the {MAX_CHAIN_CERTS} a chain may hold")]
    TooManyCertificates {
        /// How many it has.
        count: usize,
    },
    /// The chain does not fit in the SYN-ACK a [`CERT_SYN_LEN`] SYN pays for.
    #[error(
        "the chain takes {len} bytes on the wire, more than the {MAX_CHAIN_BLOCK} a handshake can \
         carry (use Ed25519 certificates, and leave the root out)"
    )]
    TooLarge {
        /// Its encoded length.
        len: usize,
    },
    /// The leaf certificate does not certify the instance's key.
    #[error("the leaf certificate's key is not the instance's key {key} (--key)")]
    LeafKeyMismatch {
        /// The instance's key.
        key: PublicKey,
    },
    /// The name is not a DNS name a certificate can be checked against.
    #[error("{0:?} is not a DNS name a certificate can be checked against")]
    BadName(String),
    /// The PEM text holds no certificate revocation list.
    #[error("no revocation list in it (expected PEM \"BEGIN X509 CRL\" blocks)")]
    NoRevocationList,
    /// A PEM block or the DER of a revocation list does not parse.
    #[error("revocation list {index} does not parse: {reason}")]
    MalformedRevocationList {
        /// Which list, counting from 1.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// Two lists of the same scope from one CA: which one is current is not said by the files.
    #[error(
        "revocation lists {first} and {second} both come from one CA (for the same scope): keep \
         only its newest"
    )]
    DuplicateRevocationList {
        /// The earlier list, counting from 1.
        first: usize,
        /// The later one.
        second: usize,
    },
}

/// The CAs a client trusts to certify servers' names (`--ca FILE`), and the certificates they
/// have revoked ([`with_revocations`](TrustAnchors::with_revocations), `--crl FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchors {
    anchors: Arc<[TrustAnchor<'static>]>,
    revocations: RevocationLists,
}

/// Certificate revocation lists (X.509 CRLs, RFC 5280 §5) a client checks a server's chain
/// against (`--crl FILE`).
///
/// Every certificate of the chain, the leaf and the intermediates, is checked against the list
/// its issuer signed: a revoked one fails the connect. A list past its nextUpdate fails it too
/// (its issuer's current word is unknown: fetch a fresh one). A certificate whose issuer has
/// no list here is accepted, as without `--crl`. One list per CA (and scope): two would leave
/// open which is current, so they are refused when loaded.
#[derive(Debug, Clone, Default)]
pub struct RevocationLists(Arc<[RevocationList]>);

/// One list: its DER (for equality) and the same, parsed.
#[derive(Debug)]
struct RevocationList {
    der: Vec<u8>,
    parsed: CertRevocationList<'static>,
}

impl PartialEq for RevocationLists {
    fn eq(&self, other: &RevocationLists) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .all(|(a, b)| a.der == b.der)
    }
}

impl Eq for RevocationLists {}

impl RevocationLists {
    /// The lists of the `X509 CRL` blocks of a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<RevocationLists, CertError> {
        let der = pem_blocks::<CertificateRevocationListDer<'_>>(pem, |index, reason| {
            CertError::MalformedRevocationList { index, reason }
        })?;
        RevocationLists::from_der(&der)
    }

    /// DER-encoded lists (at least one, one per CA and scope).
    pub fn from_der(der: &[Vec<u8>]) -> Result<RevocationLists, CertError> {
        if der.is_empty() {
            return Err(CertError::NoRevocationList);
        }
        let mut lists: Vec<RevocationList> = Vec::with_capacity(der.len());
        for (i, d) in der.iter().enumerate() {
            let parsed: CertRevocationList<'static> = OwnedCertRevocationList::from_der(d)
                .map_err(|e| CertError::MalformedRevocationList {
                    index: i + 1,
                    reason: format!("{e:?}"),
                })?
                .into();
            let scope = |l: &CertRevocationList<'_>| {
                (
                    l.issuer().to_vec(),
                    l.issuing_distribution_point().map(<[u8]>::to_vec),
                )
            };
            if let Some(first) = lists
                .iter()
                .position(|l| scope(&l.parsed) == scope(&parsed))
            {
                return Err(CertError::DuplicateRevocationList {
                    first: first + 1,
                    second: i + 1,
                });
            }
            lists.push(RevocationList {
                der: d.clone(),
                parsed,
            });
        }
        Ok(RevocationLists(lists.into()))
    }

    /// How many lists there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TrustAnchors {
    /// The anchors of the `CERTIFICATE` blocks of a PEM file (one or more CA certificates).
    pub fn from_pem(pem: &[u8]) -> Result<TrustAnchors, CertError> {
        TrustAnchors::from_der(&pem_certificates(pem)?)
    }

    /// The anchors of DER-encoded CA certificates.
    pub fn from_der(certs: &[Vec<u8>]) -> Result<TrustAnchors, CertError> {
        if certs.is_empty() {
            return Err(CertError::Empty);
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(i, der)| {
                let der = CertificateDer::from(der.as_slice());
                webpki::anchor_from_trusted_cert(&der)
                    .map(|a| a.to_owned())
                    .map_err(|e| CertError::Malformed {
                        index: i + 1,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustAnchors {
            anchors: anchors.into(),
            revocations: RevocationLists::default(),
        })
    }

    /// These anchors, checking chains against `lists` (instead of any given before).
    pub fn with_revocations(mut self, lists: RevocationLists) -> TrustAnchors {
        self.revocations = lists;
        self
    }

    /// How many anchors there are.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether there are none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// The revocation lists chains are checked against.
    pub fn revocations(&self) -> &RevocationLists {
        &self.revocations
    }
}

/// A server's certificate chain, leaf first, as its SYN-ACK carries it (`--cert FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateChain {
    /// The CERTIFICATES block, encoded once.
    block: Arc<[u8]>,
}

impl CertificateChain {
    /// The chain in a PEM file (leaf first, then intermediates), for the instance whose key is
    /// `key`.
    pub fn from_pem(pem: &[u8], key: &PublicKey) -> Result<CertificateChain, CertError> {
        CertificateChain::from_der(&pem_certificates(pem)?, key)
    }

    /// The chain of DER certificates `certs` (leaf first), for the instance whose key is `key`.
    /// Fails if it is empty, does not parse, holds more than [`MAX_CHAIN_CERTS`], does not fit
    /// in [`MAX_CHAIN_BLOCK`], or if its leaf does not certify `key`.
    pub fn from_der(certs: &[Vec<u8>], key: &PublicKey) -> Result<CertificateChain, CertError> {
        let leaf = certs.first().ok_or(CertError::Empty)?;
        if certs.len() > MAX_CHAIN_CERTS {
            return Err(CertError::TooManyCertificates { count: certs.len() });
        }
        let len = 2 + certs.iter().map(|c| 2 + c.len()).sum::<usize>();
        if len > MAX_CHAIN_BLOCK {
            return Err(CertError::TooLarge { len });
        }
        for (i, der) in certs.iter().enumerate() {
            EndEntityCert::try_from(&CertificateDer::from(der.as_slice())).map_err(|e| {
                CertError::Malformed {
                    index: i + 1,
                    reason: format!("{e:?}"),
                }
            })?;
        }
        let der = CertificateDer::from(leaf.as_slice());
        let leaf = EndEntityCert::try_from(&der).map_err(|e| CertError::Malformed {
            index: 1,
            reason: format!("{e:?}"),
        })?;
        if leaf.subject_public_key_info().as_ref() != ed25519_spki(key) {
            return Err(CertError::LeafKeyMismatch { key: *key });
        }
        let mut block = Vec::with_capacity(len);
        block.push(KIND_X509);
        // At most MAX_CHAIN_CERTS, and each shorter than MAX_CHAIN_BLOCK: checked above.
        block.push(certs.len() as u8);
        for c in certs {
            block.extend_from_slice(&(c.len() as u16).to_be_bytes());
            block.extend_from_slice(c);
        }
        Ok(CertificateChain {
            block: block.into(),
        })
    }

    /// The CERTIFICATES block.
    pub(crate) fn block(&self) -> &[u8] {
        &self.block
    }
}

/// A service's name as the client typed it, kept for the certificate check (the serviceID is a
/// hash of it, which no certificate names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName {
    name: DnsName<'static>,
    service: ServiceId,
}

impl ServerName {
    /// `name`, which must be both a service name and a DNS name.
    pub fn new(name: &str) -> Result<ServerName, CertError> {
        let bad = || CertError::BadName(name.to_owned());
        let service = ServiceId::from_name(name).map_err(|_| bad())?;
        let name = DnsName::try_from(name.to_owned()).map_err(|_| bad())?;
        Ok(ServerName { name, service })
    }

    /// The serviceID of the name.
    pub fn service(&self) -> ServiceId {
        self.service
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.name.as_ref()
    }
}

/// Why a server's certificate chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertProblem {
    /// The SYN-ACK carried no chain (the server has no `--cert`).
    #[error("the server sent no certificate chain (it has no --cert)")]
    Missing,
    /// The CERTIFICATES block or a certificate in it does not parse.
    #[error("the server's certificate chain is malformed")]
    Malformed,
    /// The chain does not lead to any of the client's anchors.
    #[error("the server's certificate is not issued by a trusted CA (--ca)")]
    UntrustedIssuer,
    /// A certificate of the chain has expired.
    #[error("the server's certificate chain expired at UNIX time {not_after} (now {now})")]
    Expired {
        /// The certificate's notAfter, UNIX seconds.
        not_after: u64,
        /// The time checked at, UNIX seconds.
        now: u64,
    },
    /// A certificate of the chain is not valid yet.
    #[error(
        "the server's certificate chain is not valid before UNIX time {not_before} (now {now})"
    )]
    NotYetValid {
        /// The certificate's notBefore, UNIX seconds.
        not_before: u64,
        /// The time checked at, UNIX seconds.
        now: u64,
    },
    /// The leaf does not name the service.
    #[error("the server's certificate is not valid for the name {0}")]
    WrongName(String),
    /// The leaf's extended key usage excludes server authentication.
    #[error("the server's certificate is not for server authentication")]
    NotServerAuth,
    /// A certificate of the chain is on its issuer's revocation list (`--crl`).
    #[error("the server's certificate chain holds a revoked certificate (--crl)")]
    Revoked,
    /// The revocation list of a certificate's issuer is past its nextUpdate.
    #[error(
        "the revocation list (--crl) for the server's chain expired at UNIX time {next_update} \
         (now {now}): fetch a fresh one"
    )]
    RevocationListExpired {
        /// The list's nextUpdate, UNIX seconds.
        next_update: u64,
        /// The time checked at, UNIX seconds.
        now: u64,
    },
    /// The leaf certifies another key than the one that signed the handshake.
    #[error("the server's certificate is for another key than the {0} that signed the handshake")]
    LeafKeyMismatch(PublicKey),
    /// The client connected by serviceID, so there is no name to check.
    #[error("a certificate check needs the service's DNS name: connect by name, not by serviceID")]
    NoName,
    /// The client has no wall-clock time to check validity against.
    #[error("no wall-clock time to check the server's certificate against")]
    NoClock,
    /// Any other refusal of webpki's.
    #[error("the server's certificate chain is refused: {0}")]
    Other(String),
}

/// Checks `block`, a SYN-ACK's CERTIFICATES, for `name` against `anchors` at `unix_now`, and
/// that its leaf certifies `signer`, the key whose signature over the handshake already
/// verified.
pub(crate) fn verify(
    anchors: &TrustAnchors,
    name: Option<&ServerName>,
    unix_now: Option<Duration>,
    block: &[u8],
    signer: &PublicKey,
) -> Result<(), CertProblem> {
    let name = name.ok_or(CertProblem::NoName)?;
    let now = unix_now.ok_or(CertProblem::NoClock)?;
    if block.is_empty() {
        return Err(CertProblem::Missing);
    }
    let certs = parse_block(block).ok_or(CertProblem::Malformed)?;
    let (leaf, intermediates) = certs.split_first().ok_or(CertProblem::Malformed)?;
    let leaf = EndEntityCert::try_from(leaf).map_err(|_| CertProblem::Malformed)?;
    let lists: Vec<&CertRevocationList<'static>> =
        anchors.revocations.0.iter().map(|l| &l.parsed).collect();
    let revocation = RevocationOptionsBuilder::new(&lists).ok().map(|b| {
        b.with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Enforce)
            .build()
    });
    leaf.verify_for_usage(
        ALGORITHMS,
        &anchors.anchors,
        intermediates,
        UnixTime::since_unix_epoch(now),
        KeyUsage::server_auth(),
        revocation,
        None,
    )
    .map_err(|e| problem(e, now))?;
    let dns = rustls_pki_types::ServerName::DnsName(name.name.clone());
    leaf.verify_is_valid_for_subject_name(&dns)
        .map_err(|_| CertProblem::WrongName(name.as_str().to_owned()))?;
    if leaf.subject_public_key_info().as_ref() != ed25519_spki(signer) {
        return Err(CertProblem::LeafKeyMismatch(*signer));
    }
    Ok(())
}

/// The certificates of a CERTIFICATES block; `None` unless it is exactly one well-formed block.
fn parse_block(block: &[u8]) -> Option<Vec<CertificateDer<'_>>> {
    let (&kind, rest) = block.split_first()?;
    let (&count, mut rest) = rest.split_first()?;
    if kind != KIND_X509 || count == 0 || usize::from(count) > MAX_CHAIN_CERTS {
        return None;
    }
    let mut certs = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        if len == 0 || tail.len() < len {
            return None;
        }
        let (der, tail) = tail.split_at(len);
        certs.push(CertificateDer::from(der));
        rest = tail;
    }
    rest.is_empty().then_some(certs)
}

fn problem(e: webpki::Error, now: Duration) -> CertProblem {
    let now = now.as_secs();
    match e {
        // A CA of the same name but another key: the chain reaches no anchor either.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            CertProblem::UntrustedIssuer
        }
        webpki::Error::CertExpired { not_after, .. } => CertProblem::Expired {
            not_after: not_after.as_secs(),
            now,
        },
        webpki::Error::CertNotValidYet { not_before, .. } => CertProblem::NotYetValid {
            not_before: not_before.as_secs(),
            now,
        },
        webpki::Error::RequiredEkuNotFoundContext(_) => CertProblem::NotServerAuth,
        webpki::Error::CertRevoked => CertProblem::Revoked,
        webpki::Error::InvalidCrlSignatureForPublicKey => {
            CertProblem::Other("a revocation list (--crl) is not signed by its CA's key".into())
        }
        webpki::Error::CrlExpired { next_update, .. } => CertProblem::RevocationListExpired {
            next_update: next_update.as_secs(),
            now,
        },
        webpki::Error::BadDer | webpki::Error::BadDerTime => CertProblem::Malformed,
        other => CertProblem::Other(format!("{other:?}")),
    }
}

fn ed25519_spki(key: &PublicKey) -> [u8; 44] {
    let mut spki = [0u8; 44];
    spki[..12].copy_from_slice(&ED25519_SPKI_PREFIX);
    spki[12..].copy_from_slice(&key.0);
    spki
}

/// The DER of every `CERTIFICATE` block of `pem`, in order.
fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let certs = pem_blocks::<CertificateDer<'_>>(pem, |index, reason| CertError::Malformed {
        index,
        reason,
    })?;
    if certs.is_empty() {
        return Err(CertError::Empty);
    }
    Ok(certs)
}

/// The DER of every PEM block of kind `T` in `pem`, in order; `malformed` names a block that
/// does not parse (counting from 1) and why.
fn pem_blocks<T: PemObject + AsRef<[u8]>>(
    pem: &[u8],
    malformed: impl Fn(usize, String) -> CertError,
) -> Result<Vec<Vec<u8>>, CertError> {
    T::pem_slice_iter(pem)
        .enumerate()
        .map(|(i, c)| {
            c.map(|c| c.as_ref().to_vec())
                .map_err(|e| malformed(i + 1, e.to_string()))
        })
        .collect()
}

/// Certificates and revocation lists for tests, made with rcgen (Ed25519 unless a test asks
/// for another CA key).
#[cfg(test)]
pub(crate) mod testca {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ED25519,
        RevokedCertParams, SerialNumber, SignatureAlgorithm,
    };
    use serval_keys::PrivateKey;

    /// A CA: its certificate and key.
    pub(crate) struct Ca {
        pub cert: rcgen::Certificate,
        pub key: KeyPair,
    }

    impl Ca {
        /// A new self-signed root.
        pub(crate) fn root(name: &str) -> Ca {
            Ca::root_with(name, &PKCS_ED25519)
        }

        /// A new self-signed root whose key is of `alg`.
        pub(crate) fn root_with(name: &str, alg: &'static SignatureAlgorithm) -> Ca {
            let key = KeyPair::generate_for(alg).expect("key");
            let cert = ca_params(name, 1).self_signed(&key).expect("root");
            Ca { cert, key }
        }

        /// A new intermediate CA under this one.
        pub(crate) fn intermediate(&self, name: &str) -> Ca {
            self.intermediate_with(name, &PKCS_ED25519, 2)
        }

        /// A new intermediate CA under this one, its key of `alg`, with serial `serial`.
        pub(crate) fn intermediate_with(
            &self,
            name: &str,
            alg: &'static SignatureAlgorithm,
            serial: u64,
        ) -> Ca {
            let key = KeyPair::generate_for(alg).expect("key");
            let cert = ca_params(name, serial)
                .signed_by(&key, &self.cert, &self.key)
                .expect("intermediate");
            Ca { cert, key }
        }

        /// This CA's revocation list of the serial numbers `revoked`, valid from `this_update`
        /// to `next_update` (years, January 1st), PEM.
        pub(crate) fn crl(&self, revoked: &[u64], this_update: i32, next_update: i32) -> String {
            let revoked_certs = revoked
                .iter()
                .map(|&n| RevokedCertParams {
                    serial_number: SerialNumber::from(n),
                    revocation_time: rcgen::date_time_ymd(this_update, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect();
            CertificateRevocationListParams {
                this_update: rcgen::date_time_ymd(this_update, 1, 1),
                next_update: rcgen::date_time_ymd(next_update, 1, 1),
                crl_number: SerialNumber::from(1),
                issuing_distribution_point: None,
                revoked_certs,
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&self.cert, &self.key)
            .expect("CRL")
            .pem()
            .expect("PEM")
        }

        /// This CA's certificate, DER.
        pub(crate) fn der(&self) -> Vec<u8> {
            self.cert.der().to_vec()
        }

        /// A leaf for `names`, certifying `instance`'s key, shaped by `tweak`.
        pub(crate) fn leaf_with(
            &self,
            instance: &PrivateKey,
            names: &[&str],
            tweak: impl FnOnce(&mut CertificateParams),
        ) -> Vec<u8> {
            self.leaf_cert(instance, names, tweak).der().to_vec()
        }

        /// [`leaf_with`](Self::leaf_with), as rcgen's certificate.
        pub(crate) fn leaf_cert(
            &self,
            instance: &PrivateKey,
            names: &[&str],
            tweak: impl FnOnce(&mut CertificateParams),
        ) -> rcgen::Certificate {
            let key = rcgen_key(instance);
            let mut p =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .expect("names");
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            tweak(&mut p);
            p.signed_by(&key, &self.cert, &self.key).expect("leaf")
        }

        /// A server-auth leaf for `names`, certifying `instance`'s key.
        pub(crate) fn leaf(&self, instance: &PrivateKey, names: &[&str]) -> Vec<u8> {
            self.leaf_with(instance, names, |_| {})
        }
    }

    fn ca_params(name: &str, serial: u64) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(SerialNumber::from(serial));
        p
    }

    /// The instance key as rcgen's key pair (the same PKCS#8 document).
    pub(crate) fn rcgen_key(key: &PrivateKey) -> KeyPair {
        KeyPair::from_pem(&key.to_pem()).expect("PKCS#8")
    }

    /// A new instance key.
    pub(crate) fn instance_key() -> PrivateKey {
        PrivateKey::generate(&ring::rand::SystemRandom::new()).expect("key")
    }
}

#[cfg(test)]
mod tests {
    use super::testca::{Ca, instance_key};
    use super::*;
    use proptest::prelude::*;

    /// 2026-12-06, inside the default validity of rcgen's certificates.
    const NOW: Duration = Duration::from_secs(1_796_515_200);

    fn anchors(ca: &Ca) -> TrustAnchors {
        TrustAnchors::from_der(&[ca.der()]).expect("anchor")
    }

    fn name(n: &str) -> ServerName {
        ServerName::new(n).expect("name")
    }

    fn check(
        anchors: &TrustAnchors,
        n: &str,
        chain: &CertificateChain,
        signer: &PublicKey,
    ) -> Result<(), CertProblem> {
        verify(anchors, Some(&name(n)), Some(NOW), chain.block(), signer)
    }

    #[test]
    fn a_chain_to_a_trusted_ca_for_the_name_and_the_signing_key_verifies() {
        let root = Ca::root("root");
        let k = instance_key();
        let leaf = root.leaf(&k, &["web.example.com"]);
        let chain = CertificateChain::from_der(&[leaf], &k.public_key()).expect("chain");
        assert_eq!(
            check(&anchors(&root), "web.example.com", &chain, &k.public_key()),
            Ok(())
        );
        // Through an intermediate, which the server sends after its leaf.
        let mid = root.intermediate("intermediate");
        let leaf = mid.leaf(&k, &["web.example.com"]);
        let chain =
            CertificateChain::from_der(&[leaf.clone(), mid.der()], &k.public_key()).expect("chain");
        assert!(chain.block().len() <= MAX_CHAIN_BLOCK);
        assert_eq!(
            check(&anchors(&root), "web.example.com", &chain, &k.public_key()),
            Ok(())
        );
        // Without the intermediate, the leaf does not reach the root.
        let alone = CertificateChain::from_der(&[leaf], &k.public_key()).expect("chain");
        assert_eq!(
            check(&anchors(&root), "web.example.com", &alone, &k.public_key()),
            Err(CertProblem::UntrustedIssuer)
        );
    }

    #[test]
    fn each_failure_names_what_was_wrong() {
        let root = Ca::root("root");
        let other = Ca::root("another root");
        let k = instance_key();
        let chain_of = |der: Vec<u8>| CertificateChain::from_der(&[der], &k.public_key()).unwrap();
        let good = chain_of(root.leaf(&k, &["web.example.com"]));
        // Untrusted issuer.
        assert_eq!(
            check(&anchors(&other), "web.example.com", &good, &k.public_key()),
            Err(CertProblem::UntrustedIssuer)
        );
        // Another name.
        assert_eq!(
            check(&anchors(&root), "mail.example.com", &good, &k.public_key()),
            Err(CertProblem::WrongName("mail.example.com".into()))
        );
        // Expired, and not valid yet.
        let expired = chain_of(root.leaf_with(&k, &["web.example.com"], |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }));
        assert!(matches!(
            check(&anchors(&root), "web.example.com", &expired, &k.public_key()),
            Err(CertProblem::Expired { not_after: 1_609_459_200, now }) if now == NOW.as_secs()
        ));
        let early = chain_of(root.leaf_with(&k, &["web.example.com"], |p| {
            p.not_before = rcgen::date_time_ymd(2099, 1, 1);
        }));
        assert!(matches!(
            check(&anchors(&root), "web.example.com", &early, &k.public_key()),
            Err(CertProblem::NotYetValid { .. })
        ));
        // For client authentication only.
        let client = chain_of(root.leaf_with(&k, &["web.example.com"], |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }));
        assert_eq!(
            check(&anchors(&root), "web.example.com", &client, &k.public_key()),
            Err(CertProblem::NotServerAuth)
        );
        // A valid chain for another key than the one that signed the handshake.
        let signer = instance_key().public_key();
        assert_eq!(
            check(&anchors(&root), "web.example.com", &good, &signer),
            Err(CertProblem::LeafKeyMismatch(signer))
        );
        // No chain, no name, no clock.
        let a = anchors(&root);
        let pk = k.public_key();
        let n = name("web.example.com");
        assert_eq!(
            verify(&a, Some(&n), Some(NOW), &[], &pk),
            Err(CertProblem::Missing)
        );
        assert_eq!(
            verify(&a, None, Some(NOW), good.block(), &pk),
            Err(CertProblem::NoName)
        );
        assert_eq!(
            verify(&a, Some(&n), None, good.block(), &pk),
            Err(CertProblem::NoClock)
        );
    }

    #[test]
    fn cas_signing_with_ecdsa_are_accepted_too() {
        let k = instance_key();
        for (root_alg, mid_alg) in [
            (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            (
                &rcgen::PKCS_ECDSA_P384_SHA384,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            (&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519),
        ] {
            let root = Ca::root_with("root", root_alg);
            let mid = root.intermediate_with("intermediate", mid_alg, 2);
            let leaf = mid.leaf(&k, &["web.example.com"]);
            let chain = CertificateChain::from_der(&[leaf, mid.der()], &k.public_key())
                .expect("an ECDSA chain fits");
            assert_eq!(
                check(&anchors(&root), "web.example.com", &chain, &k.public_key()),
                Ok(()),
                "{root_alg:?} root, {mid_alg:?} intermediate"
            );
        }
    }

    #[test]
    fn revoked_certificates_and_stale_lists_are_refused() {
        let root = Ca::root("root");
        let mid = root.intermediate_with("intermediate", &rcgen::PKCS_ED25519, 7);
        let k = instance_key();
        let leaf = mid.leaf_with(&k, &["web.example.com"], |p| {
            p.serial_number = Some(rcgen::SerialNumber::from(42));
        });
        let chain = CertificateChain::from_der(&[leaf, mid.der()], &k.public_key()).unwrap();
        let with = |pems: &[String]| {
            let lists = RevocationLists::from_pem(pems.concat().as_bytes()).expect("CRLs");
            anchors(&root).with_revocations(lists)
        };
        let run = |a: &TrustAnchors| check(a, "web.example.com", &chain, &k.public_key());
        // Lists that revoke other serials, or come from a CA not in the chain: accepted.
        let other = Ca::root("another root");
        assert_eq!(
            run(&with(&[
                mid.crl(&[41, 43], 2026, 2027),
                other.crl(&[42, 7], 2026, 2027)
            ])),
            Ok(())
        );
        // The leaf revoked by the intermediate; the intermediate revoked by the root.
        assert_eq!(
            run(&with(&[mid.crl(&[41, 42], 2026, 2027)])),
            Err(CertProblem::Revoked)
        );
        assert_eq!(
            run(&with(&[root.crl(&[7], 2026, 2027)])),
            Err(CertProblem::Revoked)
        );
        // A list in the intermediate's name but signed by another key: refused.
        let impostor = Ca::root("intermediate");
        assert_eq!(
            run(&with(&[impostor.crl(&[], 2026, 2027)])),
            Err(CertProblem::Other(
                "a revocation list (--crl) is not signed by its CA's key".into()
            ))
        );
        // A list past its nextUpdate says nothing current: refused, with the times.
        assert_eq!(
            run(&with(&[mid.crl(&[], 2024, 2025)])),
            Err(CertProblem::RevocationListExpired {
                next_update: 1_735_689_600,
                now: NOW.as_secs()
            })
        );
        // Several lists in one PEM file, the revoking one last.
        assert_eq!(
            run(&with(&[
                root.crl(&[], 2026, 2027),
                mid.crl(&[42], 2026, 2027)
            ])),
            Err(CertProblem::Revoked)
        );
        // Two lists from one CA: which is current is unknown, so they are refused.
        let twice = [
            mid.crl(&[], 2026, 2027),
            root.crl(&[], 2026, 2027),
            mid.crl(&[42], 2026, 2027),
        ];
        assert_eq!(
            RevocationLists::from_pem(twice.concat().as_bytes()),
            Err(CertError::DuplicateRevocationList {
                first: 1,
                second: 3
            })
        );
        // A file without a list, or with a broken one.
        assert_eq!(
            RevocationLists::from_pem(root.cert.pem().as_bytes()),
            Err(CertError::NoRevocationList)
        );
        assert!(matches!(
            RevocationLists::from_der(&[vec![0x30, 3, 1, 2, 3]]),
            Err(CertError::MalformedRevocationList { index: 1, .. })
        ));
    }

    #[test]
    fn a_server_refuses_a_chain_it_could_not_send() {
        let root = Ca::root("root");
        let k = instance_key();
        let leaf = root.leaf(&k, &["web.example.com"]);
        // Not its key.
        let other = instance_key().public_key();
        assert_eq!(
            CertificateChain::from_der(std::slice::from_ref(&leaf), &other),
            Err(CertError::LeafKeyMismatch { key: other })
        );
        // Too many certificates, too many bytes, none, garbage.
        let five = vec![leaf.clone(); MAX_CHAIN_CERTS + 1];
        assert!(matches!(
            CertificateChain::from_der(&five, &k.public_key()),
            Err(CertError::TooManyCertificates { count: 5 })
        ));
        let names: Vec<String> = (0..40).map(|i| format!("n{i}.web.example.com")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let big = root.leaf(&k, &names);
        assert!(matches!(
            CertificateChain::from_der(&[big], &k.public_key()),
            Err(CertError::TooLarge { .. })
        ));
        assert_eq!(
            CertificateChain::from_der(&[], &k.public_key()),
            Err(CertError::Empty)
        );
        assert!(matches!(
            CertificateChain::from_der(&[vec![0x30, 3, 1, 2, 3]], &k.public_key()),
            Err(CertError::Malformed { index: 1, .. })
        ));
        assert_eq!(
            TrustAnchors::from_pem(b"not a certificate"),
            Err(CertError::Empty)
        );
        // PEM in, the same chain out.
        let cert = root.leaf_cert(&k, &["web.example.com"], |_| {});
        assert_eq!(
            CertificateChain::from_pem(cert.pem().as_bytes(), &k.public_key()),
            CertificateChain::from_der(&[cert.der().to_vec()], &k.public_key())
        );
        assert_eq!(
            TrustAnchors::from_pem(root.cert.pem().as_bytes()),
            Ok(anchors(&root))
        );
        assert!(ServerName::new("not a name!").is_err());
    }

    #[test]
    fn truncated_or_altered_blocks_are_refused() {
        let root = Ca::root("root");
        let k = instance_key();
        let mid = root.intermediate("intermediate");
        let leaf = mid.leaf(&k, &["web.example.com"]);
        let chain = CertificateChain::from_der(&[leaf, mid.der()], &k.public_key()).unwrap();
        let a = anchors(&root);
        let n = name("web.example.com");
        let block = chain.block();
        for cut in 1..block.len() {
            assert!(verify(&a, Some(&n), Some(NOW), &block[..cut], &k.public_key()).is_err());
        }
        let mut longer = block.to_vec();
        longer.push(0);
        assert_eq!(
            verify(&a, Some(&n), Some(NOW), &longer, &k.public_key()),
            Err(CertProblem::Malformed)
        );
        for i in 0..block.len() {
            let mut flipped = block.to_vec();
            flipped[i] ^= 0x01;
            assert!(
                verify(&a, Some(&n), Some(NOW), &flipped, &k.public_key()).is_err(),
                "byte {i} flipped"
            );
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let root = Ca::root("root");
            let k = instance_key();
            let n = name("web.example.com");
            prop_assert!(verify(&anchors(&root), Some(&n), Some(NOW), &bytes, &k.public_key()).is_err());
        }
    }
}
