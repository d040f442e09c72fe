//! The runtime's DELAY hook on loopback: a held SYN is announced on `held_syn_events`, listed
//! by `held_syns`, and answered with `release`. Bounded waits only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::time::Duration;

use serval::{Action, Endpoint, ReleaseError, ServiceId, ServicePrefix, Target, Verdict};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_syn_is_announced_listed_and_released() {
    timeout(Duration::from_secs(30), async {
        let any = "127.0.0.1:0".parse().unwrap();
        let router = Endpoint::bind(&[any]).await.unwrap();
        router
            .add_rule(
                ServicePrefix::from_domain("example.test").unwrap(),
                Target::new(Action::Delay, 0, 1),
            )
            .unwrap();
        let mut events = router.held_syn_events();
        let client = Endpoint::bind(&[any]).await.unwrap();
        let service = ServiceId::from_name("web.example.test").unwrap();
        let via = router.local_locators()[0];
        let c = client.clone();
        let pending = tokio::spawn(async move { c.connect_via(service, via).await });

        let held = events.recv().await.unwrap();
        assert_eq!(held.service, service);
        assert_eq!(held.client, client.local_locators()[0]);
        assert!(held.expires_in <= Duration::from_secs(5));
        let listed = router.held_syns();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, held.id);

        router.release(held.id, Verdict::Drop).unwrap();
        let e = pending.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no route to service"), "{e}");
        assert_eq!(
            router.release(held.id, Verdict::Drop),
            Err(ReleaseError::Unknown)
        );
        assert!(router.held_syns().is_empty());
        let st = router.stats();
        assert_eq!((st.delayed, st.delay_dropped), (1, 1));
    })
    .await
    .expect("test took over 30 s");
}
