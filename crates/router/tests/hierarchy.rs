//! Router hierarchy on loopback: a child router announces its prefix to a parent router, so a
//! SYN for a name under it climbs from a client of the parent down to an instance registered
//! at the child (late binding at each hop), and the instance answers the client directly.
//! Names nobody serves fail fast with a NACK from the router that has no route, never a loop.
//! Every wait is bounded; no assertion depends on tight timing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::future::Future;
use std::time::Duration;

use serval::{Endpoint, LeaseConfig, Locator, RegistrationState, ServiceId, ServicePrefix};
use serval_router::{Policy, Router, RouterConfig, RouterError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};

fn svc(name: &str) -> ServiceId {
    ServiceId::from_name(name).unwrap()
}

fn exact(name: &str) -> ServicePrefix {
    ServicePrefix::exact(svc(name))
}

fn any_port() -> Locator {
    "127.0.0.1:0".parse().unwrap()
}

async fn endpoint() -> Endpoint {
    Endpoint::bind(&[any_port()]).await.unwrap()
}

async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn bounded<F: Future<Output = ()>>(f: F) {
    timeout(Duration::from_secs(60), f)
        .await
        .expect("test took over 60 s");
}

/// An instance serving `name` through `router`; echoes every stream.
async fn instance(router: Locator, name: &str) -> Endpoint {
    weighted_instance(router, name, 1).await
}

/// [`instance`] registered with `weight`.
async fn weighted_instance(router: Locator, name: &str, weight: u32) -> Endpoint {
    weighted_instance_with(router, name, weight, LeaseConfig::default()).await
}

/// [`weighted_instance`] with its own lease.
async fn weighted_instance_with(
    router: Locator,
    name: &str,
    weight: u32,
    lease: LeaseConfig,
) -> Endpoint {
    let ep = endpoint().await;
    ep.set_router_with(router, lease);
    let mut listener = ep.listen_weighted(exact(name), 0, weight).unwrap();
    tokio::spawn(async move {
        while let Ok(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    ep
}

fn registered(r: &Router, prefix: ServicePrefix) -> bool {
    r.registrations()
        .iter()
        .any(|l| l.registration.prefix == prefix)
}

/// The configuration of a child router accepting (and so announcing) `domain`, registered
/// with `parents` (the first, then the next if it stops answering).
fn child_config(domain: ServicePrefix, parents: Vec<Locator>) -> RouterConfig {
    let mut config = RouterConfig::new(vec![any_port()]);
    config.policy = Policy {
        accept: vec![domain],
        ..Policy::default()
    };
    config.with_parents(parents, Vec::new()).unwrap()
}

/// A parent router accepting everything, and a child accepting (and announcing, by default)
/// `example.test` with the parent as its parent, once the parent holds the announcement.
async fn parent_and_child() -> (Router, Router, ServicePrefix) {
    let parent = Router::bind(RouterConfig::new(vec![any_port()]))
        .await
        .unwrap();
    let domain = ServicePrefix::from_domain("example.test").unwrap();
    let config = child_config(domain, vec![parent.locators()[0]]);
    assert_eq!(config.announce, [domain]);
    let child = Router::bind(config).await.unwrap();
    wait_for(Duration::from_secs(5), "the child's announcement", || {
        registered(&parent, domain)
    })
    .await;
    // The parent sees the child router's locator as the target.
    let at_parent: Vec<Locator> = parent
        .registrations()
        .iter()
        .map(|l| l.registration.locator)
        .collect();
    assert_eq!(at_parent, child.locators());
    wait_registered_at_parent(&child, Duration::from_secs(5)).await;
    (parent, child, domain)
}

/// Waits until `child` knows each of its announcements is registered at its parent (the
/// parent's table has one as soon as the REGISTER arrives; the child when the answer does).
async fn wait_registered_at_parent(child: &Router, within: Duration) {
    wait_for(within, "the child's registration state", || {
        child
            .parent_registrations()
            .iter()
            .all(|s| matches!(s.state, RegistrationState::Registered { .. }))
    })
    .await;
}

async fn echo_once(client: &Endpoint, name: &str) -> Locator {
    let mut s = client.connect(svc(name)).await.unwrap();
    s.write_all(b"hop").await.unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hop");
    s.peer_locator().unwrap()
}

async fn fails_fast(client: &Endpoint, name: &str) {
    let start = Instant::now();
    let e = client.connect(svc(name)).await.unwrap_err();
    assert!(e.to_string().contains("no route to service"), "{e}");
    // A NACK, not the connect timeout.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{name}: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syn_descends_from_the_parent_through_the_child_to_the_instance() {
    bounded(async {
        let (parent, child, _) = parent_and_child().await;
        let server = instance(child.locators()[0], "web.example.test").await;
        wait_for(Duration::from_secs(5), "the instance at the child", || {
            registered(&child, exact("web.example.test"))
        })
        .await;
        // Only the child's prefix climbed, not the instance.
        assert!(!registered(&parent, exact("web.example.test")));
        let client = endpoint().await;
        client.set_default_route(parent.locators()[0]);
        let peer = echo_once(&client, "web.example.test").await;
        // The instance answered the client directly.
        assert_eq!(peer, server.local_locators()[0]);
        // Each router forwarded it (twice only if the SYN was retransmitted).
        assert!((1..=2).contains(&parent.stats().syns_forwarded));
        assert!((1..=2).contains(&child.stats().syns_forwarded));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_child_climbs_to_the_parent_for_other_names() {
    bounded(async {
        let (parent, child, _) = parent_and_child().await;
        let server = instance(parent.locators()[0], "api.other.test").await;
        wait_for(Duration::from_secs(5), "the instance at the parent", || {
            registered(&parent, exact("api.other.test"))
        })
        .await;
        let client = endpoint().await;
        client.set_default_route(child.locators()[0]);
        let peer = echo_once(&client, "api.other.test").await;
        assert_eq!(peer, server.local_locators()[0]);
        assert!((1..=2).contains(&child.stats().syns_forwarded));
        assert!((1..=2).contains(&parent.stats().syns_forwarded));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_nobody_serves_are_nacked_by_the_router_without_a_route() {
    bounded(async {
        let (parent, child, _) = parent_and_child().await;
        let via_child = endpoint().await;
        via_child.set_default_route(child.locators()[0]);
        let via_parent = endpoint().await;
        via_parent.set_default_route(parent.locators()[0]);

        // Counts are compared before and after each attempt; a SYN retransmitted on a loaded
        // machine may be counted twice, so the checks are "moved" or "did not move".
        let (p0, c0) = (parent.stats(), child.stats());
        // Outside the child's prefix: it climbs, and the parent (no route) NACKs the client.
        fails_fast(&via_child, "nobody.other.test").await;
        let (p1, c1) = (parent.stats(), child.stats());
        assert!(c1.syns_forwarded > c0.syns_forwarded);
        assert_eq!(c1.syns_nacked, c0.syns_nacked);
        assert!(p1.syns_nacked > p0.syns_nacked);

        // Inside it, from a client of the child: the child answers for its prefix and does
        // not send it up (where the parent would send it straight back).
        fails_fast(&via_child, "nobody.example.test").await;
        let (p2, c2) = (parent.stats(), child.stats());
        assert!(c2.syns_nacked > c1.syns_nacked);
        assert_eq!(c2.syns_forwarded, c1.syns_forwarded);
        assert_eq!(
            (p2.syns_nacked, p2.syns_forwarded),
            (p1.syns_nacked, p1.syns_forwarded)
        );

        // Inside it, from a client of the parent: down to the child, which NACKs.
        fails_fast(&via_parent, "nobody.example.test").await;
        let (p3, c3) = (parent.stats(), child.stats());
        assert!(p3.syns_forwarded > p2.syns_forwarded);
        assert_eq!(p3.syns_nacked, p2.syns_nacked);
        assert!(c3.syns_nacked > c2.syns_nacked);
        // Nothing looped.
        assert_eq!(parent.stats().syns_dropped, 0);
        assert_eq!(child.stats().syns_dropped, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_child_withdraws_its_prefix_within_a_refresh_and_a_lease() {
    bounded(async {
        let (parent, child, domain) = parent_and_child().await;
        let dropped = Instant::now();
        drop(child);
        // Gone by UNREGISTER or, at the latest, when the default lease (3 s) runs out. A
        // dropped Router's endpoint still refreshes its announcement once (about 1 s after
        // the drop) and sends no UNREGISTER for it, so today the bound is one refresh period
        // (1 s) plus the lease, with 1 s for a loaded machine.
        wait_for(
            Duration::from_secs(5),
            "the announcement to go within a refresh and a 3 s lease",
            || !registered(&parent, domain),
        )
        .await;
        let s = parent.stats();
        eprintln!(
            "announcement gone {:?} after the drop ({} unregistered, {} expired)",
            dropped.elapsed(),
            s.unregistrations,
            s.expired
        );
    })
    .await;
}

#[test]
fn a_parent_needs_something_narrower_than_every_name_to_announce() {
    let parent: Locator = "127.0.0.1:1".parse().unwrap();
    let e = RouterConfig::new(vec![any_port()])
        .with_parent(parent, Vec::new())
        .unwrap_err();
    assert!(matches!(e, RouterError::AnnounceEverything));
    let e = RouterConfig::new(vec![any_port()])
        .with_parent(parent, vec![ServicePrefix::DEFAULT])
        .unwrap_err();
    assert!(matches!(e, RouterError::AnnounceEverything));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_given_two_parents_announces_through_the_second_when_the_first_is_silent() {
    let live = Router::bind(RouterConfig::new(vec![any_port()]))
        .await
        .unwrap();
    // A port nothing answers on: bound, then closed.
    let silent: Locator = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap();
    let domain = ServicePrefix::from_domain("example.test").unwrap();
    let config = child_config(domain, vec![silent, live.locators()[0]]);
    assert_eq!(config.parents, [silent, live.locators()[0]]);
    let t0 = Instant::now();
    let child = Router::bind(config).await.unwrap();
    // The first parent never answers; one refresh period (1 s) later the announcement goes
    // to the second, well within the 3 s lease.
    wait_for(
        Duration::from_secs(3),
        "the announcement at the live parent",
        || registered(&live, domain),
    )
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    wait_registered_at_parent(&child, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_spreads_over_its_children_by_the_weight_they_hold() {
    bounded(async {
        let parent = Router::bind(RouterConfig::new(vec![any_port()]))
            .await
            .unwrap();
        let domain = ServicePrefix::from_domain("example.test").unwrap();
        let child = || Router::bind(child_config(domain, vec![parent.locators()[0]]));
        let (a, b) = (child().await.unwrap(), child().await.unwrap());
        // One instance under each child: weight 3 under A, 1 under B (each echoes). Their
        // leases outlast the test: this one is about weights, and on a slow CI machine a
        // SYN has met NoRoute while leases refreshed (seen 1 run in 3 there, never here;
        // not explained yet), which the lease tests cover on their own.
        let lease = LeaseConfig {
            ttl: Duration::from_secs(120),
            refresh: Duration::from_secs(40),
            ..LeaseConfig::default()
        };
        let heavy =
            weighted_instance_with(a.locators()[0], "web.example.test", 3, lease.clone()).await;
        let light = weighted_instance_with(b.locators()[0], "web.example.test", 1, lease).await;
        // Each child holds its instance (B's announcement carries weight 1 whether or not
        // its instance has registered yet, so the parent's weights alone do not say so).
        for (router, at) in [(&a, "A"), (&b, "B")] {
            wait_for(
                Duration::from_secs(10),
                &format!("the instance at {at}"),
                || registered(router, exact("web.example.test")),
            )
            .await;
        }
        // Each child announces what it holds: the parent's entries for the domain carry
        // weights 3 and 1 (not 1 and 1).
        wait_for(
            Duration::from_secs(10),
            "the children's weights at the parent",
            || {
                let mut w: Vec<(Locator, u32)> = parent
                    .registrations()
                    .iter()
                    .filter(|l| l.registration.prefix == domain)
                    .map(|l| (l.registration.locator, l.registration.weight))
                    .collect();
                w.sort_unstable();
                let mut want = vec![(a.locators()[0], 3), (b.locators()[0], 1)];
                want.sort_unstable();
                w == want
            },
        )
        .await;
        // And SYNs through the parent follow 3:1.
        let client = endpoint().await;
        client.set_default_route(parent.locators()[0]);
        let n = 200;
        let mut to_heavy = 0;
        for _ in 0..n {
            let peer = echo_once(&client, "web.example.test").await;
            if peer == heavy.local_locators()[0] {
                to_heavy += 1;
            } else {
                assert_eq!(peer, light.local_locators()[0]);
            }
        }
        // Binomial(200, 3/4): mean 150, sd 6.1; ±4 sd.
        assert!(
            (125..=175).contains(&to_heavy),
            "{to_heavy} of {n} to the weight-3 child"
        );
    })
    .await;
}
