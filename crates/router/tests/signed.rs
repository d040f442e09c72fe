//! Signed registrations and return routability at a real router on loopback (issue 12 item
//! 4): under an authorised prefix only a registration signed by its key becomes routable;
//! unsigned or wrongly signed ones are refused, counted and reported to the instance; a
//! registration whose cookie is never echoed from the registered locator never becomes
//! routable.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::future::Future;
use std::time::Duration;

use ring::rand::SystemRandom;
use serval::{
    Endpoint, LeaseConfig, Locator, MessageType, RegistrarEvent, RegistrationRepr, RejectReason,
    ServiceId, ServicePrefix,
};
use serval_admin::AdminSource as _;
use serval_keys::PrivateKey;
use serval_router::{Router, RouterConfig};
use serval_wire::{Cookie, SalPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tokio::time::{Instant, timeout};

fn exact(name: &str) -> ServicePrefix {
    ServicePrefix::exact(ServiceId::from_name(name).unwrap())
}

fn any_port() -> Locator {
    "127.0.0.1:0".parse().unwrap()
}

fn key() -> PrivateKey {
    PrivateKey::generate(&SystemRandom::new()).unwrap()
}

async fn bounded<F: Future<Output = ()>>(f: F) {
    timeout(Duration::from_secs(60), f)
        .await
        .expect("test took over 60 s");
}

async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn registered_at(r: &Router, prefix: ServicePrefix) -> Vec<Locator> {
    r.registrations()
        .into_iter()
        .filter(|l| l.registration.prefix == prefix)
        .map(|l| l.registration.locator)
        .collect()
}

/// An echo instance of `prefix` registering with `router`, signing with `key` if given.
/// Returns it and its registrar events (subscribed before anything is sent).
async fn instance(
    router: Locator,
    prefix: ServicePrefix,
    key: Option<PrivateKey>,
) -> (Endpoint, broadcast::Receiver<RegistrarEvent>) {
    let ep = Endpoint::bind(&[any_port()]).await.unwrap();
    let events = ep.registrar_events();
    ep.set_registration_key(key);
    ep.set_router_with(router, LeaseConfig::default());
    let mut listener = ep.listen_weighted(prefix, 0, 1).unwrap();
    tokio::spawn(async move {
        while let Ok(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (ep, events)
}

/// The next Registered or Rejected event.
async fn outcome(events: &mut broadcast::Receiver<RegistrarEvent>) -> RegistrarEvent {
    loop {
        let e = timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no registration outcome within 10 s")
            .unwrap();
        if matches!(
            e,
            RegistrarEvent::Registered { .. } | RegistrarEvent::Rejected { .. }
        ) {
            return e;
        }
    }
}

fn rejected_unauthorized(e: &RegistrarEvent) -> bool {
    matches!(
        e,
        RegistrarEvent::Rejected {
            reason: RejectReason::UNAUTHORIZED,
            ..
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signed_registrations_under_an_authorized_prefix_become_routable() {
    bounded(async {
        let (owner, intruder) = (key(), key());
        let mut config = RouterConfig::new(vec![any_port()]);
        config.authorize = vec![
            (exact("web.test"), owner.public_key()),
            (
                ServicePrefix::from_domain("bank.test").unwrap(),
                owner.public_key(),
            ),
        ];
        let r = Router::bind(config).await.unwrap();
        let rl = r.locators()[0];

        // Unsigned, and signed by another key: refused, reported, never routable.
        let (unsigned, mut ev) = instance(rl, exact("web.test"), None).await;
        assert!(rejected_unauthorized(&outcome(&mut ev).await));
        let (wrong, mut ev) = instance(rl, exact("web.test"), Some(intruder.clone())).await;
        assert!(rejected_unauthorized(&outcome(&mut ev).await));
        // Under an authorised domain, and a prefix that would capture the authorised ones.
        let (under, mut ev) = instance(rl, exact("www.bank.test"), None).await;
        assert!(rejected_unauthorized(&outcome(&mut ev).await));
        let (everything, mut ev) = instance(rl, ServicePrefix::DEFAULT, Some(intruder)).await;
        assert!(rejected_unauthorized(&outcome(&mut ev).await));
        assert!(registered_at(&r, exact("web.test")).is_empty());
        assert!(registered_at(&r, ServicePrefix::DEFAULT).is_empty());
        let st = r.stats();
        assert!(st.rejected_unauthorized >= 4, "{st:?}");
        assert_eq!(st.registrations, 0, "{st:?}");
        let metric = r
            .metrics()
            .into_iter()
            .find(|m| m.name == "router_registrations_rejected_unauthorized")
            .expect("metric");
        assert_eq!(metric.value, st.rejected_unauthorized, "{metric:?}");

        // A client by name gets no route: nothing unauthorised was ever in the table.
        let client = Endpoint::bind(&[any_port()]).await.unwrap();
        client.set_default_route(rl);
        let e = client
            .connect(ServiceId::from_name("web.test").unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable);

        // Signed by the owner: registered and routable, under the domain too.
        let (signed, mut ev) = instance(rl, exact("web.test"), Some(owner.clone())).await;
        assert!(matches!(
            outcome(&mut ev).await,
            RegistrarEvent::Registered { .. }
        ));
        let (signed_www, mut ev) = instance(rl, exact("www.bank.test"), Some(owner)).await;
        assert!(matches!(
            outcome(&mut ev).await,
            RegistrarEvent::Registered { .. }
        ));
        assert_eq!(
            registered_at(&r, exact("web.test")),
            signed.local_locators()
        );
        let mut s = client
            .connect(ServiceId::from_name("web.test").unwrap())
            .await
            .unwrap();
        s.write_all(b"signed").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"signed");

        // Open prefixes stay open.
        let (_open, mut ev) = instance(rl, exact("open.test"), None).await;
        assert!(matches!(
            outcome(&mut ev).await,
            RegistrarEvent::Registered { .. }
        ));
        // The refused ones are still refused (their retries too), never in the table.
        assert_eq!(registered_at(&r, exact("web.test")).len(), 1);
        drop((unsigned, wrong, under, everything, signed_www));
    })
    .await;
}

/// Sends `req` from `sock` to `router`; the answer, if one comes within `wait`.
async fn exchange(
    sock: &UdpSocket,
    router: Locator,
    req: &RegistrationRepr,
    wait: Duration,
) -> Option<RegistrationRepr> {
    sock.send_to(&req.to_packet(), router).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = timeout(wait, sock.recv_from(&mut buf)).await.ok()?.unwrap();
    assert!(n <= req.packet_len(), "an answer larger than its request");
    RegistrationRepr::parse_packet(&SalPacket::new_checked(&buf[..n]).unwrap()).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_cookie_is_never_echoed_from_its_locator_never_becomes_routable() {
    bounded(async {
        let r = Router::bind(RouterConfig::new(vec![any_port()]))
            .await
            .unwrap();
        let rl = r.locators()[0];
        let p = exact("victim.test");
        // The "victim": a socket whose address a forger would name. It never echoes.
        let victim = UdpSocket::bind(any_port()).await.unwrap();
        let first = RegistrationRepr::register(1, 0x77, p, 1, 0, 3000).with_cookie(Cookie::EMPTY);
        let answer = exchange(&victim, rl, &first, Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(answer.ty, MessageType::Cookie);
        let victims_cookie = answer.cookie.unwrap();

        // The forger has its own socket: the cookie it gets is for its own locator, and
        // using it (or any guess) for the victim's locator gets only another COOKIE.
        let forger = UdpSocket::bind(any_port()).await.unwrap();
        let own = exchange(&forger, rl, &first, Duration::from_secs(5))
            .await
            .unwrap();
        let forgers_cookie = own.cookie.unwrap();
        assert_ne!(forgers_cookie, victims_cookie);
        for (i, c) in [forgers_cookie, Cookie([0xaa; 16])]
            .into_iter()
            .chain((0..200u32).map(|i| {
                let mut c = victims_cookie.0;
                c[4..8].copy_from_slice(&i.to_be_bytes());
                Cookie(c)
            }))
            .enumerate()
        {
            let req = RegistrationRepr {
                request_id: 10 + i as u32,
                ..first.with_cookie(c)
            };
            let a = exchange(&victim, rl, &req, Duration::from_secs(5))
                .await
                .expect("an answer");
            assert_eq!(a.ty, MessageType::Cookie, "{a}");
        }
        // The victim's cookie is no good for another prefix or instance either.
        let other = RegistrationRepr {
            instance: 0x78,
            ..first.with_cookie(victims_cookie)
        };
        let a = exchange(&victim, rl, &other, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a.ty, MessageType::Cookie);
        // A 60-byte request is refused outright.
        let legacy = RegistrationRepr::register(2, 0x77, p, 1, 0, 3000);
        let a = exchange(&victim, rl, &legacy, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a.ty, MessageType::Reject(RejectReason::COOKIE_REQUIRED));

        // Nothing became routable, and the router counted what it answered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(registered_at(&r, p).is_empty());
        let st = r.stats();
        assert_eq!(st.registrations, 0, "{st:?}");
        assert!(st.cookies_sent >= 204, "{st:?}");
        assert_eq!(st.rejected_cookie_required, 1, "{st:?}");

        // Control: echoing the cookie from the locator it was issued to registers, and the
        // ACK carries a cookie for the refreshes.
        let ok = exchange(
            &victim,
            rl,
            &first.with_cookie(victims_cookie),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(ok.ty, MessageType::Ack, "{ok}");
        assert!(!ok.cookie.unwrap().is_empty());
        wait_for(Duration::from_secs(5), "the registration", || {
            registered_at(&r, p) == [victim.local_addr().unwrap()]
        })
        .await;
    })
    .await;
}
