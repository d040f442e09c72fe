//! Registration through the tokio runtime on loopback: an instance endpoint with a router,
//! against a test endpoint that serves registrations and answers them itself (the real router
//! is `serval-router`; these tests pin the runtime's part).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::time::Duration;

use serval::{
    Action, Endpoint, LeaseConfig, MessageType, RegistrarEvent, RegistrationRequests,
    RegistrationState, RejectReason, ServiceId, ServicePrefix,
};
use tokio::time::timeout;

fn prefix(name: &str) -> ServicePrefix {
    ServicePrefix::exact(ServiceId::from_name(name).unwrap())
}

async fn bind() -> Endpoint {
    Endpoint::bind(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap()
}

/// Bounds every wait so a hang fails instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(20);

/// The next request, answered with an ACK granting what was asked.
async fn ack_next(
    router: &Endpoint,
    requests: &mut RegistrationRequests,
) -> serval::RegistrationRequest {
    let req = timeout(LIMIT, requests.recv()).await.unwrap().unwrap();
    let ttl = if req.request.ty == MessageType::Register {
        req.request.ttl_ms
    } else {
        0
    };
    assert!(router.answer_registration(&req, &req.request.ack(ttl)));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_register_refresh_and_unregister_at_once() {
    let router = bind().await;
    let mut requests = router.serve_registrations();
    let router_loc = router.local_locators()[0];

    let instance = bind().await;
    let mut events = instance.registrar_events();
    let lease = LeaseConfig {
        ttl: Duration::from_millis(900),
        refresh: Duration::from_millis(300),
        ..LeaseConfig::default()
    };
    instance.set_router_with(router_loc, lease);
    // The router is now the default route.
    let snap = instance.table().snapshot();
    let default = snap.get(&ServicePrefix::DEFAULT).unwrap();
    assert_eq!(default[0].action, Action::Forward(router_loc));

    let listener = instance.listen_weighted(prefix("web.test"), 2, 5).unwrap();
    let first = ack_next(&router, &mut requests).await;
    assert_eq!(first.request.ty, MessageType::Register);
    assert_eq!(first.from, instance.local_locators()[0]);
    assert_eq!((first.request.weight, first.request.priority), (5, 2));
    assert_eq!(first.request.ttl_ms, 900);
    let ev = timeout(LIMIT, events.recv()).await.unwrap().unwrap();
    assert_eq!(
        ev,
        RegistrarEvent::Registered {
            prefix: prefix("web.test"),
            router: router_loc,
            ttl: Duration::from_millis(900)
        }
    );
    let status = instance.registration_status();
    assert_eq!(status.len(), 1);
    assert!(matches!(
        status[0].state,
        RegistrationState::Registered { .. }
    ));

    // Refreshes arrive about every 300 ms, each a new request.
    let start = tokio::time::Instant::now();
    let refresh = ack_next(&router, &mut requests).await;
    assert_eq!(refresh.request.ty, MessageType::Register);
    assert_ne!(refresh.request.request_id, first.request.request_id);
    assert!(start.elapsed() < Duration::from_millis(2000));

    // Dropping the listener unregisters at once, not at the next refresh.
    drop(listener);
    let dropped = tokio::time::Instant::now();
    loop {
        let r = ack_next(&router, &mut requests).await;
        if r.request.ty == MessageType::Unregister {
            assert_eq!(r.request.prefix, prefix("web.test"));
            break;
        }
    }
    // Sent when the listener went, not at a refresh or the lease's end (bounded loosely: a
    // loaded CI machine may be slow to schedule the driver).
    assert!(dropped.elapsed() < Duration::from_secs(1));
    assert!(instance.registration_status().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_endpoint_sends_its_last_unregister() {
    let router = bind().await;
    let mut requests = router.serve_registrations();
    let instance = bind().await;
    instance.set_router(router.local_locators()[0]);
    let socket = instance.bind_datagram(prefix("dg.test")).unwrap();
    let reg = ack_next(&router, &mut requests).await;
    assert_eq!(reg.request.prefix, prefix("dg.test"));
    // Everything goes at once: the driver cannot send any more, the endpoint's drop does.
    drop(socket);
    drop(instance);
    let mut saw_unregister = false;
    while let Ok(Some(r)) = timeout(Duration::from_secs(2), requests.recv()).await {
        if r.request.ty == MessageType::Unregister {
            saw_unregister = true;
            break;
        }
    }
    assert!(saw_unregister);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_reported() {
    let router = bind().await;
    let mut requests = router.serve_registrations();
    let instance = bind().await;
    let mut events = instance.registrar_events();
    instance.set_router(router.local_locators()[0]);
    let _l = instance.listen(prefix("web.test")).unwrap();
    let req = timeout(LIMIT, requests.recv()).await.unwrap().unwrap();
    assert!(router.answer_registration(&req, &req.request.reject(RejectReason::NOT_ACCEPTED)));
    let ev = timeout(LIMIT, events.recv()).await.unwrap().unwrap();
    assert!(matches!(
        ev,
        RegistrarEvent::Rejected {
            reason: RejectReason::NOT_ACCEPTED,
            ..
        }
    ));
    // An answer to something else is refused, not sent.
    assert!(!router.answer_registration(&req, &req.request));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_receiver_requests_are_counted_not_queued() {
    let router = bind().await;
    let instance = bind().await;
    instance.set_router(router.local_locators()[0]);
    let _l = instance.listen(prefix("web.test")).unwrap();
    // The router endpoint serves no registrations: the engine counts what arrives.
    timeout(LIMIT, async {
        while router.stats().registrations_unexpected == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(router.stats().registration_requests, 0);
}
