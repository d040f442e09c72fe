//! The admin API of a service instance (`serval listen`, `serval expose` with `--admin`):
//! its live flows, its metrics, and moves of its flows to another instance.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /instance` | [`InstanceView`]: the service, the instance's locators, its migration agent and key |
//! | `GET /flows` | `{"flows": [`[`FlowView`]`, …]}`, one per live flow |
//! | `GET /metrics` | the instance's counters in the Prometheus text format |
//! | `POST /migrate` | moves flows ([`MigrateRequest`]) and answers with a [`MigrateReport`] once every one has moved or failed; 400 with `{"error": …}` if the instance cannot move flows at all |
//!
//! [`Client`]'s `instance`, `flows` and `migrate` are the other side, used by `serval flows`
//! and `serval migrate`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::{AdminError, Client, Metric, render_metrics};

/// What `GET /instance` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The service as the operator typed it.
    pub service: String,
    /// The locators the instance's endpoint is bound to.
    pub locators: Vec<String>,
    /// Where the instance's migration agent takes moved flows (none: it takes none).
    pub agent: Option<String>,
    /// The key the agent proves itself with, as `serval keygen` prints it.
    pub key: Option<String>,
    /// Where a `serval expose` takes its hot standby's descriptor channel (`--standby-socket`;
    /// none: it takes no standby of the translator's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_socket: Option<String>,
}

/// One live flow, as `GET /flows` and `serval flows` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// The flowID at this instance (16 hex digits).
    pub flow: String,
    /// The service it was opened to.
    pub service: String,
    /// `server` (accepted here) or `client`.
    pub role: String,
    /// The locator this end uses.
    pub local: String,
    /// The peer's locator.
    pub peer: String,
    /// `established`, `exported` (frozen for a move), `time-wait`, …
    pub state: String,
    /// Stream bytes sent to the peer.
    pub bytes_sent: u64,
    /// Stream bytes received from it.
    pub bytes_received: u64,
    /// Smoothed round-trip time, in microseconds.
    pub rtt_us: u64,
    /// How many times the flow's server end moved between hosts.
    pub moves: u32,
    /// Its paths, path 0 (the flow's own) first: one unless it runs several (multipath).
    /// Absent from an instance that predates multipath.
    #[serde(default)]
    pub paths: Vec<PathView>,
}

/// One path of a flow ([`FlowView::paths`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathView {
    /// The path's ID (0: the flow's first path).
    pub id: u32,
    /// This end's locator on the path.
    pub local: String,
    /// The peer's locator on the path.
    pub remote: String,
    /// Joined and validated both ways (path 0 always is); a path still joining is not.
    pub active: bool,
    /// Carries data only while no other path works.
    pub backup: bool,
    /// Its probe timer fired while another path worked: no data goes on it until it answers.
    pub failed: bool,
    /// Smoothed round-trip time on the path, in microseconds.
    pub rtt_us: u64,
    /// Congestion window, in bytes.
    pub cwnd: u64,
    /// Bytes sent on the path (packets, headers included).
    pub bytes_sent: u64,
    /// Packets sent on the path that copied another path's data (the redundant scheduler).
    /// Absent from an instance that predates it.
    #[serde(default)]
    pub copies_sent: u64,
}

impl PathView {
    /// `joining`, `failed`, `backup` or `active`: the first that holds, in that order.
    pub fn state(&self) -> &'static str {
        if !self.active {
            "joining"
        } else if self.failed {
            "failed"
        } else if self.backup {
            "backup"
        } else {
            "active"
        }
    }
}

/// `POST /migrate`: which flows go where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The other instance's migration agent (its [`InstanceView::agent`]).
    pub agent: String,
    /// The key that agent must prove (its [`InstanceView::key`]).
    pub key: String,
    /// The flowIDs to move; every movable flow when empty.
    #[serde(default)]
    pub flows: Vec<String>,
}

/// How one flow's move ended, with each phase's time in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowMoveView {
    /// The flowID.
    pub flow: String,
    /// Why it did not move (none: it runs at the other instance).
    pub error: Option<String>,
    /// Until the application handed the stream over (includes `export_us`).
    pub handover_us: u64,
    /// Letting the stream send what it held before the freeze (no pause: data still flows).
    #[serde(default)]
    pub drain_us: u64,
    /// Freezing and exporting the connection.
    pub export_us: u64,
    /// Sending the snapshot and hearing it imported, less the import.
    pub transfer_us: u64,
    /// Importing it at the other instance.
    pub import_us: u64,
    /// Until the client answered the other instance's RSYN.
    pub rebind_us: u64,
    /// From the freeze until the flow ran at the other instance (an upper bound on the
    /// client's pause).
    pub frozen_us: u64,
    /// The snapshot's size in bytes.
    #[serde(default)]
    pub snapshot_bytes: u64,
}

/// The answer of `POST /migrate`: one entry per flow, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateReport {
    /// Each flow's move.
    pub flows: Vec<FlowMoveView>,
}

/// The future a [`InstanceSource::migrate`] returns.
pub type MigrateFuture = Pin<Box<dyn Future<Output = Result<MigrateReport, String>> + Send>>;

/// What an instance shows and does through its admin API.
pub trait InstanceSource: Send + Sync + 'static {
    /// The instance.
    fn instance(&self) -> InstanceView;
    /// Its live flows.
    fn flows(&self) -> Vec<FlowView>;
    /// Counters and gauges for `/metrics`.
    fn metrics(&self) -> Vec<Metric>;
    /// Moves flows to another instance; `Err` when this instance cannot move flows at all.
    fn migrate(&self, request: MigrateRequest) -> MigrateFuture;
}

/// Serves an instance's admin API on `listener` until the task is dropped.
pub async fn serve_instance(
    listener: tokio::net::TcpListener,
    source: Arc<dyn InstanceSource>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/instance", get(get_instance))
        .route("/flows", get(get_flows))
        .route("/metrics", get(get_metrics))
        .route("/migrate", post(post_migrate))
        .with_state(source);
    axum::serve(listener, app).await
}

type Source = State<Arc<dyn InstanceSource>>;

async fn get_instance(State(s): Source) -> Json<InstanceView> {
    Json(s.instance())
}

#[derive(Serialize, Deserialize)]
struct FlowList {
    flows: Vec<FlowView>,
}

async fn get_flows(State(s): Source) -> Json<FlowList> {
    Json(FlowList { flows: s.flows() })
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

async fn post_migrate(State(s): Source, Json(request): Json<MigrateRequest>) -> Response {
    match s.migrate(request).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e })),
        )
            .into_response(),
    }
}

/// How long `serval migrate` waits for a whole move: each flow may take the application's
/// hand-over, the transfer and the client's answer.
const MIGRATE_LIMIT: Duration = Duration::from_secs(600);

impl Client {
    /// `GET /instance`.
    pub fn instance(&self) -> Result<InstanceView, AdminError> {
        self.get_json("instance")
    }

    /// `GET /flows`.
    pub fn flows(&self) -> Result<Vec<FlowView>, AdminError> {
        self.get_json::<FlowList>("flows").map(|l| l.flows)
    }

    /// `POST /migrate`; waits for every flow's move to end.
    pub fn migrate(&self, request: &MigrateRequest) -> Result<MigrateReport, AdminError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(MIGRATE_LIMIT))
            .http_status_as_error(false)
            .build()
            .into();
        let resp = agent
            .post(format!("http://{}/migrate", self.addr))
            .send_json(request)
            .map_err(|e| self.err(e))?;
        let body = self.check(resp)?;
        serde_json::from_str(&body).map_err(|e| self.err(format!("unexpected answer: {e}")))
    }
}
