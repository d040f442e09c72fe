//! The in-process registry: a map with expiry times, and a task that expires them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use crate::{Change, Leased, Registration, RegistrationKey, Registry, Subscription};

/// Changes buffered per subscriber before it must start over from a snapshot.
const CHANGE_BUFFER: usize = 4096;

/// Registrations held in this process, expired by a background task. Time is tokio's, so
/// tests can pause and advance it.
#[derive(Debug)]
pub struct MemoryRegistry {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    /// Wakes the expiry task when an earlier deadline appears.
    wake: Arc<Notify>,
    /// Authorisations published in this process.
    auths: tokio::sync::watch::Sender<Vec<crate::Authorization>>,
}

#[derive(Debug, Default)]
struct State {
    regs: HashMap<RegistrationKey, (Registration, Instant)>,
    /// Deadlines; an entry is current only if it equals the registration's expiry.
    deadlines: BinaryHeap<Reverse<(Instant, RegistrationKey)>>,
    expiry_task: bool,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        MemoryRegistry::new()
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> MemoryRegistry {
        MemoryRegistry {
            state: Mutex::new(State::default()),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            wake: Arc::new(Notify::new()),
            auths: tokio::sync::watch::Sender::new(Vec::new()),
        }
    }

    /// Adds an authorisation (no-op if held).
    pub(crate) fn authorize(&self, auth: crate::Authorization) {
        self.auths.send_if_modified(|v| {
            if v.contains(&auth) {
                return false;
            }
            v.push(auth);
            v.sort();
            true
        });
    }

    /// The authorisations, as they change.
    pub(crate) fn authorizations(&self) -> tokio::sync::watch::Receiver<Vec<crate::Authorization>> {
        self.auths.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if something ever did.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates or refreshes `reg` for `ttl`. Must run inside a tokio runtime (the first call
    /// starts the expiry task).
    pub(crate) fn put(self: &Arc<Self>, reg: Registration, ttl: Duration) {
        let expiry = Instant::now() + ttl;
        let key = reg.key();
        let mut st = self.lock();
        let changed = st.regs.get(&key).is_none_or(|(old, _)| *old != reg);
        let earliest = st.deadlines.peek().map(|Reverse((t, _))| *t);
        st.regs.insert(key, (reg, expiry));
        st.deadlines.push(Reverse((expiry, key)));
        if changed {
            let _ = self.changes.send(Change::Put(reg));
        }
        if !st.expiry_task {
            st.expiry_task = true;
            tokio::spawn(expire(Arc::downgrade(self), self.wake.clone()));
        } else if earliest.is_none_or(|t| expiry < t) {
            self.wake.notify_one();
        }
        // Stale heap entries are dropped as they surface; bound them if refreshes pile up.
        if st.deadlines.len() > 2 * st.regs.len() + 64 {
            st.deadlines = st
                .regs
                .iter()
                .map(|(k, (_, t))| Reverse((*t, *k)))
                .collect();
        }
    }

    /// Removes a registration at once.
    pub(crate) fn delete(&self, key: &RegistrationKey) {
        if self.lock().regs.remove(key).is_some() {
            let _ = self.changes.send(Change::Delete(*key));
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<Leased> {
        let now = Instant::now();
        let mut v: Vec<Leased> = self
            .lock()
            .regs
            .values()
            .map(|(reg, t)| Leased {
                registration: *reg,
                expires_in: t.saturating_duration_since(now),
            })
            .collect();
        v.sort_by_key(|l| l.registration.key());
        v
    }

    pub(crate) fn subscribe(&self, registry: Registry) -> Subscription {
        // Subscribe and read the set under one lock, so no change falls between them.
        let st = self.lock();
        let rx = self.changes.subscribe();
        let mut all: Vec<Registration> = st.regs.values().map(|(r, _)| *r).collect();
        drop(st);
        all.sort_unstable_by_key(Registration::key);
        Subscription {
            registry,
            first: Some(all),
            rx,
        }
    }

    /// Removes what expired by `now`; returns the next deadline.
    fn expire_due(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        while let Some(&Reverse((t, key))) = st.deadlines.peek() {
            if t > now {
                return Some(t);
            }
            st.deadlines.pop();
            if st.regs.get(&key).is_some_and(|(_, exp)| *exp == t) {
                st.regs.remove(&key);
                tracing::info!(registration = %key, "registration expired");
                let _ = self.changes.send(Change::Delete(key));
            }
        }
        None
    }
}

/// Expires registrations until the registry is dropped.
async fn expire(registry: Weak<MemoryRegistry>, wake: Arc<Notify>) {
    loop {
        let next = match registry.upgrade() {
            Some(r) => r.expire_due(Instant::now()),
            None => return,
        };
        let notified = wake.notified();
        match next {
            Some(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = notified => {}
                }
            }
            // Re-check now and then that the registry still exists.
            None => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = notified => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serval_wire::ServicePrefix;

    fn reg(name: &str, port: u16, weight: u32) -> Registration {
        Registration {
            prefix: name.parse::<ServicePrefix>().unwrap(),
            locator: format!("127.0.0.1:{port}").parse().unwrap(),
            weight,
            priority: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn subscribers_see_puts_refreshes_deletes_and_expiry_in_order() {
        let r = Registry::memory();
        let a = reg("a.test", 1, 1);
        r.put(a, Duration::from_secs(3)).await.unwrap();
        let mut sub = r.subscribe();
        assert_eq!(sub.next().await, Some(Change::Reset(vec![a])));
        let b = reg("b.test", 2, 5);
        r.put(b, Duration::from_secs(3)).await.unwrap();
        assert_eq!(sub.next().await, Some(Change::Put(b)));
        // A refresh with the same contents is not a change; a new weight is.
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.put(a, Duration::from_secs(3)).await.unwrap();
        let b2 = Registration { weight: 7, ..b };
        r.put(b2, Duration::from_secs(3)).await.unwrap();
        assert_eq!(sub.next().await, Some(Change::Put(b2)));
        r.delete(&b2.key()).await.unwrap();
        assert_eq!(sub.next().await, Some(Change::Delete(b2.key())));
        // `a` was refreshed at t=2 s for 3 s: alive at 4.9 s, gone at 5 s.
        tokio::time::sleep(Duration::from_millis(2900)).await;
        assert_eq!(r.snapshot().len(), 1);
        assert_eq!(sub.next().await, Some(Change::Delete(a.key())));
        assert!(r.snapshot().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagging_subscriber_starts_over_from_the_current_set() {
        let r = Registry::memory();
        let mut sub = r.subscribe();
        assert_eq!(sub.next().await, Some(Change::Reset(vec![])));
        for i in 0..(CHANGE_BUFFER as u16 + 10) {
            r.put(reg("x.test", i + 1, 1), Duration::from_secs(60))
                .await
                .unwrap();
        }
        match sub.next().await {
            Some(Change::Reset(all)) => assert_eq!(all.len(), CHANGE_BUFFER + 10),
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn zero_weight_and_bad_urls_are_refused() {
        let r = Registry::memory();
        assert!(matches!(
            r.put(reg("a.test", 1, 0), Duration::from_secs(1)).await,
            Err(crate::RegistryError::ZeroWeight)
        ));
        assert!(Registry::connect("memory://").await.is_ok());
        assert!(matches!(
            Registry::connect("redis://x").await,
            Err(crate::RegistryError::BadUrl(_))
        ));
    }
}
