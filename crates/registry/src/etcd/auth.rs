//! Authorisations in etcd: which key may register under which service prefix, shared by
//! every router on the cluster.
//!
//! ```text
//! key:   <prefix>/v1/auth/<service prefix>/<key>
//!        e.g. /serval/v1/auth/cf47…8573/256/Pq3x…
//! value: the public key line, e.g. ed25519:Pq3x…
//! ```
//!
//! `<service prefix>` is canonical (64 lower-case hex digits, `/`, the length), `<key>` the
//! 43 base64url characters of the key, so several keys may be authorised for one prefix
//! (their union is enforced). Keys carry no lease: an authorisation stays until it is deleted
//! (`etcdctl del`). A follower task lists the key space and watches it from the listed
//! revision, on connections of its own; when etcd breaks it keeps what it had and lists again
//! once it answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serval_etcd::{Client, Options, pb, prefix_end};
use serval_wire::ServicePrefix;
use tokio::sync::watch;

use super::Shared;
use crate::{Authorization, RegistryError};

/// `<prefix>/v1/auth/`.
pub(super) fn auth_prefix(prefix: &str) -> String {
    format!("{prefix}/v1/auth/")
}

/// The etcd key of `auth`.
pub(super) fn auth_key(prefix: &str, auth: &Authorization) -> String {
    let key = auth.key.strip_prefix("ed25519:").unwrap_or(&auth.key);
    format!("{}{}/{key}", auth_prefix(prefix), auth.prefix)
}

/// The authorisation a stored key and value hold, if well-formed.
fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Option<Authorization> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(&auth_prefix(prefix))?;
    let (service, k) = rest.rsplit_once('/')?;
    let service = ServicePrefix::parse(service).ok()?;
    let value = std::str::from_utf8(value).ok()?.trim();
    (value.strip_prefix("ed25519:") == Some(k)).then(|| Authorization {
        prefix: service,
        key: value.to_owned(),
    })
}

/// Writes `auth` (no lease).
pub(super) async fn put(shared: &Shared, auth: Authorization) -> Result<(), RegistryError> {
    let k = auth_key(&shared.config.prefix, &auth);
    let v = auth.key.clone();
    shared
        .call(|m| {
            let (k, v) = (k.clone(), v.clone());
            async move {
                m.client
                    .put(pb::PutRequest {
                        key: k.into_bytes(),
                        value: v.into_bytes(),
                        lease: 0,
                        prev_kv: false,
                    })
                    .await
            }
        })
        .await
        .map(drop)
        .map_err(RegistryError::from)
}

/// The follower's own connections, one per member: its list and watch never share (or
/// disturb) the replica's HTTP/2 connections.
fn own_clients(shared: &Shared) -> Vec<Client> {
    let c = &shared.config;
    let options = Options::default()
        .with_connect_timeout(c.connect_timeout)
        .with_keepalive(c.keepalive)
        .with_require_leader(true)
        .with_max_message(super::MAX_MESSAGE);
    c.endpoints
        .iter()
        .filter_map(|addr| Client::connect_lazy(addr, &options).ok())
        .collect()
}

/// Runs `op` on each client in turn (from `first`) until one answers within the request
/// timeout; returns the answer and the client that gave it.
async fn call<T, F, Fut>(
    clients: &[Client],
    first: usize,
    timeout: Duration,
    mut op: F,
) -> Option<(T, usize)>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, serval_etcd::Error>>,
{
    for k in 0..clients.len() {
        let i = (first + k) % clients.len();
        let Some(c) = clients.get(i) else { continue };
        if let Ok(Ok(v)) = tokio::time::timeout(timeout, op(c.clone())).await {
            return Some((v, i));
        }
    }
    None
}

/// Follows the authorisations in etcd into `tx`, for as long as the task lives.
pub(super) async fn follow(shared: Arc<Shared>, tx: watch::Sender<Vec<Authorization>>) {
    let prefix = auth_prefix(&shared.config.prefix).into_bytes();
    let end = prefix_end(&prefix);
    let clients = own_clients(&shared);
    let timeout = shared.config.request_timeout;
    let mut member = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let listed = call(&clients, member, timeout, |c| {
            let req = pb::RangeRequest {
                key: prefix.clone(),
                range_end: end.clone(),
                ..Default::default()
            };
            async move { c.range(req).await }
        })
        .await;
        let Some((resp, m)) = listed else {
            member = member.wrapping_add(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        member = m;
        let mut held: BTreeMap<Vec<u8>, Authorization> = resp
            .kvs
            .iter()
            .filter_map(|kv| {
                decode(&shared.config.prefix, &kv.key, &kv.value).map(|a| (kv.key.clone(), a))
            })
            .collect();
        publish(&tx, &held);
        let revision = resp.header.map_or(0, |h| h.revision);
        let opened = call(&clients, member, timeout, |c| {
            let req = pb::WatchCreateRequest {
                key: prefix.clone(),
                range_end: end.clone(),
                start_revision: revision + 1,
                ..Default::default()
            };
            async move { c.watch(req).await }
        })
        .await;
        if let Some((mut stream, _)) = opened {
            backoff = Duration::from_millis(100);
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled {
                    break;
                }
                let mut changed = false;
                for ev in resp.events {
                    let Some(kv) = ev.kv else { continue };
                    match ev.r#type {
                        0 => {
                            if let Some(a) = decode(&shared.config.prefix, &kv.key, &kv.value) {
                                changed |= held.insert(kv.key, a.clone()).as_ref() != Some(&a);
                            } else {
                                changed |= held.remove(&kv.key).is_some();
                            }
                        }
                        _ => changed |= held.remove(&kv.key).is_some(),
                    }
                }
                if changed {
                    publish(&tx, &held);
                }
            }
        }
        // The watch ended (a member died, a connection broke): list again, from the next
        // member, after a pause.
        member = member.wrapping_add(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn publish(tx: &watch::Sender<Vec<Authorization>>, held: &BTreeMap<Vec<u8>, Authorization>) {
    let mut all: Vec<Authorization> = held.values().cloned().collect();
    all.sort();
    all.dedup();
    tx.send_if_modified(|v| {
        if *v == all {
            return false;
        }
        *v = all;
        true
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_round_trip_and_malformed_ones_are_skipped() {
        let a = Authorization {
            prefix: ServicePrefix::parse("example.com/*").unwrap(),
            key: format!("ed25519:{}", "A".repeat(43)),
        };
        let k = auth_key("/serval", &a);
        assert!(k.starts_with("/serval/v1/auth/"), "{k}");
        assert!(k.ends_with(&format!("/64/{}", "A".repeat(43))), "{k}");
        assert_eq!(
            decode("/serval", k.as_bytes(), a.key.as_bytes()),
            Some(a.clone())
        );
        // The value must name the key the key names.
        assert_eq!(decode("/serval", k.as_bytes(), b"ed25519:BBB"), None);
        assert_eq!(decode("/other", k.as_bytes(), a.key.as_bytes()), None);
        assert_eq!(
            decode("/serval", b"/serval/v1/auth/zz/1/x", b"ed25519:x"),
            None
        );
    }
}
