//! The etcd replica's file cache ([`EtcdConfig::cache`](crate::EtcdConfig::cache)).
//!
//! A router's cold start from etcd lists every registration, which for a million takes
//! seconds of etcd's time (BENCHMARKS.md (c)). With a cache, the replica is saved to a local
//! file now and then; a restart loads it, then *watches* etcd from the revision after the
//! saved one, which replays exactly what changed meanwhile (expiries included) — or lists
//! afresh if etcd no longer has that history (compacted), answers as another cluster, or the
//! file is unreadable. The file is only ever a starting point, never the truth.
//!
//! # Format (version 1; all integers big-endian)
//!
//! ```text
//! magic "SVRC" | version u16 = 1 | prefix length u16 | key prefix (UTF-8)
//! cluster ID u64 | revision i64 | count u64
//! count × ( key length u16 | key | value length u16 | value | lease i64 )
//! CRC-32 (IEEE) u32 of every byte before it
//! ```
//!
//! Keys and values are stored exactly as etcd holds them, and decoded on load by the same code
//! that decodes a list, so a malformed record in the file is skipped and counted like one in
//! etcd. The file is written to a temporary name beside it and renamed over it, so a crash
//! leaves the old file or the new one, never half of one.

use std::io::{self, Write};
use std::path::Path;

const MAGIC: &[u8; 4] = b"SVRC";
const VERSION: u16 = 1;

/// A replica as saved: the raw key-values and where in etcd's history they stand.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Saved {
    /// The etcd cluster they were read from.
    pub cluster_id: u64,
    /// The store revision they reflect.
    pub revision: i64,
    /// `(key, value, lease)` as etcd stores them.
    pub kvs: Vec<(Vec<u8>, Vec<u8>, i64)>,
}

/// Why a cache file was not used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    /// It could not be read.
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    /// It is not a cache file of this format version.
    #[error("not a registry cache file (version {VERSION})")]
    Foreign,
    /// It was written for another key prefix.
    #[error("written for key prefix {0:?}")]
    OtherPrefix(String),
    /// It is shorter than it says, or its checksum does not match.
    #[error("truncated or corrupt")]
    Corrupt,
}

/// Writes `saved` for key prefix `prefix` to `path` (through a temporary file renamed over it).
pub(crate) fn save(path: &Path, prefix: &str, saved: &Saved) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64 + saved.kvs.len() * 96);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_be_bytes());
    put_bytes(&mut buf, prefix.as_bytes())?;
    buf.extend_from_slice(&saved.cluster_id.to_be_bytes());
    buf.extend_from_slice(&saved.revision.to_be_bytes());
    buf.extend_from_slice(&(saved.kvs.len() as u64).to_be_bytes());
    for (k, v, lease) in &saved.kvs {
        put_bytes(&mut buf, k)?;
        put_bytes(&mut buf, v)?;
        buf.extend_from_slice(&lease.to_be_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_be_bytes());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) -> io::Result<()> {
    let len = u16::try_from(b.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record longer than 64 KiB"))?;
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(b);
    Ok(())
}

/// Reads the cache at `path`, written for key prefix `prefix`.
pub(crate) fn load(path: &Path, prefix: &str) -> Result<Saved, CacheError> {
    let data = std::fs::read(path)?;
    let (body, crc) = data.split_last_chunk::<4>().ok_or(CacheError::Foreign)?;
    let mut r = Reader(body);
    if r.take(4)? != MAGIC || r.u16()? != VERSION {
        return Err(CacheError::Foreign);
    }
    if crc32fast::hash(body) != u32::from_be_bytes(*crc) {
        return Err(CacheError::Corrupt);
    }
    let saved_prefix = r.bytes()?;
    if saved_prefix != prefix.as_bytes() {
        return Err(CacheError::OtherPrefix(
            String::from_utf8_lossy(saved_prefix).into_owned(),
        ));
    }
    let cluster_id = r.u64()?;
    let revision = r.u64()? as i64;
    let count = r.u64()?;
    // Each record takes at least 12 bytes: a count beyond that is a lie, not an allocation.
    let cap = usize::try_from(count)
        .ok()
        .filter(|&n| n <= r.0.len() / 12)
        .ok_or(CacheError::Corrupt)?;
    let mut kvs = Vec::with_capacity(cap);
    for _ in 0..count {
        let k = r.bytes()?.to_vec();
        let v = r.bytes()?.to_vec();
        let lease = r.u64()? as i64;
        kvs.push((k, v, lease));
    }
    if !r.0.is_empty() {
        return Err(CacheError::Corrupt);
    }
    Ok(Saved {
        cluster_id,
        revision,
        kvs,
    })
}

/// Reads big-endian fields off a byte slice; running out is [`CacheError::Corrupt`].
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CacheError> {
        if self.0.len() < n {
            return Err(CacheError::Corrupt);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, CacheError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, CacheError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], CacheError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Saved {
        Saved {
            cluster_id: 0x1234,
            revision: 99,
            kvs: vec![
                (b"/s/v1/reg/a/1".to_vec(), b"v1 w=1 p=0 ttl=3".to_vec(), 7),
                (b"/s/v1/reg/b/2".to_vec(), b"v1 w=2 p=1 ttl=9".to_vec(), -1),
            ],
        }
    }

    #[test]
    fn round_trips_and_refuses_what_is_not_its_own() {
        let dir = std::env::temp_dir().join(format!("serval-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("replica");
        save(&path, "/s", &sample()).unwrap();
        assert_eq!(load(&path, "/s").unwrap(), sample());
        assert!(matches!(
            load(&path, "/other"),
            Err(CacheError::OtherPrefix(p)) if p == "/s"
        ));
        let good = std::fs::read(&path).unwrap();
        // Every truncation, and every single flipped bit, is refused: never a panic.
        for n in 0..good.len() {
            std::fs::write(&path, &good[..n]).unwrap();
            assert!(load(&path, "/s").is_err(), "truncated to {n}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(load(&path, "/s").is_err(), "bit flipped at {i}");
        }
        std::fs::write(&path, b"not a cache at all").unwrap();
        assert!(matches!(load(&path, "/s"), Err(CacheError::Foreign)));
        assert!(matches!(
            load(&dir.join("missing"), "/s"),
            Err(CacheError::Io(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
