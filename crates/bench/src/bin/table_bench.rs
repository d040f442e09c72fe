//! Service-table lookup benchmark, side by side with the `prefix-trie` crate on IPv6.
//!
//! For each size it builds, in one process and on one thread:
//! * `serval` — `serval_table::PrefixMap` over serviceID rules shaped like real ones (see
//!   [`serval_rules`]), probed with full 256-bit IDs;
//! * `serval-indexed` — the same rules in a `PrefixMap::with_anchor_index()` (the trie with its
//!   anchor index, issue 14);
//! * `serval-v6` — the same `PrefixMap` holding the IPv6 rule set below (an IPv6 prefix placed at
//!   the top of a serviceID), for a like-for-like comparison;
//! * `prefix-trie-v6` — `prefix_trie::PrefixMap<Ipv6Net, u32>` over the same IPv6 rules.
//!
//! It reports build time, heap bytes per rule (allocations counted by a wrapping global
//! allocator, so both structures are measured the same way), and lookups per second, single and
//! (for `PrefixMap`) batched. Run it with:
//!
//! ```sh
//! cargo run --release -p serval-bench --bin table-bench -- --sizes 1000,100000,1000000
//! ```

use std::hint::black_box;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use clap::Parser;
use ipnet::Ipv6Net;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serval_table::PrefixMap;
use serval_wire::{ServiceId, ServicePrefix};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Service-table lookups per second vs the prefix-trie crate on IPv6.
#[derive(Debug, Parser)]
struct Args {
    /// Rule counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    sizes: Vec<usize>,
    /// Lookups per timed pass.
    #[arg(long, default_value_t = 4_000_000)]
    lookups: usize,
    /// Timed passes per measurement; the best is reported.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Lookups per call of `longest_match_batch`.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seed of the rule and key generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Structures to measure (serval, serval-indexed, serval-v6, prefix-trie-v6).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serval,serval-indexed,serval-v6,prefix-trie-v6"
    )]
    structures: Vec<String>,
}

/// One measured structure at one size.
struct Row {
    structure: &'static str,
    rules: usize,
    build: Duration,
    bytes_per_rule: f64,
    single: Rate,
    batched: Option<Rate>,
    /// Share of keys whose longest match is longer than the default rule, in percent.
    hit_pct: usize,
}

fn main() {
    let args = Args::parse();
    println!(
        "| structure | rules | build | heap bytes/rule | single lookups/s | batched lookups/s (batch {}) | single per CPU-s | batched per CPU-s | hit rate |",
        args.batch
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &args.sizes {
        let mut rng = SmallRng::seed_from_u64(args.seed ^ n as u64);
        let want = |s: &str| args.structures.iter().any(|x| x == s);
        let (rules, keys) = serval_rules(&mut rng, n, args.lookups);
        if want("serval") {
            print_row(&measure_serval("serval", &rules, &keys, &args));
        }
        if want("serval-indexed") {
            print_row(&measure_serval("serval-indexed", &rules, &keys, &args));
        }
        drop((rules, keys));
        if !want("serval-v6") && !want("prefix-trie-v6") {
            continue;
        }

        let (v6_rules, v6_keys) = ipv6_rules(&mut rng, n, args.lookups);
        let as_ids: Vec<(ServicePrefix, u32)> = v6_rules
            .iter()
            .map(|(net, v)| (v6_to_prefix(net), *v))
            .collect();
        let id_keys: Vec<ServiceId> = v6_keys.iter().map(|a| v6_to_id(*a)).collect();
        if want("serval-v6") {
            print_row(&measure_serval("serval-v6", &as_ids, &id_keys, &args));
        }
        drop((as_ids, id_keys));
        if want("prefix-trie-v6") {
            print_row(&measure_prefix_trie(&v6_rules, &v6_keys, &args));
        }
    }
}

fn print_row(r: &Row) {
    let m = |x: f64| format!("{:.1} M", x / 1e6);
    let batched = r.batched.map_or_else(|| "—".to_owned(), |b| m(b.wall));
    let batched_cpu = r.batched.map_or_else(|| "—".to_owned(), |b| m(b.cpu));
    println!(
        "| {} | {} | {:.1} ms | {:.0} | {} | {} | {} | {} | {}% |",
        r.structure,
        r.rules,
        r.build.as_secs_f64() * 1e3,
        r.bytes_per_rule,
        m(r.single.wall),
        batched,
        m(r.single.cpu),
        batched_cpu,
        r.hit_pct,
    );
}

/// Rules shaped like a real service table: a default rule, then names of several depths under a
/// skewed set of top-level domains, as domain prefixes (`NAME/*`) and exact IDs, plus about 10% of
/// prefixes cut at arbitrary lengths. Keys are full IDs: 90% of names under some rule, 10% random.
fn serval_rules(
    rng: &mut SmallRng,
    n: usize,
    lookups: usize,
) -> (Vec<(ServicePrefix, u32)>, Vec<ServiceId>) {
    const TLDS: usize = 200;
    let mut rules = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    rules.push((ServicePrefix::DEFAULT, 0u32));
    while rules.len() < n {
        // Skewed TLD choice: half the names under the first three.
        let tld = if rng.random_bool(0.5) {
            rng.random_range(0..3)
        } else {
            rng.random_range(0..TLDS)
        };
        let domain = format!("d{}.t{tld}", rng.random_range(0..(n as u64 * 4)));
        let depth_roll: f64 = rng.random();
        let value = rules.len() as u32;
        let (prefix, name) = if depth_roll < 0.35 {
            // example.com/*
            (domain_prefix(&domain), format!("www.{domain}"))
        } else if depth_roll < 0.65 {
            // exact www.example.com
            let name = format!("s{}.{domain}", rng.random_range(0..16));
            (ServicePrefix::exact(name_id(&name)), name)
        } else if depth_roll < 0.80 {
            // eu.example.com/* and a name under it
            let sub = format!("r{}.{domain}", rng.random_range(0..8));
            let name = format!("api.{sub}");
            (domain_prefix(&sub), name)
        } else if depth_roll < 0.90 {
            // deep exact names: a.b.c.example.com
            let name = format!(
                "x{}.y{}.{domain}",
                rng.random_range(0..4),
                rng.random_range(0..4)
            );
            (ServicePrefix::exact(name_id(&name)), name)
        } else {
            // arbitrary length
            let name = format!("z{}.{domain}", rng.random_range(0..4));
            let len = rng.random_range(1..=256u16);
            (ServicePrefix::new(name_id(&name), len), name)
        };
        rules.push((prefix, value));
        names.push(name_id(&name));
    }
    let keys = (0..lookups)
        .map(|_| {
            if rng.random_bool(0.9) && !names.is_empty() {
                names[rng.random_range(0..names.len())]
            } else {
                ServiceId(rng.random())
            }
        })
        .collect();
    (rules, keys)
}

fn name_id(name: &str) -> ServiceId {
    ServiceId::from_name(name).expect("generated names are valid")
}

fn domain_prefix(domain: &str) -> ServicePrefix {
    ServicePrefix::from_domain(domain).expect("generated names are valid")
}

/// IPv6 rules with a BGP-like length mix in 2000::/3, and keys: 90% under a rule, 10% random.
fn ipv6_rules(
    rng: &mut SmallRng,
    n: usize,
    lookups: usize,
) -> (Vec<(Ipv6Net, u32)>, Vec<Ipv6Addr>) {
    const LENS: [(u8, f64); 7] = [
        (32, 0.10),
        (40, 0.10),
        (44, 0.10),
        (48, 0.50),
        (56, 0.05),
        (64, 0.10),
        (128, 0.05),
    ];
    let mut rules = Vec::with_capacity(n);
    rules.push((Ipv6Net::default(), 0u32));
    while rules.len() < n {
        let mut roll: f64 = rng.random();
        let mut len = 48;
        for (l, p) in LENS {
            if roll < p {
                len = l;
                break;
            }
            roll -= p;
        }
        let bits: u128 = (rng.random::<u128>() >> 3) | (1u128 << 125);
        let net = Ipv6Net::new(Ipv6Addr::from(bits), len)
            .expect("length is at most 128")
            .trunc();
        let value = rules.len() as u32;
        rules.push((net, value));
    }
    let keys = (0..lookups)
        .map(|_| {
            if rng.random_bool(0.9) {
                let (net, _) = rules[rng.random_range(0..rules.len())];
                let host: u128 = rng.random::<u128>()
                    & u128::MAX
                        .checked_shr(u32::from(net.prefix_len()))
                        .unwrap_or(0);
                Ipv6Addr::from(u128::from(net.network()) | host)
            } else {
                Ipv6Addr::from(rng.random::<u128>())
            }
        })
        .collect();
    (rules, keys)
}

/// An IPv6 address as the top 128 bits of a serviceID.
fn v6_to_id(a: Ipv6Addr) -> ServiceId {
    let bits = u128::from(a);
    ServiceId::from_words([(bits >> 64) as u64, bits as u64, 0, 0])
}

fn v6_to_prefix(net: &Ipv6Net) -> ServicePrefix {
    ServicePrefix::new(v6_to_id(net.network()), u16::from(net.prefix_len()))
}

/// Nanoseconds the calling thread has run on a CPU, from `/proc/thread-self/schedstat` (0 if
/// unreadable). On a machine shared with other work this is the fairer clock: time spent
/// waiting for a CPU is not counted.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A rate measured by wall clock and by the thread's CPU time (best pass of each).
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

/// Best-of-`passes` lookups per second of `f`, which runs `lookups` lookups and returns a checksum.
fn rate(args: &Args, lookups: usize, mut f: impl FnMut() -> u64) -> Rate {
    let mut best = Duration::MAX;
    let mut best_cpu = u64::MAX;
    for _ in 0..args.passes {
        let c = thread_cpu_ns();
        let t = Instant::now();
        black_box(f());
        best = best.min(t.elapsed());
        best_cpu = best_cpu.min(thread_cpu_ns().saturating_sub(c).max(1));
    }
    Rate {
        wall: lookups as f64 / best.as_secs_f64(),
        cpu: lookups as f64 / (best_cpu as f64 / 1e9),
    }
}

fn measure_serval(
    structure: &'static str,
    rules: &[(ServicePrefix, u32)],
    keys: &[ServiceId],
    args: &Args,
) -> Row {
    let region = Region::new(GLOBAL);
    let t = Instant::now();
    let mut map = if structure == "serval-indexed" {
        PrefixMap::with_anchor_index()
    } else {
        PrefixMap::new()
    };
    // One batch, as a router loads its table (ServiceTable::update): the anchor index, if
    // any, is built once at the end, with no marked anchors.
    map.extend(rules.iter().copied());
    let build = t.elapsed();
    let stats = region.change();
    let heap = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;

    let hits = keys
        .iter()
        .filter(|k| map.longest_match(k).is_some_and(|(p, _)| !p.is_default()))
        .count();
    let single = rate(args, keys.len(), || {
        let mut sum = 0u64;
        for k in keys {
            if let Some((_, v)) = map.longest_match(black_box(k)) {
                sum = sum.wrapping_add(u64::from(*v));
            }
        }
        sum
    });
    let mut out = vec![None; args.batch];
    let batched = rate(args, keys.len(), || {
        let mut sum = 0u64;
        for chunk in keys.chunks(args.batch) {
            let out = &mut out[..chunk.len()];
            map.longest_match_batch(black_box(chunk), out);
            for (_, v) in out.iter().flatten() {
                sum = sum.wrapping_add(u64::from(**v));
            }
        }
        sum
    });
    Row {
        structure,
        rules: map.len(),
        build,
        bytes_per_rule: heap / map.len().max(1) as f64,
        single,
        batched: Some(batched),
        hit_pct: 100 * hits / keys.len().max(1),
    }
}

fn measure_prefix_trie(rules: &[(Ipv6Net, u32)], keys: &[Ipv6Addr], args: &Args) -> Row {
    let region = Region::new(GLOBAL);
    let t = Instant::now();
    let mut map = prefix_trie::PrefixMap::<Ipv6Net, u32>::new();
    for (p, v) in rules {
        map.insert(*p, *v);
    }
    let build = t.elapsed();
    let stats = region.change();
    let heap = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;

    let host = |a: &Ipv6Addr| Ipv6Net::new(*a, 128).expect("/128 is valid");
    let hits = keys
        .iter()
        .filter(|k| {
            map.get_lpm(&host(k))
                .is_some_and(|(p, _)| p.prefix_len() > 0)
        })
        .count();
    let single = rate(args, keys.len(), || {
        let mut sum = 0u64;
        for k in keys {
            if let Some((_, v)) = map.get_lpm(&host(black_box(k))) {
                sum = sum.wrapping_add(u64::from(*v));
            }
        }
        sum
    });
    Row {
        structure: "prefix-trie-v6",
        rules: map.len(),
        build,
        bytes_per_rule: heap / map.len().max(1) as f64,
        single,
        batched: None,
        hit_pct: 100 * hits / keys.len().max(1),
    }
}
