//! quinn endpoints for the benchmarks that compare against it: a server with a fresh
//! self-signed certificate (rcgen, ECDSA P-256) written to a file, and a client that trusts
//! exactly that certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A quinn server on `bind` for the name `bench.invalid`; its certificate goes to `cert_path`.
pub fn quinn_server(bind: SocketAddr, cert_path: &Path) -> Result<quinn::Endpoint, BoxError> {
    let ck = rcgen::generate_simple_self_signed(vec!["bench.invalid".to_string()])?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    std::fs::write(cert_path, cert.as_ref())?;
    let config = quinn::ServerConfig::with_single_cert(vec![cert], key)?;
    Ok(quinn::Endpoint::server(config, bind)?)
}

/// A quinn client on `bind` that trusts only the certificate at `cert_path`.
pub fn quinn_client(bind: SocketAddr, cert_path: &Path) -> Result<quinn::Endpoint, BoxError> {
    let der = std::fs::read(cert_path)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der))?;
    let config = quinn::ClientConfig::with_root_certificates(Arc::new(roots))?;
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(config);
    Ok(ep)
}
