//! A real router, instances and clients on loopback: registration, weighted spread, expiry
//! of crashed instances, explicit unregistration, moves, floods, and streams that outlive the
//! router. Every wait is bounded; timing assertions leave room for a loaded 2-core machine.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use serval::{
    Endpoint, LeaseConfig, Locator, MessageType, RegistrarEvent, RegistrationRepr, RejectReason,
    ServiceId, ServicePrefix,
};
use serval_router::{Policy, Router, RouterConfig};
use serval_wire::{Cookie, SalPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
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

async fn router_with(policy: Policy) -> Router {
    let mut config = RouterConfig::new(vec![any_port()]);
    config.policy = policy;
    Router::bind(config).await.unwrap()
}

async fn router() -> Router {
    router_with(Policy::default()).await
}

async fn endpoint() -> Endpoint {
    Endpoint::bind(&[any_port()]).await.unwrap()
}

fn short_lease() -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_millis(1000),
        refresh: Duration::from_millis(300),
        ..LeaseConfig::default()
    }
}

/// Polls `cond` every 10 ms until it holds; fails after `limit`. Returns how long it took.
async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// Bounds a whole test.
async fn bounded<F: Future<Output = ()>>(f: F) {
    timeout(Duration::from_secs(60), f)
        .await
        .expect("test took over 60 s");
}

fn registered_at(r: &Router, prefix: ServicePrefix) -> Vec<Locator> {
    r.registrations()
        .into_iter()
        .filter(|l| l.registration.prefix == prefix)
        .map(|l| l.registration.locator)
        .collect()
}

/// An instance serving `name` through `router` with `weight`; echoes every stream.
async fn instance(router: Locator, name: &str, weight: u32, lease: LeaseConfig) -> Endpoint {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_spread_over_instances_by_weight() {
    bounded(async {
        let r = router().await;
        let rl = r.locators()[0];
        let a = instance(rl, "web.test", 1, LeaseConfig::default()).await;
        let b = instance(rl, "web.test", 3, LeaseConfig::default()).await;
        let (la, lb) = (a.local_locators()[0], b.local_locators()[0]);
        wait_for(Duration::from_secs(5), "two registrations", || {
            registered_at(&r, exact("web.test")).len() == 2
        })
        .await;
        let client = endpoint().await;
        client.set_default_route(rl);
        let mut count: HashMap<Locator, u32> = HashMap::new();
        // 400 connects by name, 20 at a time; the instance answers the client directly.
        for _ in 0..20 {
            let mut batch = Vec::new();
            for _ in 0..20 {
                let c = client.clone();
                batch.push(tokio::spawn(async move {
                    let s = c.connect(svc("web.test")).await.unwrap();
                    s.peer_locator().unwrap()
                }));
            }
            for h in batch {
                *count.entry(h.await.unwrap()).or_default() += 1;
            }
        }
        let (na, nb) = (count[&la], count[&lb]);
        eprintln!("400 connects: {na} to the weight-1 instance, {nb} to the weight-3 one");
        assert_eq!(na + nb, 400);
        // Binomial(400, 1/4): mean 100, standard deviation 8.7; ±40 is over 4.5 deviations.
        assert!((60..=140).contains(&na), "weight 1: {na}, weight 3: {nb}");
        let st = r.stats();
        assert_eq!(st.syns_forwarded, 400);
        assert_eq!(st.registrations, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_fails_fast() {
    bounded(async {
        let r = router().await;
        let client = endpoint().await;
        client.set_default_route(r.locators()[0]);
        let start = Instant::now();
        let e = client.connect(svc("nobody.test")).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable);
        assert!(e.to_string().contains("no route to service"), "{e}");
        // A NACK, not a timeout.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(r.stats().syns_nacked, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_stops_getting_connections_after_its_lease() {
    bounded(async {
        let r = router().await;
        let rl = r.locators()[0];
        let live = instance(rl, "crash.test", 1, short_lease()).await;
        // The doomed instance runs on its own runtime, so that it can die without a word.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (doomed, listener) = rt
            .spawn(async move {
                let ep = Endpoint::bind(&[any_port()]).await.unwrap();
                ep.set_router_with(rl, short_lease());
                let l = ep.listen(exact("crash.test")).unwrap();
                (ep, l)
            })
            .await
            .unwrap();
        let dead = doomed.local_locators()[0];
        wait_for(Duration::from_secs(5), "both registered", || {
            registered_at(&r, exact("crash.test")).len() == 2
        })
        .await;
        // Crash: its tasks stop (no refresh, no UNREGISTER); its handles are never dropped.
        std::mem::forget(listener);
        std::mem::forget(doomed);
        rt.shutdown_background();
        let took = wait_for(Duration::from_secs(5), "the lease to run out", || {
            registered_at(&r, exact("crash.test")) == [live.local_locators()[0]]
        })
        .await;
        // Gone by expiry: not before the unrefreshed remainder of the lease, not much after it.
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took <= Duration::from_millis(2500), "{took:?}");
        assert_eq!(r.stats().expired, 1);
        // New connections all reach the live instance.
        let client = endpoint().await;
        client.set_default_route(rl);
        for _ in 0..30 {
            let s = client.connect(svc("crash.test")).await.unwrap();
            assert_ne!(s.peer_locator().unwrap(), dead);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_listener_unregisters_at_once() {
    bounded(async {
        let r = router().await;
        let rl = r.locators()[0];
        let ep = endpoint().await;
        // A long lease: only an UNREGISTER can explain a quick removal.
        ep.set_router_with(
            rl,
            LeaseConfig {
                ttl: Duration::from_secs(30),
                refresh: Duration::from_secs(10),
                ..LeaseConfig::default()
            },
        );
        let listener = ep.listen(exact("short.test")).unwrap();
        wait_for(Duration::from_secs(5), "registered", || {
            !registered_at(&r, exact("short.test")).is_empty()
        })
        .await;
        let lease = r.registrations()[0].expires_in;
        assert!(lease > Duration::from_secs(25), "{lease:?}");
        drop(listener);
        let took = wait_for(Duration::from_secs(5), "unregistered", || {
            registered_at(&r, exact("short.test")).is_empty()
        })
        .await;
        assert!(took < Duration::from_secs(2), "{took:?}");
        let st = r.stats();
        assert_eq!((st.unregistrations, st.expired), (1, 0));
        // And the name is unknown again.
        let client = endpoint().await;
        client.set_default_route(rl);
        let e = client.connect(svc("short.test")).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_streams_outlive_the_router() {
    bounded(async {
        let r = router().await;
        let rl = r.locators()[0];
        let _server = instance(rl, "echo.test", 1, LeaseConfig::default()).await;
        wait_for(Duration::from_secs(5), "registered", || {
            !registered_at(&r, exact("echo.test")).is_empty()
        })
        .await;
        let client = endpoint().await;
        client.set_default_route(rl);
        let mut s = client.connect(svc("echo.test")).await.unwrap();
        s.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"before");
        // The router goes away; the stream never crossed it.
        r.shutdown();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let data = vec![0x5a; 256 * 1024];
        let (mut rd, mut wr) = s.split();
        let send = async {
            wr.write_all(&data).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = async {
            rd.read_to_end(&mut back).await.unwrap();
        };
        tokio::join!(send, recv);
        assert_eq!(back, data);
    })
    .await;
}

/// Sends a registration message from `sock` to the router and waits for the answer, echoing
/// the router's cookie first if it asks for one (as the registrar does).
async fn ask(sock: &UdpSocket, router: Locator, req: &RegistrationRepr) -> RegistrationRepr {
    let req = req.with_cookie(req.cookie.unwrap_or(Cookie::EMPTY));
    let a = ask_once(sock, router, &req).await;
    if a.ty != MessageType::Cookie {
        return a;
    }
    ask_once(sock, router, &req.with_cookie(a.cookie.unwrap())).await
}

/// Sends one registration message and waits for its answer.
async fn ask_once(sock: &UdpSocket, router: Locator, req: &RegistrationRepr) -> RegistrationRepr {
    sock.send_to(&req.to_packet(), router).await.unwrap();
    let mut buf = [0u8; 256];
    loop {
        let (n, from) = timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(from, router);
        assert!(
            n <= req.to_packet().len(),
            "the answer is larger than the request"
        );
        let a =
            RegistrationRepr::parse_packet(&SalPacket::new_checked(&buf[..n]).unwrap()).unwrap();
        if a.request_id == req.request_id {
            return a;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_from_a_new_locator_replaces_the_old_one() {
    bounded(async {
        let r = router_with(Policy {
            min_ttl: Duration::from_secs(2),
            max_ttl: Duration::from_secs(20),
            ..Policy::default()
        })
        .await;
        let rl = r.locators()[0];
        let old = UdpSocket::bind(any_port()).await.unwrap();
        let new = UdpSocket::bind(any_port()).await.unwrap();
        let p = exact("mobile.test");
        let token = 0x1234_5678_9abc_def0;
        // The lease asked for (100 ms) is clamped to the router's minimum.
        let a = ask(
            &old,
            rl,
            &RegistrationRepr::register(1, token, p, 2, 0, 100),
        )
        .await;
        assert_eq!((a.ty, a.ttl_ms), (MessageType::Ack, 2000));
        assert_eq!(registered_at(&r, p), [old.local_addr().unwrap()]);
        // Same instance token from another address: the instance moved.
        let a = ask(
            &new,
            rl,
            &RegistrationRepr::register(2, token, p, 2, 0, 60_000),
        )
        .await;
        assert_eq!((a.ty, a.ttl_ms), (MessageType::Ack, 20_000));
        wait_for(Duration::from_secs(2), "the old locator to go", || {
            registered_at(&r, p) == [new.local_addr().unwrap()]
        })
        .await;
        assert_eq!(r.stats().moved, 1);
        // Another instance (another token) is added, not substituted.
        let other = UdpSocket::bind(any_port()).await.unwrap();
        ask(&other, rl, &RegistrationRepr::register(3, 7, p, 1, 0, 0)).await;
        wait_for(Duration::from_secs(2), "two instances", || {
            registered_at(&r, p).len() == 2
        })
        .await;
        // An UNREGISTER removes only what its sender registered.
        let a = ask(
            &old,
            rl,
            &RegistrationRepr::register(4, 7, p, 1, 0, 0).unregister(5),
        )
        .await;
        assert_eq!(a.ty, MessageType::Ack);
        assert_eq!(registered_at(&r, p).len(), 2);
        let st = r.stats();
        assert_eq!(
            (st.registrations_accepted, st.registrations_created),
            (3, 3)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_outside_the_accept_list_are_rejected_and_counted() {
    bounded(async {
        let r = router_with(Policy {
            accept: vec![ServicePrefix::from_domain("example.com").unwrap()],
            ..Policy::default()
        })
        .await;
        let rl = r.locators()[0];
        let ep = endpoint().await;
        let mut events = ep.registrar_events();
        ep.set_router(rl);
        let _ok = ep.listen(exact("web.example.com")).unwrap();
        let _no = ep.listen(exact("web.example.org")).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            seen.push(
                timeout(Duration::from_secs(5), events.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        assert!(seen.contains(&RegistrarEvent::Rejected {
            prefix: exact("web.example.org"),
            router: rl,
            reason: RejectReason::NOT_ACCEPTED,
        }));
        assert!(seen.iter().any(|e| matches!(
            e,
            RegistrarEvent::Registered { prefix, .. } if *prefix == exact("web.example.com")
        )));
        assert_eq!(r.stats().rejected_not_accepted, 1);
        assert_eq!(r.registrations().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_are_counted_and_the_router_keeps_working() {
    bounded(async {
        // Short leases, so the flood's registrations are gone soon after it.
        let r = router_with(Policy {
            max_registrations: 200,
            min_ttl: Duration::from_millis(500),
            max_ttl: Duration::from_millis(1000),
            ..Policy::default()
        })
        .await;
        let rl = r.locators()[0];
        let flood = UdpSocket::bind(any_port()).await.unwrap();
        // Garbage, malformed registrations, registrations past the limit, SYNs for nobody.
        let client = endpoint().await;
        client.set_default_route(rl);
        // The flood's socket answers cookies (a real host, not a forged source): each cookie
        // it gets back is echoed at once.
        let echoing = std::sync::Arc::new(flood);
        let echo = {
            let sock = echoing.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    let Ok(p) = SalPacket::new_checked(&buf[..n]) else {
                        continue;
                    };
                    let Ok(a) = RegistrationRepr::parse_packet(&p) else {
                        continue;
                    };
                    if a.ty == MessageType::Cookie {
                        let again = RegistrationRepr {
                            ty: MessageType::Register,
                            ..a
                        };
                        let _ = sock.send_to(&again.to_packet(), from).await;
                    }
                }
            })
        };
        let flood = echoing;
        for i in 0..3000u32 {
            let mut bad = RegistrationRepr::register(i, 1, exact("x.test"), 1, 0, 0).to_packet();
            bad[20] = 99;
            let _ = flood.send_to(&bad, rl).await;
            let _ = flood.send_to(&i.to_be_bytes(), rl).await;
            let name = format!("n{i}.flood.test");
            let reg = RegistrationRepr::register(i, u64::from(i), exact(&name), 1, 0, 0)
                .with_cookie(Cookie::EMPTY);
            let _ = flood.send_to(&reg.to_packet(), rl).await;
            if i % 10 == 0 {
                // Connects to unknown names fail fast, even now.
                let e = client.connect(svc("nobody.test")).await.unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable);
            }
        }
        // Every request got its cookie (or was dropped), and the echoes were handled; a few
        // COOKIE answers may be lost in socket buffers.
        wait_for(Duration::from_secs(10), "the flood to be handled", || {
            let st = r.stats();
            st.cookies_sent + st.requests_dropped >= 3000
                && st.registrations_accepted + st.rejected_limit + st.requests_dropped >= 2900
        })
        .await;
        echo.abort();
        let st = r.stats();
        eprintln!("after the flood: {st:?}");
        assert!(st.registrations_malformed >= 2900, "{st:?}");
        assert!(st.malformed >= st.registrations_malformed + 2900, "{st:?}");
        // The limit holds (leases of a second let a few more in as the first ones expire).
        // (Up to workers - 1 = 3 concurrent requests may pass the check together.)
        assert!(st.registrations <= 203, "{st:?}");
        assert!(st.registrations_accepted >= 200, "{st:?}");
        assert!(st.rejected_limit > 0, "{st:?}");
        assert!(st.syns_nacked >= 300, "{st:?}");
        // The flood's registrations are not refreshed and expire; a real instance registers.
        wait_for(
            Duration::from_secs(10),
            "the flood's leases to run out",
            || r.stats().registrations == 0,
        )
        .await;
        let _server = instance(rl, "late.test", 1, short_lease()).await;
        wait_for(Duration::from_secs(10), "the late instance", || {
            !registered_at(&r, exact("late.test")).is_empty()
        })
        .await;
        let s = client.connect(svc("late.test")).await.unwrap();
        drop(s);
    })
    .await;
}

/// Issue 12 item 5: a router serves each client address a bounded rate of SYNs. One address
/// flooding SYNs gets its burst and then its rate, counted; a client at another address is
/// served in full meanwhile; and no answer is larger than the SYN it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_address_is_rate_limited_and_others_still_served() {
    bounded(async {
        let mut config = RouterConfig::new(vec![any_port()]);
        config.endpoint.syn_rate_limit = Some(serval::SynRateLimit {
            rate: 50,
            burst: 50,
            max_sources: 1024,
        });
        let r = Router::bind(config).await.unwrap();
        let to = r.locators()[0];
        let flooder = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let from = flooder.local_addr().unwrap();
        let start = Instant::now();
        let sent = 2000u64;
        let mut syn_len = 0;
        for i in 0..sent {
            let mut syn = serval_wire::SalRepr::new(
                serval_wire::Protocol::NONE,
                serval_wire::FlowId(1000 + i),
                serval_wire::FlowId::NONE,
            );
            syn.control = Some(serval_wire::ControlRepr {
                flags: serval_wire::ControlFlags::SYN,
                verno: 1,
                ackno: 0,
            });
            syn.service = Some(serval_wire::ServiceRepr {
                hop_limit: 8,
                id: svc("nobody.test"),
            });
            syn.nonce = Some(serval_wire::Nonce([i as u8; 16]));
            syn.keyshare = Some(serval_wire::KeyShareRepr {
                group: serval_wire::KeyShareRepr::X25519,
                flags: 0,
                key: [9; 32],
            });
            syn.source = vec![from];
            let bytes = syn.to_bytes(&[]).unwrap();
            syn_len = bytes.len();
            flooder.send_to(&bytes, to).await.unwrap();
        }
        let elapsed = start.elapsed();
        // Everything sent arrived and was counted: NACKed within the budget, the rest limited.
        wait_for(Duration::from_secs(10), "every SYN counted", || {
            let s = r.stats();
            s.syns_nacked + s.syns_rate_limited >= sent
        })
        .await;
        let s = r.stats();
        let budget = 50 + (50.0 * (elapsed.as_secs_f64() + 1.0)) as u64;
        assert!(
            s.syns_nacked <= budget,
            "{} NACKs for a budget of {budget}",
            s.syns_nacked
        );
        assert!(
            s.syns_nacked >= 50,
            "the burst was not served: {}",
            s.syns_nacked
        );
        assert!(s.syns_rate_limited >= sent - budget);
        // The answers that did come were no larger than the SYNs.
        let mut buf = [0u8; 2048];
        let mut answers = 0;
        while let Ok(Ok((n, _))) =
            timeout(Duration::from_millis(200), flooder.recv_from(&mut buf)).await
        {
            assert!(n <= syn_len, "an answer of {n} bytes to a SYN of {syn_len}");
            answers += 1;
        }
        assert!(answers as u64 <= s.syns_nacked);
        // A client at another address is served at once.
        let client = endpoint().await;
        client.set_default_route(to);
        let e = client.connect(svc("nobody.test")).await.unwrap_err();
        assert!(e.to_string().contains("no route to service"), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_with_the_anchor_index_routes_by_name_among_a_thousand_rules() {
    // `serval router --anchor-index`: with 1 000 static rules the table holds an anchor index,
    // and names are still resolved by their longest match: a registered name reaches its
    // instance, a name under a static domain rule is forwarded there.
    bounded(async {
        let mut config = RouterConfig::new(vec![any_port()]);
        config.anchor_index = true;
        let r = Router::bind(config).await.unwrap();
        let rl = r.locators()[0];
        let sink: Locator = "127.0.0.1:9".parse().unwrap();
        for i in 0..1000 {
            let p = ServicePrefix::from_domain(&format!("d{i}.bulk.test")).unwrap();
            r.endpoint()
                .add_rule(
                    p,
                    serval_table::Target::new(serval_table::Action::Forward(sink), 0, 1),
                )
                .unwrap();
        }
        let web = instance(rl, "web.test", 1, LeaseConfig::default()).await;
        wait_for(Duration::from_secs(5), "the registration", || {
            registered_at(&r, exact("web.test")).len() == 1
        })
        .await;
        let snap = r.table();
        assert!(
            snap.has_anchor_index(),
            "{} entries and no index",
            snap.len()
        );
        let r7 = snap.resolve(&svc("x.d7.bulk.test"), 1).unwrap();
        assert_eq!(
            (r7.prefix.len(), r7.action),
            (96, serval_table::Action::Forward(sink))
        );
        let client = endpoint().await;
        client.set_default_route(rl);
        for _ in 0..20 {
            let s = client.connect(svc("web.test")).await.unwrap();
            assert_eq!(s.peer_locator().unwrap(), web.local_locators()[0]);
        }
        assert_eq!(r.stats().syns_forwarded, 20);
    })
    .await;
}
