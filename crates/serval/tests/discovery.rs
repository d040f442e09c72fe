//! Routerless mode's rules in the runtime: the discovery group is the lowest-priority default,
//! and a router always replaces it. (The multicast exchange itself is tested across network
//! namespaces in `crates/cli/tests/discovery_netns.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::net::Ipv4Addr;

use serval::{Action, DiscoveryConfig, Endpoint, Locator, ServicePrefix};

fn config(port: u16) -> DiscoveryConfig {
    DiscoveryConfig {
        port,
        ..DiscoveryConfig::default()
    }
}

fn default_targets(ep: &Endpoint) -> Vec<Action> {
    ep.table()
        .snapshot()
        .get(&ServicePrefix::DEFAULT)
        .map(|t| t.iter().map(|t| t.action).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_group_is_the_default_until_a_router_is_set() {
    let ep = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let cfg = config(54391);
    ep.enable_discovery(cfg.clone()).expect("enable discovery");
    assert_eq!(default_targets(&ep), vec![Action::Forward(cfg.locator())]);
    let router: Locator = "127.0.0.1:9".parse().unwrap();
    ep.set_default_route(router);
    assert_eq!(default_targets(&ep), vec![Action::Forward(router)]);

    // Another endpoint: its router is set first, so discovery adds no rule; two endpoints of
    // one host share the group port.
    let ep2 = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    ep2.set_router(router);
    ep2.enable_discovery(cfg)
        .expect("a second endpoint on the group port");
    assert_eq!(default_targets(&ep2), vec![Action::Forward(router)]);

    // And a router set after discovery replaces the group, like a default route.
    let ep3 = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    ep3.enable_discovery(config(54391)).unwrap();
    ep3.set_router(router);
    assert_eq!(default_targets(&ep3), vec![Action::Forward(router)]);
}

#[tokio::test]
async fn a_unicast_group_is_refused() {
    let ep = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let bad = DiscoveryConfig {
        group: Ipv4Addr::new(10, 0, 0, 1),
        ..config(54392)
    };
    let e = ep.enable_discovery(bad).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(default_targets(&ep).is_empty());
}

#[tokio::test]
async fn an_ipv6_only_endpoint_uses_the_ipv6_group() {
    // Hosts without IPv6 loopback cannot run this (CI has one: there it fails instead).
    let Ok(ep) = Endpoint::bind(&["[::1]:0".parse().unwrap()]).await else {
        serval_testkit::skip_with(
            "an_ipv6_only_endpoint_uses_the_ipv6_group",
            "no IPv6 loopback (cannot bind [::1])",
            "sysctl -w net.ipv6.conf.lo.disable_ipv6=0",
        );
        return;
    };
    let cfg = config(54393);
    ep.enable_discovery(cfg.clone()).expect("enable discovery");
    assert_eq!(
        default_targets(&ep),
        vec![Action::Forward(cfg.locator_v6())]
    );
}
