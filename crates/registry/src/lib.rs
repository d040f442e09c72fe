//! Where Serval service routers keep registrations ("this prefix is served at this locator,
//! with this weight and priority"), as soft state with a time to live.
//!
//! A [`Registry`] is a handle on one store:
//!
//! * [`Registry::memory`]: inside this process, the single-machine default;
//! * [`Registry::connect`] with an `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]` URL (or
//!   [`Registry::etcd`] with an [`EtcdConfig`]): registrations are etcd keys bound to leases,
//!   and every router holding such a handle keeps a full local replica by listing and then
//!   watching from the listed revision, so any router can die, restart or be added without a
//!   registration being lost. Key layout and value encoding: see the `codec` module source
//!   (`<prefix>/v1/reg/<service prefix>/<locator>` = `v1 w=<weight> p=<priority> ttl=<secs>`);
//!   replica states: the `etcd` module source.
//!
//! Writers call [`Registry::put`] (create or refresh, for a time to live) and
//! [`Registry::delete`]; readers [`Registry::subscribe`] and apply the [`Change`]s to their
//! service table. Whatever the backend, a subscription starts with a [`Change::Reset`] holding
//! every live registration, and a subscriber that falls behind, or a replica that had to list
//! again, also gets a `Reset`: applying changes in order always yields the store's contents.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod cache;
mod codec;
mod etcd;
mod memory;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serval_wire::{Locator, ServicePrefix};
use tokio::sync::broadcast;

pub use etcd::EtcdConfig;
pub use memory::MemoryRegistry;

/// What identifies a registration: a prefix served at a locator. A second registration with
/// the same key replaces the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegistrationKey {
    /// The service prefix served.
    pub prefix: ServicePrefix,
    /// Where it is served (an instance, or a child router for a hierarchy).
    pub locator: Locator,
}

impl fmt::Display for RegistrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.prefix, self.locator)
    }
}

/// One registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Registration {
    /// The service prefix served.
    pub prefix: ServicePrefix,
    /// Where it is served.
    pub locator: Locator,
    /// Share of new flows among targets of the same priority (at least 1).
    pub weight: u32,
    /// Only the targets of the highest priority present receive flows.
    pub priority: u32,
}

impl Registration {
    /// Its key.
    pub fn key(&self) -> RegistrationKey {
        RegistrationKey {
            prefix: self.prefix,
            locator: self.locator,
        }
    }
}

/// A registration with the time it has left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leased {
    /// The registration.
    pub registration: Registration,
    /// In memory: time left before it expires unless refreshed (as of the snapshot).
    ///
    /// With etcd: its time to live in whole seconds (the TTL it was put with, rounded up),
    /// which bounds the time left. etcd alone knows the exact time left, since any router may
    /// have refreshed the lease without the replica seeing it.
    pub expires_in: Duration,
}

/// A change to the set of registrations, in store order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The set is exactly this (first event of a subscription; also after a subscriber fell
    /// behind or a replica listed again).
    Reset(Vec<Registration>),
    /// Created or replaced.
    Put(Registration),
    /// Removed: deleted by its owner, or expired.
    Delete(RegistrationKey),
}

/// Whether the registry is serving fresh data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Up to date with the store.
    Synced,
    /// The store is unreachable: the replica keeps serving what it had, and catches up when
    /// the store returns.
    Degraded {
        /// The last error seen.
        error: String,
    },
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry URL is not one this build understands.
    #[error(
        "unsupported registry URL {0:?} (expected memory:// or etcd://HOST:PORT[,HOST:PORT…][/PREFIX])"
    )]
    BadUrl(String),
    /// A registration's weight is zero.
    #[error("weight must be at least 1")]
    ZeroWeight,
    /// The store could not be reached or refused the operation.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

/// A key authorised for a service prefix: registrations under the prefix must be signed by
/// it (`docs/security.md`). The key is kept as its public key line (`ed25519:…`); the router
/// parses it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Authorization {
    /// The prefix the key may register under.
    pub prefix: ServicePrefix,
    /// The public key line.
    pub key: String,
}

/// A handle on a registry; cheap to clone, every clone sees the same store.
#[derive(Clone, Debug)]
pub struct Registry {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Memory(Arc<MemoryRegistry>),
    Etcd(Arc<etcd::EtcdRegistry>),
}

/// Counters of a registry's replica (all zero for the in-memory registry); monotonic, for
/// metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Records in the store that were skipped as malformed (a key not in the layout, a value
    /// that does not parse). A record listed again after a resync counts again.
    pub malformed: u64,
    /// Times the replica listed everything again after its first list (etcd came back, a
    /// watch fell behind compaction…); each gave subscribers a [`Change::Reset`].
    pub relists: u64,
    /// Times a broken watch was reopened from its last revision instead of listing again
    /// (attempts: one that fails leaves the replica degraded, to list when etcd returns).
    pub watch_resumes: u64,
    /// Times a watch was cancelled because its revision had been compacted.
    pub compactions: u64,
    /// Lists of everything, the first included; 0 for a replica that started from its cache
    /// file ([`EtcdConfig::cache`]) and caught up by watching.
    pub lists: u64,
}

impl Registry {
    /// A registry inside this process.
    pub fn memory() -> Registry {
        Registry {
            backend: Backend::Memory(Arc::new(MemoryRegistry::new())),
        }
    }

    /// Opens the registry at `url`: `memory://` (this process) or
    /// `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]` (see [`EtcdConfig::from_url`]; default
    /// timeouts).
    ///
    /// For etcd this lists the registrations before returning, so the handle starts with a
    /// full replica. If no member can be reached (after one try each) or a page of the list
    /// takes longer than [`EtcdConfig::list_timeout`], the handle opens anyway,
    /// [`Health::Degraded`] and empty, and lists in the background once etcd answers (a
    /// [`Change::Reset`] to subscribers); with [`EtcdConfig::start_degraded`] off it fails
    /// with [`RegistryError::Unavailable`] instead. Must run inside a tokio runtime.
    pub async fn connect(url: &str) -> Result<Registry, RegistryError> {
        match url.split_once("://") {
            Some(("memory", "")) => Ok(Registry::memory()),
            Some(("etcd", _)) => Registry::etcd(EtcdConfig::from_url(url)?).await,
            _ => Err(RegistryError::BadUrl(url.to_owned())),
        }
    }

    /// Opens an etcd registry with this configuration; see [`Registry::connect`].
    pub async fn etcd(config: EtcdConfig) -> Result<Registry, RegistryError> {
        Ok(Registry {
            backend: Backend::Etcd(Arc::new(etcd::EtcdRegistry::connect(config).await?)),
        })
    }

    /// Creates or refreshes `reg` for `ttl`: unless put again within `ttl`, it expires.
    ///
    /// With etcd, `ttl` is rounded up to whole seconds (at least 1; etcd itself raises a
    /// lease shorter than its minimum, 2 s with its default election timeout). Putting a
    /// registration again with the same weight, priority and TTL refreshes its lease, through
    /// any handle; anything else writes it anew. Fails with [`RegistryError::Unavailable`]
    /// within [`EtcdConfig::request_timeout`] when etcd cannot be reached.
    pub async fn put(&self, reg: Registration, ttl: Duration) -> Result<(), RegistryError> {
        if reg.weight == 0 {
            return Err(RegistryError::ZeroWeight);
        }
        match &self.backend {
            Backend::Memory(m) => {
                m.put(reg, ttl);
                Ok(())
            }
            Backend::Etcd(e) => e.put(reg, ttl).await,
        }
    }

    /// Removes a registration at once (no-op if absent).
    pub async fn delete(&self, key: &RegistrationKey) -> Result<(), RegistryError> {
        match &self.backend {
            Backend::Memory(m) => {
                m.delete(key);
                Ok(())
            }
            Backend::Etcd(e) => e.delete(key).await,
        }
    }

    /// Every live registration with its remaining time (see [`Leased::expires_in`] for
    /// what etcd can tell), sorted by key. With etcd this is the local replica: it keeps
    /// serving while etcd is unreachable.
    pub fn snapshot(&self) -> Vec<Leased> {
        match &self.backend {
            Backend::Memory(m) => m.snapshot(),
            Backend::Etcd(e) => e.snapshot(),
        }
    }

    /// Changes from now on, starting with a [`Change::Reset`] of the current set.
    pub fn subscribe(&self) -> Subscription {
        match &self.backend {
            Backend::Memory(m) => m.subscribe(self.clone()),
            Backend::Etcd(e) => e.subscribe(self.clone()),
        }
    }

    /// Publishes that registrations under `auth.prefix` need `auth.key`'s signature. In memory
    /// this is seen by this process's [`Registry::authorizations`] only; with etcd it is the
    /// key `<prefix>/v1/auth/<service prefix>/<key>` (no lease: it stays until deleted), seen
    /// by every router on the same etcd. Fails with [`RegistryError::Unavailable`] when etcd
    /// cannot be reached.
    pub async fn authorize(&self, auth: Authorization) -> Result<(), RegistryError> {
        match &self.backend {
            Backend::Memory(m) => {
                m.authorize(auth);
                Ok(())
            }
            Backend::Etcd(e) => e.authorize(auth).await,
        }
    }

    /// Every authorisation the registry holds, as it changes (with etcd: listed, then
    /// watched; kept while etcd is unreachable).
    pub fn authorizations(&self) -> tokio::sync::watch::Receiver<Vec<Authorization>> {
        match &self.backend {
            Backend::Memory(m) => m.authorizations(),
            Backend::Etcd(e) => e.authorizations(),
        }
    }

    /// Whether the registry is serving fresh data.
    pub fn health(&self) -> Health {
        match &self.backend {
            Backend::Memory(_) => Health::Synced,
            Backend::Etcd(e) => e.health(),
        }
    }

    /// The replica's counters.
    pub fn stats(&self) -> RegistryStats {
        match &self.backend {
            Backend::Memory(_) => RegistryStats::default(),
            Backend::Etcd(e) => e.stats(),
        }
    }
}

/// A stream of [`Change`]s; see [`Registry::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    registry: Registry,
    first: Option<Vec<Registration>>,
    rx: broadcast::Receiver<Change>,
}

impl Subscription {
    /// The next change; `None` once the registry is gone.
    pub async fn next(&mut self) -> Option<Change> {
        if let Some(all) = self.first.take() {
            return Some(Change::Reset(all));
        }
        match self.rx.recv().await {
            Ok(c) => Some(c),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Fell behind: start over from the current set.
                self.rx = self.rx.resubscribe();
                let all = self
                    .registry
                    .snapshot()
                    .into_iter()
                    .map(|l| l.registration)
                    .collect();
                Some(Change::Reset(all))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
