//! Keeping the router's service table equal to the registry (plus static rules).

use std::collections::HashMap;
use std::sync::Arc;

use serval_registry::{Change, Registration, RegistrationKey};
use serval_table::{Action, ServiceTable, TableTx, Target};
use serval_wire::ServicePrefix;

/// The registry's registrations as FORWARD targets in a service table, beside static rules.
///
/// A registration and a static rule with the same prefix and next hop share one target: the
/// registration's weight and priority apply while it lives, the static rule's again once it
/// is gone.
#[derive(Debug)]
pub(crate) struct TableSync {
    table: Arc<ServiceTable>,
    /// Hashed with foldhash: SipHash over a million 66-byte keys was a sixth of a cold start's
    /// table build. foldhash is seeded at random too, though it resists crafted keys less
    /// than SipHash; a router's registrations are bounded by its policy's limit.
    installed: Installed,
    statics: HashMap<(ServicePrefix, Action), Target>,
    /// Prefixes this router answers for (the ones it announces to a parent): while nothing
    /// else is registered at exactly such a prefix, a DROP target there makes SYNs for names
    /// under it that no instance serves get a NACK here, instead of climbing the default
    /// route to the parent, which would send them straight back (a loop, dropped silently).
    authoritative: std::collections::HashSet<ServicePrefix>,
    /// For each authoritative prefix: the summed weight of the registrations under it, by
    /// priority, so that a child router announces to its parent what it really holds.
    below: HashMap<ServicePrefix, std::collections::BTreeMap<u32, u64>>,
    /// Authoritative prefixes whose announcement (best priority, weight there) may have
    /// changed since [`TableSync::take_announcements`].
    announce_dirty: std::collections::HashSet<ServicePrefix>,
}

/// The registrations installed, by key.
type Installed = HashMap<RegistrationKey, Registration, foldhash::fast::RandomState>;

/// The DROP target of an authoritative prefix.
const AUTHORITY: Target = Target::new(Action::Drop, 0, 1);

fn target(r: &Registration) -> Target {
    Target::new(Action::Forward(r.locator), r.priority, r.weight.max(1))
}

impl TableSync {
    pub(crate) fn new(table: Arc<ServiceTable>) -> TableSync {
        TableSync {
            table,
            installed: Installed::default(),
            statics: HashMap::new(),
            authoritative: std::collections::HashSet::new(),
            below: HashMap::new(),
            announce_dirty: std::collections::HashSet::new(),
        }
    }

    /// Counts `r` (`sign` +1) or uncounts it (-1) in the aggregate of every authoritative
    /// prefix that covers it (a registration at exactly the prefix included).
    fn count(&mut self, r: &Registration, sign: i64) {
        for p in &self.authoritative {
            if !p.covers(&r.prefix) {
                continue;
            }
            let sums = self.below.entry(*p).or_default();
            let w = sums.entry(r.priority).or_insert(0);
            *w = w.saturating_add_signed(sign * i64::from(r.weight.max(1)));
            if *w == 0 {
                sums.remove(&r.priority);
            }
            self.announce_dirty.insert(*p);
        }
    }

    /// What to announce for each authoritative prefix whose aggregate changed since the last
    /// call: `(prefix, weight, priority)`, the summed weight of the registrations under it at
    /// their best priority (capped at `u32::MAX`), or weight 1 at priority 0 while it holds
    /// none. A parent then spreads SYNs over its children as it would over their instances.
    pub(crate) fn take_announcements(&mut self) -> Vec<(ServicePrefix, u32, u32)> {
        let mut out: Vec<(ServicePrefix, u32, u32)> = self
            .announce_dirty
            .drain()
            .map(
                |p| match self.below.get(&p).and_then(|s| s.last_key_value()) {
                    Some((&priority, &weight)) => {
                        (p, u32::try_from(weight).unwrap_or(u32::MAX), priority)
                    }
                    None => (p, 1, 0),
                },
            )
            .collect();
        out.sort_unstable();
        out
    }

    /// Makes this router answer for `prefix`: see [`TableSync::authoritative`].
    pub(crate) fn add_authoritative(&mut self, prefix: ServicePrefix) {
        self.authoritative.insert(prefix);
        let mut sums = std::collections::BTreeMap::<u32, u64>::new();
        for r in self.installed.values().filter(|r| prefix.covers(&r.prefix)) {
            *sums.entry(r.priority).or_insert(0) += u64::from(r.weight.max(1));
        }
        self.below.insert(prefix, sums);
        self.announce_dirty.insert(prefix);
        self.fix_authority(&prefix);
    }

    /// Keeps the DROP target of an authoritative `prefix` there exactly while no other
    /// target is (a registration at exactly the prefix must not share its flows with a DROP).
    fn fix_authority(&self, prefix: &ServicePrefix) {
        if !self.authoritative.contains(prefix) {
            return;
        }
        let others = self
            .table
            .snapshot()
            .get(prefix)
            .is_some_and(|ts| ts.iter().any(|t| t.action != Action::Drop));
        if others {
            if !self.statics.contains_key(&(*prefix, Action::Drop)) {
                self.table.remove_target(prefix, &Action::Drop);
            }
        } else if self
            .table
            .snapshot()
            .get(prefix)
            .is_none_or(<[Target]>::is_empty)
        {
            let _ = self.table.add_target(*prefix, AUTHORITY);
        }
    }

    /// Whether the registry holds `key` (as far as this replica knows).
    pub(crate) fn contains(&self, key: &RegistrationKey) -> bool {
        self.installed.contains_key(key)
    }

    /// Registrations installed.
    pub(crate) fn len(&self) -> usize {
        self.installed.len()
    }

    /// Removes the target of `key` in `tx`, putting back a static rule it shadowed.
    fn uninstall(
        statics: &HashMap<(ServicePrefix, Action), Target>,
        tx: &mut TableTx,
        key: &RegistrationKey,
    ) {
        let action = Action::Forward(key.locator);
        match statics.get(&(key.prefix, action)) {
            Some(t) => {
                let _ = tx.add_target(key.prefix, *t);
            }
            None => {
                tx.remove_target(&key.prefix, &action);
            }
        }
    }

    /// Applies one change; returns the registrations it removed.
    pub(crate) fn apply(&mut self, change: Change) -> Vec<RegistrationKey> {
        match change {
            Change::Put(r) => {
                match self.installed.insert(r.key(), r) {
                    Some(old) if old == r => {}
                    Some(old) => {
                        self.count(&old, -1);
                        self.count(&r, 1);
                    }
                    None => self.count(&r, 1),
                }
                let _ = self.table.add_target(r.prefix, target(&r));
                self.fix_authority(&r.prefix);
                Vec::new()
            }
            Change::Delete(key) => {
                let Some(old) = self.installed.remove(&key) else {
                    return Vec::new();
                };
                self.count(&old, -1);
                let statics = &self.statics;
                self.table
                    .update(|tx| TableSync::uninstall(statics, tx, &key));
                self.fix_authority(&key.prefix);
                vec![key]
            }
            Change::Reset(mut all) => {
                // Installed in key order, so that consecutive inserts walk the same trie path:
                // several times faster than hash order at 1M (etcd lists in key order already).
                if !all.is_sorted_by_key(Registration::key) {
                    all.sort_unstable_by_key(Registration::key);
                }
                let new: Installed = all.iter().map(|r| (r.key(), *r)).collect();
                let gone: Vec<RegistrationKey> = self
                    .installed
                    .keys()
                    .filter(|k| !new.contains_key(k))
                    .copied()
                    .collect();
                let (statics, installed) = (&self.statics, &self.installed);
                // One batch: lookups see the old set or the new one, never half of each.
                self.table.update(|tx| {
                    for k in &gone {
                        TableSync::uninstall(statics, tx, k);
                    }
                    for r in &all {
                        if installed.get(&r.key()) != Some(r) {
                            let _ = tx.add_target(r.prefix, target(r));
                        }
                    }
                });
                self.installed = new;
                let authoritative: Vec<ServicePrefix> =
                    self.authoritative.iter().copied().collect();
                for p in authoritative {
                    // Recounted from the new set (and re-announced if that changed it).
                    self.add_authoritative(p);
                }
                gone
            }
        }
    }

    /// Adds a static rule (kept across registry resets).
    pub(crate) fn add_static(
        &mut self,
        prefix: ServicePrefix,
        t: Target,
    ) -> Result<(), serval_table::TableError> {
        let registered = matches!(t.action, Action::Forward(l)
            if self.installed.contains_key(&RegistrationKey { prefix, locator: l }));
        if !registered {
            self.table.add_target(prefix, t)?;
        } else if t.weight == 0 {
            return Err(serval_table::TableError::ZeroWeight);
        }
        self.statics.insert((prefix, t.action), t);
        self.fix_authority(&prefix);
        Ok(())
    }

    /// Removes a static rule; `false` if there was none. A registration with the same next
    /// hop keeps its target.
    pub(crate) fn remove_static(&mut self, prefix: ServicePrefix, action: Action) -> bool {
        if self.statics.remove(&(prefix, action)).is_none() {
            return false;
        }
        let registered = matches!(action, Action::Forward(l)
            if self.installed.contains_key(&RegistrationKey { prefix, locator: l }));
        if !registered {
            self.table.remove_target(&prefix, &action);
        }
        self.fix_authority(&prefix);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serval_wire::{Locator, ServiceId};

    fn reg(name: &str, port: u16, weight: u32) -> Registration {
        Registration {
            prefix: ServicePrefix::exact(ServiceId::from_name(name).unwrap()),
            locator: Locator::from(([127, 0, 0, 1], port)),
            weight,
            priority: 0,
        }
    }

    fn targets(t: &ServiceTable, r: &Registration) -> Vec<Target> {
        t.snapshot()
            .get(&r.prefix)
            .map(<[Target]>::to_vec)
            .unwrap_or_default()
    }

    #[test]
    fn announced_prefixes_carry_the_weight_held_at_the_best_priority() {
        let mut s = TableSync::new(Arc::new(ServiceTable::new()));
        let domain = ServicePrefix::from_domain("example.test").unwrap();
        s.add_authoritative(domain);
        assert_eq!(s.take_announcements(), [(domain, 1, 0)], "nothing held yet");
        let (a, b) = (reg("a.example.test", 1, 3), reg("b.example.test", 2, 2));
        s.apply(Change::Put(a));
        s.apply(Change::Put(b));
        s.apply(Change::Put(reg("other.test", 3, 50)));
        assert_eq!(s.take_announcements(), [(domain, 5, 0)]);
        // A refresh changes nothing; nothing to announce.
        s.apply(Change::Put(a));
        assert!(s.take_announcements().is_empty());
        // A higher priority wins alone; a reweight counts once.
        let hot = Registration {
            priority: 7,
            ..reg("c.example.test", 4, 4)
        };
        s.apply(Change::Put(hot));
        s.apply(Change::Put(Registration { weight: 9, ..hot }));
        assert_eq!(s.take_announcements(), [(domain, 9, 7)]);
        s.apply(Change::Delete(hot.key()));
        assert_eq!(s.take_announcements(), [(domain, 5, 0)]);
        // A reset recounts from the new set.
        s.apply(Change::Reset(vec![b]));
        assert_eq!(s.take_announcements(), [(domain, 2, 0)]);
    }

    #[test]
    fn puts_deletes_and_resets_keep_the_table_equal_to_the_registry() {
        let table = Arc::new(ServiceTable::new());
        let mut s = TableSync::new(table.clone());
        let (a, b, c) = (
            reg("a.test", 1, 1),
            reg("a.test", 2, 3),
            reg("c.test", 3, 1),
        );
        s.apply(Change::Put(a));
        s.apply(Change::Put(b));
        assert_eq!(targets(&table, &a).len(), 2);
        // A new weight replaces the target.
        s.apply(Change::Put(Registration { weight: 9, ..b }));
        assert!(targets(&table, &a).iter().any(|t| t.weight == 9));
        assert_eq!(s.apply(Change::Delete(a.key())), [a.key()]);
        assert_eq!(targets(&table, &a).len(), 1);
        // Deleting what is not there removes nothing.
        assert!(s.apply(Change::Delete(a.key())).is_empty());
        // A reset to {c}: b goes, c comes.
        assert_eq!(s.apply(Change::Reset(vec![c])), [b.key()]);
        assert!(targets(&table, &a).is_empty());
        assert_eq!(targets(&table, &c).len(), 1);
        assert_eq!(s.len(), 1);
        assert!(s.contains(&c.key()));
    }

    #[test]
    fn an_authoritative_prefix_drops_only_while_nothing_is_registered_at_it() {
        let table = Arc::new(ServiceTable::new());
        let mut s = TableSync::new(table.clone());
        let a = reg("a.test", 1, 5);
        s.add_authoritative(a.prefix);
        assert_eq!(targets(&table, &a), [AUTHORITY]);
        s.apply(Change::Put(a));
        assert_eq!(targets(&table, &a), [target(&a)]);
        s.apply(Change::Delete(a.key()));
        assert_eq!(targets(&table, &a), [AUTHORITY]);
        s.apply(Change::Reset(vec![a]));
        assert_eq!(targets(&table, &a), [target(&a)]);
        s.apply(Change::Reset(vec![]));
        assert_eq!(targets(&table, &a), [AUTHORITY]);
    }

    #[test]
    fn static_rules_survive_resets_and_come_back_after_a_registration_on_top() {
        let table = Arc::new(ServiceTable::new());
        let mut s = TableSync::new(table.clone());
        let a = reg("a.test", 1, 5);
        let fixed = Target::new(Action::Forward(a.locator), 0, 1);
        s.add_static(a.prefix, fixed).unwrap();
        s.apply(Change::Reset(vec![]));
        assert_eq!(targets(&table, &a), [fixed]);
        // A registration with the same next hop takes over, then gives it back.
        s.apply(Change::Put(a));
        assert_eq!(targets(&table, &a)[0].weight, 5);
        s.apply(Change::Delete(a.key()));
        assert_eq!(targets(&table, &a), [fixed]);
        // Removing the static rule while registered leaves the registration's target.
        s.apply(Change::Put(a));
        assert!(s.remove_static(a.prefix, fixed.action));
        assert_eq!(targets(&table, &a)[0].weight, 5);
        assert!(!s.remove_static(a.prefix, fixed.action));
        s.apply(Change::Reset(vec![]));
        assert!(targets(&table, &a).is_empty());
    }
}
