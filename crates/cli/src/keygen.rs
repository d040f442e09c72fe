//! `serval keygen` and `serval id --key`: keys for signed registrations and self-certifying
//! serviceIDs (`docs/security.md`).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use serval_router::keys::{self, PrivateKey, PublicKey, SystemRandom};
use serval_wire::ServiceId;

/// `serval keygen FILE`: writes a new private key to FILE (mode 0600, never over an existing
/// file) and prints its public key line.
pub fn keygen(file: &Path) -> ExitCode {
    let key = match PrivateKey::generate(&SystemRandom::new()) {
        Ok(k) => k,
        Err(e) => {
            note!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = match options.open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return crate::usage(&format!(
                "{} already exists; not overwriting a key file (remove it first)",
                file.display()
            ));
        }
        Err(e) => return crate::usage(&format!("cannot create {}: {e}", file.display())),
    };
    if let Err(e) = f
        .write_all(key.to_pem().as_bytes())
        .and_then(|()| f.sync_all())
    {
        let _ = std::fs::remove_file(file);
        note!("error: cannot write {}: {e}", file.display());
        return ExitCode::FAILURE;
    }
    println!("{}", key.public_key().to_line());
    ExitCode::SUCCESS
}

/// Reads a private key file, as `--key FILE` does; a failure is one line naming the file.
pub fn read_private_key(file: &str) -> Result<PrivateKey, String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("cannot read key file {file}: {e}"))?;
    PrivateKey::from_pem(&text).map_err(|e| format!("key file {file}: {e}"))
}

/// Reads a file naming a public key (a public key line, or a private key file).
fn read_public_key(file: &Path) -> Result<PublicKey, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read key file {}: {e}", file.display()))?;
    keys::public_key_from_text(&text).map_err(|e| format!("key file {}: {e}", file.display()))
}

/// `serval id --key PUBFILE NAME…`: the self-certifying serviceID of each name and the key.
pub fn self_certifying(pubfile: &Path, names: &[String]) -> ExitCode {
    let key = match read_public_key(pubfile) {
        Ok(k) => k,
        Err(e) => return crate::usage(&e),
    };
    let mut lines = Vec::with_capacity(names.len());
    for name in names {
        match ServiceId::parse(name) {
            Ok(id) => lines.push(keys::self_certifying_id(&id, &key).to_string()),
            Err(e) => return crate::usage(&e),
        }
    }
    for line in lines {
        println!("{line}");
    }
    ExitCode::SUCCESS
}
