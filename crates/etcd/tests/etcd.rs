//! The client against a real etcd (one member on free loopback ports, a temporary data dir,
//! killed when the test ends). Needs Debian's `etcd-server`; without it the test skips with
//! one line saying so, and under `CI=true` fails instead (serval-testkit's policy).

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serval_etcd::{Client, Error, Options, pb};

/// One etcd member, killed and its data dir removed on drop.
struct Member {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a member and waits (at most 30 s) until it answers; `None` if skipping.
async fn start(test: &str) -> Option<(Member, Client)> {
    let bin = serval_testkit::require_etcd(test)?;
    // Two distinct ports (a port released by the first probe can come back from the second).
    let port = free_port();
    let peer = std::iter::repeat_with(free_port)
        .find(|&p| p != port)
        .unwrap();
    let log = std::env::temp_dir().join(format!(
        "serval-etcd-client-{}-{test}.log",
        std::process::id()
    ));
    let dir =
        std::env::temp_dir().join(format!("serval-etcd-client-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{port}")])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut member = Member { child, dir, port };
    let c =
        Client::connect_lazy(&format!("127.0.0.1:{}", member.port), &Options::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status().await.map(|s| s.leader).unwrap_or(0) == 0 {
        let exited = member.child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            panic!(
                "etcd did not elect itself within 30 s (exit: {exited:?}); its log ends:\n{tail}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&log);
    Some((member, c))
}

#[tokio::test]
async fn leases_watches_transactions_and_compaction_against_etcd() {
    let Some((_etcd, c)) = start("leases_watches_transactions_and_compaction_against_etcd").await
    else {
        return;
    };
    // A put with a lease, read back with every field etcd keeps.
    let lease = c.lease_grant(30).await.unwrap();
    assert!(lease.id != 0 && lease.ttl == 30, "{lease:?}");
    let put = c
        .put(pb::PutRequest {
            key: b"/t/a".to_vec(),
            value: b"1".to_vec(),
            lease: lease.id,
            prev_kv: true,
        })
        .await
        .unwrap();
    assert!(put.prev_kv.is_none());
    let rev = put.header.unwrap().revision;
    let got = c.get(b"/t/a".to_vec()).await.unwrap();
    let kv = &got.kvs[0];
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.mod_revision),
        (&b"1"[..], lease.id, rev)
    );

    // Keep-alive, time-to-live with keys, and a watch from the revision before.
    assert_eq!(c.lease_keep_alive(lease.id).await.unwrap().ttl, 30);
    let ttl = c.lease_time_to_live(lease.id, true).await.unwrap();
    assert_eq!(
        (ttl.granted_ttl, ttl.keys.clone()),
        (30, vec![b"/t/a".to_vec()])
    );
    let mut watch = c
        .watch(pb::WatchCreateRequest {
            key: b"/t/".to_vec(),
            range_end: serval_etcd::prefix_end(b"/t/"),
            start_revision: rev,
            ..Default::default()
        })
        .await
        .unwrap();
    let created = watch.message().await.unwrap().unwrap();
    assert!(created.created && !created.canceled, "{created:?}");
    let mut events = created.events;
    while events.is_empty() {
        events = watch.message().await.unwrap().unwrap().events;
    }
    assert_eq!(events[0].kv.as_ref().unwrap().key, b"/t/a");

    // A transaction guarded by the mod revision: holds once, then not.
    let txn = pb::TxnRequest {
        compare: vec![pb::Compare::mod_revision_is(b"/t/a".to_vec(), rev)],
        success: vec![pb::RequestOp::delete(b"/t/a".to_vec())],
        failure: Vec::new(),
    };
    assert!(c.txn(txn.clone()).await.unwrap().succeeded);
    assert!(!c.txn(txn).await.unwrap().succeeded);
    // The watch delivers the delete (event type 1).
    let ev = loop {
        let r = watch.message().await.unwrap().unwrap();
        if let Some(e) = r.events.into_iter().next() {
            break e;
        }
    };
    assert_eq!(ev.r#type, pb::event::EventType::Delete as i32);

    // A revoked lease: a keep-alive says it is gone (etcd answers TTL 0, not an error).
    c.lease_revoke(lease.id).await.unwrap();
    let e = c.lease_keep_alive(lease.id).await.unwrap_err();
    assert!(e.is_lease_not_found(), "{e}");
    assert_eq!(c.lease_time_to_live(lease.id, false).await.unwrap().ttl, -1);
    let e = c.lease_revoke(lease.id).await.unwrap_err();
    assert!(e.is_lease_not_found(), "{e}");

    // Compaction: a read at a compacted revision is recognised as such.
    let now = c.get(b"x".to_vec()).await.unwrap().header.unwrap().revision;
    c.compact(now, true).await.unwrap();
    let e = c
        .range(pb::RangeRequest {
            key: b"/t/a".to_vec(),
            revision: rev,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.is_compacted(), "{e}");
    assert!(!matches!(e, Error::LeaseNotFound(_)));
}

/// Measurement for the scale model (docs/scale.md), not a check: how many lease keep-alives
/// and how many leased puts one local etcd member answers per second, with 64 requests in
/// flight. Run in release:
///
/// ```sh
/// cargo test --release -p serval-etcd --test etcd -- --ignored --nocapture measure_
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_keepalive_and_put_rates_of_one_member() {
    let Some((_etcd, c)) = start("measure_keepalive_and_put_rates_of_one_member").await else {
        return;
    };
    const LEASES: usize = 10_000;
    const IN_FLIGHT: usize = 64;
    let secs = Duration::from_secs(5);
    let mut leases = Vec::with_capacity(LEASES);
    for _ in 0..LEASES {
        leases.push(c.lease_grant(600).await.unwrap().id);
    }
    let leases = std::sync::Arc::new(leases);
    // Keep-alives: each task refreshes leases round-robin.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..IN_FLIGHT {
        let (c, leases) = (c.clone(), leases.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut i = t;
            while t0.elapsed() < secs {
                c.lease_keep_alive(leases[i % LEASES]).await.unwrap();
                n += 1;
                i += IN_FLIGHT;
            }
            n
        }));
    }
    let mut keepalives = 0;
    for t in tasks {
        keepalives += t.await.unwrap();
    }
    let ka_rate = keepalives as f64 / t0.elapsed().as_secs_f64();
    // Puts with a lease (what a new registration costs besides its lease grant).
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..IN_FLIGHT {
        let (c, leases) = (c.clone(), leases.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while t0.elapsed() < secs {
                let key = format!("/m/v1/reg/{t}/{n}");
                let req = pb::PutRequest {
                    key: key.into_bytes(),
                    value: b"v1 w=1 p=0 ttl=3".to_vec(),
                    lease: leases[(t + 64 * n as usize) % LEASES],
                    prev_kv: false,
                };
                c.put(req).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut puts = 0;
    for t in tasks {
        puts += t.await.unwrap();
    }
    let put_rate = puts as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "one etcd member, {IN_FLIGHT} in flight: {ka_rate:.0} lease keep-alives/s \
         ({LEASES} leases), {put_rate:.0} leased puts/s"
    );
}
