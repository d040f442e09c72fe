//! The service table: longest match, priorities, weighted consistent choice, snapshots.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashMap;

use serval_table::{Action, ListenerId, ServiceTable, TableError, Target};
use serval_wire::{Locator, ServiceId, ServicePrefix};

fn fwd(i: u8) -> Action {
    let loc: Locator = format!("192.0.2.{i}:54324").parse().unwrap();
    Action::Forward(loc)
}

fn prefix(text: &str) -> ServicePrefix {
    ServicePrefix::parse(text).unwrap()
}

fn name(text: &str) -> ServiceId {
    ServiceId::from_name(text).unwrap()
}

/// The action chosen for `id` under each flow key in `keys`.
fn choices(table: &ServiceTable, id: &ServiceId, keys: std::ops::Range<u64>) -> Vec<Action> {
    let snap = table.snapshot();
    keys.map(|k| snap.resolve(id, k).unwrap().action).collect()
}

#[test]
fn longest_prefix_wins() {
    let t = ServiceTable::new();
    t.add_target(ServicePrefix::DEFAULT, Target::new(fwd(1), 0, 1))
        .unwrap();
    t.add_target(prefix("example.com/*"), Target::new(fwd(2), 0, 1))
        .unwrap();
    t.add_target(
        prefix("web.example.com"),
        Target::new(Action::Demux(ListenerId(7)), 0, 1),
    )
    .unwrap();
    let s = t.snapshot();
    let r = s.resolve(&name("web.example.com"), 1).unwrap();
    assert_eq!(r.prefix, prefix("web.example.com"));
    assert_eq!(r.action, Action::Demux(ListenerId(7)));
    let r = s.resolve(&name("mail.example.com"), 1).unwrap();
    assert_eq!((r.prefix.len(), r.action), (64, fwd(2)));
    let r = s.resolve(&name("example.org"), 1).unwrap();
    assert_eq!((r.prefix, r.action), (ServicePrefix::DEFAULT, fwd(1)));
    assert_eq!(s.len(), 3);
    let (p, targets) = s.lookup(&name("a.b.example.com")).unwrap();
    assert_eq!((p.len(), targets.len()), (64, 1));
}

#[test]
fn empty_table_resolves_nothing() {
    let t = ServiceTable::new();
    assert!(t.snapshot().is_empty());
    assert_eq!(t.snapshot().resolve(&ServiceId::ZERO, 0), None);
}

#[test]
fn only_the_highest_priority_is_chosen() {
    let t = ServiceTable::new();
    let p = prefix("svc/*");
    let id = name("x.svc");
    t.update(|tx| {
        tx.add_target(p, Target::new(fwd(1), 1, 100))?;
        tx.add_target(p, Target::new(fwd(2), 1, 100))?;
        tx.add_target(p, Target::new(fwd(3), 5, 1))
    })
    .unwrap();
    assert!(choices(&t, &id, 0..1000).iter().all(|a| *a == fwd(3)));
    // Demoting the preferred target below the others is an update, not a second copy.
    t.add_target(p, Target::new(fwd(3), 0, 1)).unwrap();
    assert_eq!(t.snapshot().get(&p).unwrap().len(), 3);
    let picks = choices(&t, &id, 0..1000);
    assert!(picks.iter().all(|a| *a == fwd(1) || *a == fwd(2)));
    assert!(picks.contains(&fwd(1)) && picks.contains(&fwd(2)));
    // Entries list the highest priority first.
    let pr: Vec<u32> = t
        .snapshot()
        .get(&p)
        .unwrap()
        .iter()
        .map(|t| t.priority)
        .collect();
    assert_eq!(pr, [1, 1, 0]);
}

#[test]
fn weights_spread_flows_in_proportion() {
    let t = ServiceTable::new();
    let p = prefix("svc/*");
    for (i, w) in [(1, 1), (2, 2), (3, 3)] {
        t.add_target(p, Target::new(fwd(i), 0, w)).unwrap();
    }
    let n = 30_000u64;
    let mut count: HashMap<Action, u64> = HashMap::new();
    for a in choices(&t, &name("svc"), 0..n) {
        *count.entry(a).or_default() += 1;
    }
    for (i, w) in [(1u8, 1u64), (2, 2), (3, 3)] {
        let want = n * w / 6;
        let got = count[&fwd(i)];
        // Binomial standard deviation is at most ~82 here; allow 6 of them. The keys are fixed,
        // so this is deterministic: it checks the hash has no gross bias, not luck.
        assert!(
            got.abs_diff(want) < 500,
            "weight {w}: {got} flows, expected ~{want}"
        );
    }
}

#[test]
fn removing_a_target_moves_only_its_flows() {
    let t = ServiceTable::new();
    let p = prefix("svc/*");
    let id = name("svc");
    for i in 1..=5 {
        t.add_target(p, Target::new(fwd(i), 0, u32::from(i)))
            .unwrap();
    }
    let before = choices(&t, &id, 0..10_000);
    assert!(t.remove_target(&p, &fwd(3)));
    assert!(!t.remove_target(&p, &fwd(3)));
    let after = choices(&t, &id, 0..10_000);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if *b == fwd(3) {
            assert_ne!(*a, fwd(3));
            moved += 1;
        } else {
            assert_eq!(a, b, "a flow that was not on the removed target moved");
        }
    }
    assert!(moved > 0);
    // Adding it back restores exactly the old choices.
    t.add_target(p, Target::new(fwd(3), 0, 3)).unwrap();
    assert_eq!(choices(&t, &id, 0..10_000), before);
}

#[test]
fn insertion_order_does_not_matter() {
    let targets: Vec<Target> = (1..=6)
        .map(|i| Target::new(fwd(i), u32::from(i % 2), u32::from(i)))
        .chain([Target::new(Action::Demux(ListenerId(9)), 1, 4)])
        .collect();
    let p = prefix("svc/*");
    let a = ServiceTable::new();
    let b = ServiceTable::new();
    for t in &targets {
        a.add_target(p, *t).unwrap();
    }
    b.update(|tx| {
        for t in targets.iter().rev() {
            tx.add_target(p, *t).unwrap();
        }
    });
    let id = name("svc");
    assert_eq!(choices(&a, &id, 0..10_000), choices(&b, &id, 0..10_000));
    assert_eq!(a.snapshot().get(&p), b.snapshot().get(&p));
}

#[test]
fn zero_weight_is_refused_and_changes_nothing() {
    let t = ServiceTable::new();
    let p = prefix("svc/*");
    assert_eq!(
        t.add_target(p, Target::new(fwd(1), 0, 0)),
        Err(TableError::ZeroWeight)
    );
    assert!(t.snapshot().is_empty());
    t.add_target(p, Target::new(fwd(1), 0, 1)).unwrap();
    assert_eq!(
        t.add_target(p, Target::new(fwd(1), 0, 0)),
        Err(TableError::ZeroWeight)
    );
    assert_eq!(t.snapshot().get(&p).unwrap()[0].weight, 1);
}

#[test]
fn last_target_removes_the_entry() {
    let t = ServiceTable::new();
    let p = prefix("svc/*");
    t.add_target(p, Target::new(Action::Drop, 0, 1)).unwrap();
    t.add_target(p, Target::new(Action::Delay, 0, 1)).unwrap();
    assert!(t.remove_target(&p, &Action::Drop));
    assert_eq!(t.snapshot().len(), 1);
    assert!(t.remove_target(&p, &Action::Delay));
    assert!(t.snapshot().is_empty());
    assert!(!t.remove_prefix(&p));
    t.add_target(p, Target::new(Action::Drop, 0, 1)).unwrap();
    assert!(t.remove_prefix(&p));
    assert!(t.snapshot().get(&p).is_none());
}

#[test]
fn snapshots_do_not_change_and_updates_are_atomic() {
    let t = ServiceTable::new();
    let before = t.snapshot();
    let (a, b) = (prefix("a/*"), prefix("b/*"));
    t.update(|tx| {
        tx.add_target(a, Target::new(fwd(1), 0, 1)).unwrap();
        assert_eq!(tx.targets(&a).map(<[Target]>::len), Some(1));
        tx.add_target(b, Target::new(fwd(2), 0, 1)).unwrap();
        assert_eq!(tx.len(), 2);
    });
    assert!(before.is_empty());
    let after = t.snapshot();
    assert_eq!(after.len(), 2);
    t.remove_prefix(&a);
    assert_eq!(after.len(), 2);
    let listed: Vec<ServicePrefix> = after.entries().map(|(p, _)| p).collect();
    assert_eq!(listed, [a.min(b), a.max(b)], "entries come in prefix order");
}

#[test]
fn a_panicking_update_publishes_nothing() {
    let t = ServiceTable::new();
    let p = prefix("svc/*");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.update(|tx| {
            tx.add_target(p, Target::new(fwd(1), 0, 1)).unwrap();
            panic!("writer failed half-way");
        })
    }));
    assert!(result.is_err());
    assert!(t.snapshot().is_empty());
    // The table stays usable.
    t.add_target(p, Target::new(fwd(1), 0, 1)).unwrap();
    assert_eq!(t.snapshot().len(), 1);
}

/// Readers run while a writer publishes batches; each batch adds (or removes) a pair of prefixes
/// together, so every snapshot must hold both or neither, and a held snapshot never changes.
#[test]
fn concurrent_readers_see_whole_batches() {
    const ROUNDS: u32 = 300;
    let t = ServiceTable::new();
    let pair = |i: u32| {
        let mut x = [0u8; 32];
        x[..4].copy_from_slice(&i.to_be_bytes());
        let mut y = x;
        y[31] = 1;
        (
            ServicePrefix::new(ServiceId(x), 32),
            ServicePrefix::exact(ServiceId(y)),
        )
    };
    std::thread::scope(|s| {
        for r in 0..3u64 {
            let t = &t;
            s.spawn(move || {
                let mut seen_max = 0;
                for k in 0..2_000u64 {
                    let snap = t.snapshot();
                    let n = snap.len();
                    assert_eq!(n % 2, 0, "a snapshot holds half of a batch");
                    for (p, targets) in snap.entries() {
                        if p.len() == 32 {
                            let (_, exact) =
                                pair(u32::from_be_bytes(p.id().0[..4].try_into().unwrap()));
                            assert!(snap.get(&exact).is_some(), "{p} without its pair");
                        }
                        assert!(!targets.is_empty());
                    }
                    let id = pair((k % u64::from(ROUNDS)) as u32).1.id().to_owned();
                    let first = snap.resolve(&id, k ^ r);
                    assert_eq!(snap.len(), n, "a snapshot changed under its reader");
                    assert_eq!(snap.resolve(&id, k ^ r), first);
                    seen_max = seen_max.max(n);
                }
                seen_max
            });
        }
        for i in 0..ROUNDS {
            let (a, b) = pair(i);
            t.update(|tx| {
                tx.add_target(a, Target::new(fwd(1), 0, 1)).unwrap();
                tx.add_target(b, Target::new(fwd(2), 0, 1)).unwrap();
                if i % 3 == 0 && i > 0 {
                    let (c, d) = pair(i - 1);
                    tx.remove_prefix(&c);
                    tx.remove_prefix(&d);
                }
            });
        }
    });
    assert_eq!(t.snapshot().len() % 2, 0);
}

#[test]
fn an_anchor_index_turned_on_later_resolves_as_the_plain_table() {
    // Two tables with the same 2 000 rules (domains and exact names, an `/0` default); one
    // turns its anchor index on after the load and keeps changing. Every name resolves the same
    // through both, before and after the changes.
    let plain = ServiceTable::new();
    let indexed = ServiceTable::new();
    let names: Vec<String> = (0..1000)
        .map(|i| format!("s{}.d{}.test", i % 7, i))
        .collect();
    for t in [&plain, &indexed] {
        t.update(|tx| {
            tx.add_target(ServicePrefix::DEFAULT, Target::new(fwd(1), 0, 1))
                .unwrap();
            for (i, n) in names.iter().enumerate() {
                let domain = n.split_once('.').unwrap().1;
                tx.add_target(prefix(&format!("{domain}/*")), Target::new(fwd(2), 0, 1))
                    .unwrap();
                if i % 2 == 0 {
                    tx.add_target(prefix(n), Target::new(fwd(3), 0, 1)).unwrap();
                }
            }
        });
    }
    assert!(!indexed.snapshot().has_anchor_index());
    indexed.set_anchor_index(true);
    assert!(indexed.snapshot().has_anchor_index());
    let agree = |what: &str| {
        let (a, b) = (plain.snapshot(), indexed.snapshot());
        for n in &names {
            let id = name(n);
            assert_eq!(a.resolve(&id, 9), b.resolve(&id, 9), "{what}: {n}");
        }
        assert_eq!(
            a.resolve(&name("other.example"), 9),
            b.resolve(&name("other.example"), 9)
        );
    };
    agree("after turning it on");
    for t in [&plain, &indexed] {
        for n in names.iter().step_by(3) {
            t.add_target(prefix(n), Target::new(fwd(4), 0, 2)).unwrap();
        }
        for n in names.iter().step_by(5) {
            t.remove_prefix(&prefix(n));
        }
    }
    agree("after changes");
    assert!(indexed.snapshot().has_anchor_index());
}

/// A table of names under a few domains, each with up to four targets of two priorities and
/// varied weights, plus domain rules and a default for some.
fn varied_table(anchor_index: bool) -> ServiceTable {
    let t = if anchor_index {
        ServiceTable::with_anchor_index()
    } else {
        ServiceTable::new()
    };
    t.update(|tx| {
        for d in 0..4 {
            tx.add_target(prefix(&format!("d{d}.test/*")), Target::new(fwd(200), 1, 1))?;
        }
        for i in 0..3000u32 {
            let p = ServicePrefix::exact(name(&format!("s{i}.d{}.test", i % 5)));
            for k in 0..=(i % 4) {
                let t = Target::new(fwd((i + k) as u8), k % 2, 1 + (i * 7 + k) % 5);
                tx.add_target(p, t)?;
            }
        }
        Ok::<_, TableError>(())
    })
    .unwrap();
    t
}

#[test]
fn resolve_batch_agrees_with_resolve() {
    for anchor_index in [false, true] {
        let t = varied_table(anchor_index);
        let snap = t.snapshot();
        assert_eq!(snap.has_anchor_index(), anchor_index);
        // Exact names, names only a domain rule covers (d0..d3), names nothing covers (d4,
        // d9), every one under several flow keys.
        let ids: Vec<ServiceId> = (0..3400u32)
            .map(|i| name(&format!("s{}.d{}.test", i % 3200, i % 10)))
            .collect();
        let keys: Vec<u64> = (0..ids.len() as u64)
            .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for size in [1, 2, 63, 64, 65, 1000, ids.len()] {
            let mut out = vec![None; ids.len()];
            for ((i, k), o) in ids
                .chunks(size)
                .zip(keys.chunks(size))
                .zip(out.chunks_mut(size))
            {
                snap.resolve_batch(i, k, o);
            }
            for ((id, k), o) in ids.iter().zip(&keys).zip(&out) {
                assert_eq!(*o, snap.resolve(id, *k), "{id} {k} (batches of {size})");
            }
            assert!(
                out.iter().any(Option::is_none),
                "some names resolve to nothing"
            );
            assert!(
                out.iter().flatten().any(|r| r.prefix.len() == 64),
                "some resolve through a domain rule"
            );
        }
    }
}

#[test]
#[should_panic(expected = "differ in length")]
fn resolve_batch_rejects_mismatched_lengths() {
    ServiceTable::new()
        .snapshot()
        .resolve_batch(&[ServiceId::ZERO], &[1, 2], &mut [None]);
}

#[test]
fn a_snapshot_knows_whether_it_is_current() {
    let t = ServiceTable::new();
    let before = t.snapshot();
    assert!(before.is_current(&t));
    t.add_target(prefix("x.test"), Target::new(fwd(1), 0, 1))
        .unwrap();
    assert!(!before.is_current(&t));
    assert!(t.snapshot().is_current(&t));
    assert!(!t.snapshot().is_current(&ServiceTable::new()));
}
