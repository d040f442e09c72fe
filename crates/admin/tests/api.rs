//! The admin API end to end over HTTP on loopback, against a table and an in-memory registry.
#![allow(clippy::unwrap_used)] // test harness

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serval_admin::{AdminSource, Client, Metric, RuleEdit, render_metrics, render_table};
use serval_registry::{Health, Leased, Registration, Registry};
use serval_table::{Action, ServiceTable, TableSnapshot, Target};
use serval_wire::ServicePrefix;

struct Fake {
    table: ServiceTable,
    registry: Registry,
    health: Mutex<Health>,
}

impl AdminSource for Fake {
    fn table(&self) -> TableSnapshot {
        self.table.snapshot()
    }
    fn leases(&self) -> Vec<Leased> {
        self.registry.snapshot()
    }
    fn registry_health(&self) -> Health {
        self.health.lock().unwrap().clone()
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::counter("syns_forwarded", "SYNs forwarded.", 5),
            Metric::gauge("registrations", "Live registrations.", 1),
        ]
    }
    fn add_rule(&self, prefix: ServicePrefix, target: Target) -> Result<(), String> {
        self.table
            .add_target(prefix, target)
            .map_err(|e| e.to_string())
    }
    fn remove_rule(&self, prefix: ServicePrefix, action: Action) -> Result<bool, String> {
        Ok(self.table.remove_target(&prefix, &action))
    }
}

fn edit(prefix: &str, action: &str, locator: Option<&str>) -> RuleEdit {
    RuleEdit {
        prefix: prefix.into(),
        action: action.into(),
        locator: locator.map(Into::into),
        weight: Some(2),
        priority: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_rules_metrics_and_health_over_http() {
    let fake = Arc::new(Fake {
        table: ServiceTable::new(),
        registry: Registry::memory(),
        health: Mutex::new(Health::Synced),
    });
    // One registered instance (in the table and the registry, with a lease).
    let web: ServicePrefix = "web.example.com".parse().unwrap();
    let inst = "10.1.0.5:4000".parse().unwrap();
    fake.table
        .add_target(web, Target::new(Action::Forward(inst), 0, 3))
        .unwrap();
    fake.registry
        .put(
            Registration {
                prefix: web,
                locator: inst,
                weight: 3,
                priority: 0,
            },
            Duration::from_secs(3),
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serval_admin::serve(listener, fake.clone()));

    let result = tokio::task::spawn_blocking(move || {
        let c = Client::new(addr);
        let view = c.table().unwrap();
        assert_eq!(view.entries.len(), 1);
        let t = &view.entries[0].targets[0];
        assert_eq!(
            (
                t.action.as_str(),
                t.locator.as_deref(),
                t.weight,
                t.origin.as_str()
            ),
            ("forward", Some("10.1.0.5:4000"), 3, "registered")
        );
        assert!(
            t.lease_ms.is_some_and(|ms| ms > 1000 && ms <= 3000),
            "{t:?}"
        );
        assert!(render_table(&view).contains("forward 10.1.0.5:4000  weight 3  priority 0  lease"));

        // Static rules: add, see, remove; a second removal removes nothing.
        c.add_rule(&edit("api.example.com", "forward", Some("10.1.0.9:4000")))
            .unwrap();
        c.add_rule(&edit("example.com/*", "drop", None)).unwrap();
        let view = c.table().unwrap();
        assert_eq!(view.entries.len(), 3);
        let text = render_table(&view);
        assert!(
            text.contains("forward 10.1.0.9:4000  weight 2  priority 0  static"),
            "{text}"
        );
        assert!(text.contains("drop  weight 2"), "{text}");
        assert!(
            c.remove_rule(&edit("api.example.com", "forward", Some("10.1.0.9:4000")))
                .unwrap()
        );
        assert!(
            !c.remove_rule(&edit("api.example.com", "forward", Some("10.1.0.9:4000")))
                .unwrap()
        );

        // Bad edits get a 400 whose message names the problem.
        let e = c
            .add_rule(&edit("a..b", "forward", Some("1.2.3.4:5")))
            .unwrap_err();
        assert!(e.to_string().contains("bad prefix"), "{e}");
        let e = c.add_rule(&edit("a.b", "forward", None)).unwrap_err();
        assert!(e.to_string().contains("needs a locator"), "{e}");
        let e = c.add_rule(&edit("a.b", "teleport", None)).unwrap_err();
        assert!(e.to_string().contains("unknown action"), "{e}");

        let metrics = ureq::get(format!("http://{addr}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        assert_eq!(c.metrics().unwrap(), metrics);
        assert!(
            metrics.contains("serval_syns_forwarded_total 5"),
            "{metrics}"
        );
        assert!(metrics.contains("serval_registrations 1"), "{metrics}");
    })
    .await;
    result.unwrap();

    // Health follows the registry.
    *fake.health.lock().unwrap() = Health::Degraded {
        error: "etcd unreachable".into(),
    };
    let status = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent.get(format!("http://{addr}/health")).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    })
    .await
    .unwrap();
    assert_eq!(status.0, 503);
    assert!(status.1.contains("etcd unreachable"));
}

#[tokio::test]
async fn an_unreachable_admin_address_is_one_clear_error() {
    // Bind and drop to get a port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = tokio::task::spawn_blocking(move || Client::new(addr).table().unwrap_err())
        .await
        .unwrap();
    assert!(
        e.to_string().starts_with(&format!("admin API at {addr}:")),
        "{e}"
    );
}

#[test]
fn metrics_render_counters_with_total_and_gauges_without() {
    let text = render_metrics(&[
        Metric::counter("nacks_sent", "NACKs sent.", 7),
        Metric::gauge("table_entries", "Prefixes in the table.", 2),
    ]);
    assert!(text.contains("# TYPE serval_nacks_sent counter"), "{text}");
    assert!(text.contains("serval_nacks_sent_total 7"), "{text}");
    assert!(text.contains("serval_table_entries 2"), "{text}");
    assert!(
        text.contains("# HELP serval_nacks_sent NACKs sent.\n"),
        "{text}"
    );
}
