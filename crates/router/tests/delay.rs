//! DELAY end to end on loopback, through the router's HTTP admin API: a SYN for a DELAY-ed
//! name waits; an instance registers and `resolve` lets it connect; another gets `drop` and its
//! client fails fast; another gets no verdict and times out. Every wait is bounded; the only
//! timing assertions are generous bounds (fail fast: well under the client's connect timeout).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::sync::Arc;
use std::time::Duration;

use serval::{Endpoint, LeaseConfig, Locator, ServiceId, ServicePrefix};
use serval_admin::{AdminSource, Client, DelayVerdict, DelayedView, RuleEdit};
use serval_router::{Router, RouterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

fn svc(name: &str) -> ServiceId {
    ServiceId::from_name(name).unwrap()
}

fn any_port() -> Locator {
    "127.0.0.1:0".parse().unwrap()
}

async fn endpoint() -> Endpoint {
    Endpoint::bind(&[any_port()]).await.unwrap()
}

/// Runs a blocking admin call off the runtime's threads.
async fn admin<T: Send + 'static>(
    client: &Arc<Client>,
    f: impl FnOnce(&Client) -> T + Send + 'static,
) -> T {
    let c = client.clone();
    tokio::task::spawn_blocking(move || f(&c)).await.unwrap()
}

/// Waits (bounded) until the admin API lists a held SYN for `name`, and returns it.
async fn held(client: &Arc<Client>, name: &str) -> DelayedView {
    let want = svc(name).to_string();
    let start = Instant::now();
    loop {
        let list = admin(client, Client::delayed).await.unwrap();
        if let Some(d) = list.into_iter().find(|d| d.service == want) {
            return d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no held SYN for {name}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn connect(client: &Endpoint, name: &str) -> JoinHandle<std::io::Result<serval::Stream>> {
    let c = client.clone();
    let id = svc(name);
    tokio::spawn(async move { c.connect(id).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_syns_are_resolved_dropped_or_timed_out_through_the_admin_api() {
    timeout(Duration::from_secs(60), async {
        let mut config = RouterConfig::new(vec![any_port()]);
        config.endpoint.delay_timeout = Duration::from_millis(1500);
        let router = Arc::new(Router::bind(config).await.unwrap());
        let rl = router.locators()[0];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: Arc<dyn AdminSource> = router.clone();
        let server = tokio::spawn(serval_admin::serve(listener, source));
        let api = Arc::new(Client::new(addr));
        // What `serval table --admin ADDR add example.test/* delay` sends.
        admin(&api, |c| {
            c.add_rule(&RuleEdit {
                prefix: "example.test/*".into(),
                action: "delay".into(),
                locator: None,
                weight: None,
                priority: None,
            })
        })
        .await
        .unwrap();
        let client = endpoint().await;
        client.set_default_route(rl);
        let client_loc = client.local_locators()[0];

        // 1. Held until an instance registers and the controller says `resolve`.
        let pending = connect(&client, "web.example.test");
        let d = held(&api, "web.example.test").await;
        assert_eq!(d.client, client_loc.to_string());
        assert!(d.expires_in_ms <= 1500);
        let instance = endpoint().await;
        instance.set_router_with(rl, LeaseConfig::default());
        let mut l = instance
            .listen(ServicePrefix::exact(svc("web.example.test")))
            .unwrap();
        tokio::spawn(async move {
            while let Ok(mut s) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        let start = Instant::now();
        while !router
            .registrations()
            .iter()
            .any(|r| r.registration.prefix == ServicePrefix::exact(svc("web.example.test")))
        {
            assert!(start.elapsed() < Duration::from_secs(5), "no registration");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!pending.is_finished(), "the SYN was not held");
        let id = d.id;
        admin(&api, move |c| c.release(id, DelayVerdict::Resolve))
            .await
            .unwrap();
        let mut s = pending.await.unwrap().unwrap();
        assert_eq!(s.peer_locator().unwrap(), instance.local_locators()[0]);
        s.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held");

        // 2. `drop`: the client fails fast with "no route to service".
        let pending = connect(&client, "api.example.test");
        let d = held(&api, "api.example.test").await;
        let start = Instant::now();
        let id = d.id;
        admin(&api, move |c| c.release(id, DelayVerdict::Drop))
            .await
            .unwrap();
        let e = pending.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no route to service"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // Answered once: a second verdict is a 404.
        let again = admin(&api, move |c| c.release(id, DelayVerdict::Resolve)).await;
        assert!(again.unwrap_err().to_string().contains("404"));

        // 3. No verdict: NACKed at the deadline (1.5 s), well before the connect timeout.
        let start = Instant::now();
        let pending = connect(&client, "slow.example.test");
        held(&api, "slow.example.test").await;
        let e = pending.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no route to service"), "{e}");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(1400) && waited < Duration::from_secs(8),
            "{waited:?}"
        );

        let st = router.stats();
        assert_eq!(
            (
                st.syns_held,
                st.delay_resolved,
                st.delay_dropped,
                st.delay_timeouts
            ),
            (3, 1, 1, 1)
        );
        assert_eq!((st.syns_held_now, st.delay_overflows), (0, 0));
        assert!(admin(&api, Client::delayed).await.unwrap().is_empty());
        let metrics = serval_admin::render_metrics(&AdminSource::metrics(router.as_ref()));
        for line in [
            "serval_router_delay_syns_held_total 3",
            "serval_router_delay_resolved_total 1",
            "serval_router_delay_dropped_total 1",
            "serval_router_delay_timeouts_total 1",
            "serval_router_delay_overflows_total 0",
            "serval_router_delay_held 0",
        ] {
            assert!(metrics.contains(line), "{line} missing from\n{metrics}");
        }
        server.abort();
    })
    .await
    .expect("test took over 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_verdicts_are_refused() {
    timeout(Duration::from_secs(30), async {
        let router = Arc::new(
            Router::bind(RouterConfig::new(vec![any_port()]))
                .await
                .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: Arc<dyn AdminSource> = router.clone();
        let server = tokio::spawn(serval_admin::serve(listener, source));
        let post = move |path: &'static str, body: &'static str| {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            agent
                .post(format!("http://{addr}{path}"))
                .header("content-type", "application/json")
                .send(body)
                .unwrap()
                .status()
                .as_u16()
        };
        let codes = tokio::task::spawn_blocking(move || {
            [
                post("/delayed/7", r#"{"verdict":"maybe"}"#),
                post("/delayed/x", r#"{"verdict":"drop"}"#),
                post("/delayed/7", r#"{"verdict":"drop"}"#),
            ]
        })
        .await
        .unwrap();
        assert_eq!(codes, [400, 400, 404]);
        server.abort();
    })
    .await
    .expect("test took over 30 s");
}
