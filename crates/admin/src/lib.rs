//! The HTTP admin API of Serval daemons (the service router first).
//!
//! A daemon implements [`AdminSource`] and runs [`serve`] on its admin address. Endpoints:
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /table` | the service table as JSON ([`TableView`]): every prefix with its targets, their locator, weight, priority, whether they were registered or configured, and a registration's remaining lease |
//! | `GET /metrics` | the daemon's counters and gauges in the Prometheus text format |
//! | `GET /health` | `{"registry": "synced"}` or `{"registry": "degraded", "error": …}` (status 503 when degraded) |
//! | `POST /rules` | adds a static rule ([`RuleEdit`] as JSON); 204, or 400 with `{"error": …}` |
//! | `DELETE /rules` | removes a static rule ([`RuleEdit`] as JSON); `{"removed": true\|false}` |
//! | `GET /delayed` | SYNs held by DELAY rules: `{"delayed": [`[`DelayedView`]`, …]}`, oldest first |
//! | `POST /delayed/{id}` | answers a held SYN: `{"verdict": "resolve"}` (look it up again now) or `{"verdict": "drop"}` (NACK the client); 204, 404 if no SYN is held with that id, 400 for a bad verdict |
//!
//! An instance's admin API (`serval listen`/`expose --admin`) is in [`instance`].
//!
//! [`Client`] is the other side, used by `serval table`; [`render_table`] prints a table view
//! one target per line.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod instance;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};
use serval_registry::{Health, Leased};
use serval_table::{Action, TableSnapshot, Target};
use serval_wire::{Locator, ServicePrefix};

/// What a daemon shows and lets edit through the admin API.
pub trait AdminSource: Send + Sync + 'static {
    /// The service table as it is now.
    fn table(&self) -> TableSnapshot;
    /// Live registrations with their remaining lease (empty for a daemon without a registry).
    fn leases(&self) -> Vec<Leased>;
    /// Whether the registry is serving fresh data.
    fn registry_health(&self) -> Health;
    /// Counters and gauges for `/metrics` and the JSON view.
    fn metrics(&self) -> Vec<Metric>;
    /// Adds a static rule.
    fn add_rule(&self, prefix: ServicePrefix, target: Target) -> Result<(), String>;
    /// Removes a static rule; `Ok(false)` if there was none.
    fn remove_rule(&self, prefix: ServicePrefix, action: Action) -> Result<bool, String>;
    /// SYNs held by DELAY rules, oldest first (none for a daemon that holds none).
    fn delayed(&self) -> Vec<DelayedView> {
        Vec::new()
    }
    /// Answers the held SYN `id`; `Ok(false)` if no SYN is held with that id.
    fn release(&self, id: u64, verdict: DelayVerdict) -> Result<bool, String> {
        let _ = (id, verdict);
        Ok(false)
    }
}

/// A SYN held by a DELAY rule: `GET /delayed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayedView {
    /// What to answer in `POST /delayed/{id}`.
    pub id: u64,
    /// The serviceID asked for, in hex.
    pub service: String,
    /// The client's locator (where the SYN-ACK or NACK goes).
    pub client: String,
    /// Milliseconds it has been held.
    pub held_ms: u64,
    /// Milliseconds until it is dropped (and the client NACKed) without a verdict.
    pub expires_in_ms: u64,
}

/// A controller's answer to a held SYN: `POST /delayed/{id}` with `{"verdict": …}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DelayVerdict {
    /// Look the serviceID up again now and act on the result (a NACK if DELAY again).
    Resolve,
    /// NACK the client so that it fails fast.
    Drop,
}

impl std::str::FromStr for DelayVerdict {
    type Err = AdminError;

    fn from_str(s: &str) -> Result<DelayVerdict, AdminError> {
        match s {
            "resolve" => Ok(DelayVerdict::Resolve),
            "drop" => Ok(DelayVerdict::Drop),
            other => Err(AdminError::BadRequest(format!(
                "unknown verdict {other:?} (expected resolve or drop)"
            ))),
        }
    }
}

impl std::fmt::Display for DelayVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DelayVerdict::Resolve => "resolve",
            DelayVerdict::Drop => "drop",
        })
    }
}

/// The body of `POST /delayed/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictBody {
    /// `resolve` or `drop`.
    pub verdict: String,
}

/// One number for `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metric {
    /// Name without the `serval_` prefix (and, for counters, without `_total`).
    pub name: String,
    /// One line of help.
    pub help: String,
    /// The value.
    pub value: u64,
    /// Counter (only grows) or gauge.
    pub kind: MetricKind,
}

/// Prometheus metric type of a [`Metric`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// Only grows.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Metric {
    /// A counter.
    pub fn counter(name: &str, help: &str, value: u64) -> Metric {
        Metric {
            name: name.into(),
            help: help.into(),
            value,
            kind: MetricKind::Counter,
        }
    }

    /// A gauge.
    pub fn gauge(name: &str, help: &str, value: u64) -> Metric {
        Metric {
            name: name.into(),
            help: help.into(),
            value,
            kind: MetricKind::Gauge,
        }
    }
}

/// The service table as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableView {
    /// Every prefix with a rule, in table order.
    pub entries: Vec<EntryView>,
    /// The daemon's counters and gauges.
    pub metrics: Vec<Metric>,
}

/// One prefix and its targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    /// The prefix, in the `HEX/LEN` form `serval id` prints.
    pub prefix: String,
    /// Its targets, highest priority first.
    pub targets: Vec<TargetView>,
}

/// One target of a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetView {
    /// `forward`, `demux`, `delay` or `drop`.
    pub action: String,
    /// The next hop of a `forward` target.
    pub locator: Option<String>,
    /// The listener of a `demux` target.
    pub listener: Option<u64>,
    /// Share of new flows among targets of the same priority.
    pub weight: u32,
    /// Only the highest priority present receives flows.
    pub priority: u32,
    /// `registered` (from the registry; it has a lease) or `static` (configured).
    pub origin: String,
    /// Milliseconds left on a registration's lease.
    pub lease_ms: Option<u64>,
}

/// A static rule to add or remove: `POST /rules` and `DELETE /rules`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEdit {
    /// The prefix, in any form `ServicePrefix` parses (`NAME`, `NAME/*`, `HEX/LEN`, `*`).
    pub prefix: String,
    /// `forward`, `delay` or `drop`.
    pub action: String,
    /// The next hop, for `forward`.
    pub locator: Option<String>,
    /// Weight (default 1).
    pub weight: Option<u32>,
    /// Priority (default 0).
    pub priority: Option<u32>,
}

/// Why a rule edit or an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request was malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The admin address could not be reached, or answered with an error.
    #[error("admin API at {addr}: {msg}")]
    Http {
        /// The admin address.
        addr: String,
        /// What went wrong.
        msg: String,
    },
}

impl RuleEdit {
    /// The prefix and target this edit describes.
    pub fn parse(&self) -> Result<(ServicePrefix, Target), AdminError> {
        let prefix: ServicePrefix = self
            .prefix
            .parse()
            .map_err(|e| AdminError::BadRequest(format!("bad prefix {:?}: {e}", self.prefix)))?;
        let action = match (self.action.as_str(), &self.locator) {
            ("forward", Some(l)) => Action::Forward(l.parse::<Locator>().map_err(|e| {
                AdminError::BadRequest(format!("bad locator {l:?}: {e} (expected IP:PORT)"))
            })?),
            ("forward", None) => {
                return Err(AdminError::BadRequest(
                    "a forward rule needs a locator".into(),
                ));
            }
            ("delay", _) => Action::Delay,
            ("drop", _) => Action::Drop,
            (other, _) => {
                return Err(AdminError::BadRequest(format!(
                    "unknown action {other:?} (expected forward, delay or drop)"
                )));
            }
        };
        let weight = self.weight.unwrap_or(1);
        if weight == 0 {
            return Err(AdminError::BadRequest("weight must be at least 1".into()));
        }
        Ok((
            prefix,
            Target::new(action, self.priority.unwrap_or(0), weight),
        ))
    }
}

/// Builds the JSON view of `source`.
pub fn table_view(source: &dyn AdminSource) -> TableView {
    let leases = source.leases();
    let snapshot = source.table();
    let mut entries: Vec<EntryView> = snapshot
        .entries()
        .map(|(prefix, targets)| {
            let mut targets: Vec<TargetView> = targets
                .iter()
                .map(|t| target_view(prefix, t, &leases))
                .collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.priority));
            EntryView {
                prefix: prefix.to_string(),
                targets,
            }
        })
        .collect();
    entries.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    TableView {
        entries,
        metrics: source.metrics(),
    }
}

fn target_view(prefix: ServicePrefix, t: &Target, leases: &[Leased]) -> TargetView {
    let (action, locator, listener) = match t.action {
        Action::Forward(l) => ("forward", Some(l), None),
        Action::Demux(id) => ("demux", None, Some(id.0)),
        Action::Delay => ("delay", None, None),
        Action::Drop => ("drop", None, None),
    };
    let lease = locator.and_then(|l| {
        leases
            .iter()
            .find(|x| x.registration.prefix == prefix && x.registration.locator == l)
    });
    TargetView {
        action: action.into(),
        locator: locator.map(|l| l.to_string()),
        listener,
        weight: t.weight,
        priority: t.priority,
        origin: if lease.is_some() {
            "registered"
        } else {
            "static"
        }
        .into(),
        lease_ms: lease.map(|l| l.expires_in.as_millis() as u64),
    }
}

/// The Prometheus text exposition of `metrics` (names get a `serval_` prefix, counters a
/// `_total` suffix).
pub fn render_metrics(metrics: &[Metric]) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("serval");
    for m in metrics {
        // The encoder ends each help text with a full stop itself.
        let help = m.help.trim_end_matches('.');
        match m.kind {
            MetricKind::Counter => {
                registry.register(&m.name, help, ConstCounter::new(m.value));
            }
            MetricKind::Gauge => {
                registry.register(
                    &m.name,
                    help,
                    ConstGauge::new(i64::try_from(m.value).unwrap_or(i64::MAX)),
                );
            }
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// A table view as a readable list: one line per target.
pub fn render_table(view: &TableView) -> String {
    let mut out = String::new();
    if view.entries.is_empty() {
        out.push_str("(no rules)\n");
    }
    for e in &view.entries {
        for t in &e.targets {
            let what = match (&t.locator, t.listener) {
                (Some(l), _) => format!("{} {l}", t.action),
                (None, Some(id)) => format!("{} listener {id}", t.action),
                (None, None) => t.action.clone(),
            };
            let lease = match t.lease_ms {
                Some(ms) => format!("lease {:.1}s", ms as f64 / 1000.0),
                None => t.origin.clone(),
            };
            let _ = writeln!(
                out,
                "{}  {what}  weight {}  priority {}  {lease}",
                e.prefix, t.weight, t.priority
            );
        }
    }
    out
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn AdminSource>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/table", get(get_table))
        .route("/metrics", get(get_metrics))
        .route("/health", get(get_health))
        .route("/rules", axum::routing::post(post_rule).delete(delete_rule))
        .route("/delayed", get(get_delayed))
        .route("/delayed/{id}", axum::routing::post(post_verdict))
        .with_state(source);
    axum::serve(listener, app).await
}

type Source = State<Arc<dyn AdminSource>>;

async fn get_table(State(s): Source) -> Json<TableView> {
    Json(table_view(s.as_ref()))
}

async fn get_metrics(State(s): Source) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render_metrics(&s.metrics()),
    )
        .into_response()
}

async fn get_health(State(s): Source) -> Response {
    match s.registry_health() {
        Health::Synced => Json(serde_json::json!({ "registry": "synced" })).into_response(),
        Health::Degraded { error } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "registry": "degraded", "error": error })),
        )
            .into_response(),
    }
}

fn bad_request(msg: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": msg })),
    )
        .into_response()
}

async fn post_rule(State(s): Source, Json(edit): Json<RuleEdit>) -> Response {
    let (prefix, target) = match edit.parse() {
        Ok(x) => x,
        Err(e) => return bad_request(e.to_string()),
    };
    match s.add_rule(prefix, target) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => bad_request(e),
    }
}

async fn delete_rule(State(s): Source, Json(edit): Json<RuleEdit>) -> Response {
    let (prefix, target) = match edit.parse() {
        Ok(x) => x,
        Err(e) => return bad_request(e.to_string()),
    };
    match s.remove_rule(prefix, target.action) {
        Ok(removed) => Json(serde_json::json!({ "removed": removed })).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn get_delayed(State(s): Source) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "delayed": s.delayed() }))
}

async fn post_verdict(
    State(s): Source,
    axum::extract::Path(id): axum::extract::Path<String>,
    Json(body): Json<VerdictBody>,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return bad_request(format!("bad held SYN id {id:?}"));
    };
    let verdict = match body.verdict.parse::<DelayVerdict>() {
        Ok(v) => v,
        Err(e) => return bad_request(e.to_string()),
    };
    match s.release(id, verdict) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no SYN held with id {id} (answered already, or timed out)")
            })),
        )
            .into_response(),
        Err(e) => bad_request(e),
    }
}

/// A blocking client of the admin API (for the CLI).
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the admin API at `addr`, with a 5 s timeout per request.
    pub fn new(addr: SocketAddr) -> Client {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build();
        Client {
            addr,
            agent: config.into(),
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> AdminError {
        AdminError::Http {
            addr: self.addr.to_string(),
            msg: msg.to_string(),
        }
    }

    fn check(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<String, AdminError> {
        let status = resp.status();
        let body = resp.body_mut().read_to_string().map_err(|e| self.err(e))?;
        if status.is_success() {
            return Ok(body);
        }
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(body);
        Err(self.err(format!("{status}: {msg}")))
    }

    /// `GET /table`.
    pub fn table(&self) -> Result<TableView, AdminError> {
        self.get_json("table")
    }

    /// `GET /metrics`: the Prometheus text (a router's or an instance's).
    pub fn metrics(&self) -> Result<String, AdminError> {
        let resp = self
            .agent
            .get(format!("http://{}/metrics", self.addr))
            .call()
            .map_err(|e| self.err(e))?;
        self.check(resp)
    }

    /// `GET /{path}`, its JSON answer decoded.
    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let resp = self
            .agent
            .get(format!("http://{}/{path}", self.addr))
            .call()
            .map_err(|e| self.err(e))?;
        let body = self.check(resp)?;
        serde_json::from_str(&body).map_err(|e| self.err(format!("unexpected answer: {e}")))
    }

    /// `POST /rules`.
    pub fn add_rule(&self, edit: &RuleEdit) -> Result<(), AdminError> {
        let resp = self
            .agent
            .post(format!("http://{}/rules", self.addr))
            .send_json(edit)
            .map_err(|e| self.err(e))?;
        self.check(resp).map(drop)
    }

    /// `DELETE /rules`; whether a rule was removed.
    pub fn remove_rule(&self, edit: &RuleEdit) -> Result<bool, AdminError> {
        let resp = self
            .agent
            .delete(format!("http://{}/rules", self.addr))
            .force_send_body()
            .send_json(edit)
            .map_err(|e| self.err(e))?;
        let body = self.check(resp)?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| self.err(format!("unexpected answer: {e}")))?;
        Ok(v.get("removed").and_then(serde_json::Value::as_bool) == Some(true))
    }

    /// `GET /delayed`.
    pub fn delayed(&self) -> Result<Vec<DelayedView>, AdminError> {
        let resp = self
            .agent
            .get(format!("http://{}/delayed", self.addr))
            .call()
            .map_err(|e| self.err(e))?;
        let body = self.check(resp)?;
        #[derive(Deserialize)]
        struct List {
            delayed: Vec<DelayedView>,
        }
        serde_json::from_str::<List>(&body)
            .map(|l| l.delayed)
            .map_err(|e| self.err(format!("unexpected answer: {e}")))
    }

    /// `POST /delayed/{id}`.
    pub fn release(&self, id: u64, verdict: DelayVerdict) -> Result<(), AdminError> {
        let resp = self
            .agent
            .post(format!("http://{}/delayed/{id}", self.addr))
            .send_json(VerdictBody {
                verdict: verdict.to_string(),
            })
            .map_err(|e| self.err(e))?;
        self.check(resp).map(drop)
    }
}
