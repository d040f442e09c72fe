//! The name → serviceID mapping at scale: no two of a million names share an ID, and every
//! domain prefix covers exactly the names under it, at every level.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use proptest::prelude::*;
use serval_wire::{ServiceId, ServicePrefix};

/// Inserts the IDs of `names` and fails on the first two names that share one.
fn assert_distinct(names: impl Iterator<Item = String>) -> usize {
    let mut seen = HashSet::new();
    let mut n = 0;
    for name in names {
        let id = ServiceId::from_name(&name).unwrap();
        assert!(
            seen.insert(id),
            "{name} shares its ID {id} with an earlier name"
        );
        n += 1;
    }
    n
}

#[test]
fn a_million_names_under_one_domain_have_distinct_ids() {
    // Version 1 gave `svc{i}.test` 32 bits for the label: 8 collisions in 300 000.
    let n = assert_distinct((0..1_000_000).map(|i| format!("svc{i}.test")));
    assert_eq!(n, 1_000_000);
}

#[test]
fn a_million_names_over_many_domains_and_depths_have_distinct_ids() {
    // 1000 domains × 1000 names, at depths 2 to 5, with labels repeated across domains (the
    // same leaf label under different parents must not collide either).
    let n = assert_distinct((0..1_000_000u32).map(|i| {
        let (dom, leaf) = (i / 1000, i % 1000);
        match i % 4 {
            0 => format!("s{leaf}.d{dom}"),
            1 => format!("s{leaf}.d{dom}.example"),
            2 => format!("api.s{leaf}.d{dom}.example"),
            _ => format!("v1.api.s{leaf}.d{dom}.example"),
        }
    }));
    assert_eq!(n, 1_000_000);
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?"
}

proptest! {
    /// For a name of up to 8 labels, the domain prefix of each of its suffixes (`a.b.c` →
    /// `c/*`, `b.c/*`, `a.b.c/*`) has 32 bits per label and contains the name's ID; the same
    /// prefix does not contain a sibling's ID (a name that differs in the label just below).
    #[test]
    fn every_level_of_a_name_is_a_prefix_of_its_id(
        labels in prop::collection::vec(label(), 1..=8),
        other in label(),
    ) {
        let name = labels.join(".");
        let id = ServiceId::from_name(&name).unwrap();
        for level in 1..=labels.len() {
            let domain = labels[labels.len() - level..].join(".");
            let prefix = ServicePrefix::from_domain(&domain).unwrap();
            prop_assert_eq!(usize::from(prefix.len()), 32 * level);
            prop_assert!(prefix.contains(&id), "{domain}/* does not contain {name}");
            prop_assert_eq!(ServicePrefix::parse(&format!("{domain}/*")).unwrap(), prefix);
            if level < labels.len() {
                // A sibling at the next level down: same domain, another label below it.
                let below = &labels[labels.len() - level - 1];
                if !below.eq_ignore_ascii_case(&other) {
                    let mut sibling = labels.clone();
                    let at = labels.len() - level - 1;
                    sibling[at] = other.clone();
                    let sib = ServiceId::from_name(&sibling.join(".")).unwrap();
                    prop_assert!(prefix.contains(&sib));
                    let deeper =
                        ServicePrefix::from_domain(&labels[at..].join(".")).unwrap();
                    prop_assert!(!deeper.contains(&sib), "{} collides", sibling.join("."));
                    prop_assert_ne!(sib, id);
                }
            }
        }
    }
}
