//! A small etcd v3 client: the calls Serval's registry makes (KV range, put, delete, txn and
//! compact; watch; lease grant, revoke, keep-alive and time-to-live; status), over tonic.
//!
//! etcd's API is compiled from `proto/etcd.proto` at build time by [protox], a protobuf
//! compiler written in Rust, so the workspace builds with nothing but the Rust toolchain (no
//! `protoc`). The generated messages are in [`pb`], as plain structs: requests are built with
//! struct literals and `..Default::default()`, and responses read as fields.
//!
//! One [`Client`] talks to one member. Its connection is made lazily and re-made after a
//! failure, so creating a client never fails for a member that is down; failing over between
//! members is the caller's policy (the registry's `call` does it).
//!
//! ```no_run
//! # async fn f() -> Result<(), serval_etcd::Error> {
//! use serval_etcd::{Client, Options, pb};
//! let c = Client::connect_lazy("127.0.0.1:2379", &Options::default())?;
//! let lease = c.lease_grant(10).await?.id;
//! c.put(pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease, ..Default::default() })
//!     .await?;
//! let got = c.get(b"k".to_vec()).await?;
//! assert_eq!(got.kvs[0].value, b"v");
//! # Ok(()) }
//! ```
//!
//! [protox]: https://docs.rs/protox

use std::time::Duration;

use futures_util::stream;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// etcd's messages and generated gRPC clients (package `etcdserverpb`).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use pb::watch_client::WatchClient;

/// The text etcd puts in the error of a read or watch at a revision it has compacted away.
const COMPACTED: &str = "required revision has been compacted";
/// The text of etcd's error for a lease that does not exist (expired or revoked).
const LEASE_NOT_FOUND: &str = "requested lease not found";

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The member's address is not a valid `HOST:PORT` or URL.
    #[error("bad etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The address as given.
        endpoint: String,
        /// Why it was refused.
        reason: String,
    },
    /// The call failed: etcd's error, or the connection's (unreachable, reset, timed out).
    #[error("{}", status_text(.0))]
    Status(#[from] tonic::Status),
    /// A keep-alive found no such lease (it expired or was revoked).
    #[error("lease {0:x} not found")]
    LeaseNotFound(i64),
    /// etcd ended a stream before answering the request sent on it.
    #[error("etcd closed the stream before answering")]
    Closed,
}

/// A status as one line: its code, its message, then the causes its message leaves out (a
/// failed connection's message is only "tcp connect error"; the cause says "Connection
/// refused").
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

impl Error {
    /// Whether the call asked for a revision etcd has compacted away (any member would say
    /// the same: read the newest revision instead).
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Status(s) if s.message().contains(COMPACTED))
    }

    /// Whether the call named a lease that does not exist.
    pub fn is_lease_not_found(&self) -> bool {
        match self {
            Error::LeaseNotFound(_) => true,
            Error::Status(s) => s.message().contains(LEASE_NOT_FOUND),
            _ => false,
        }
    }
}

/// How to connect to a member.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Longest opening a connection may take (default 1 s).
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval, and how long a ping may go unanswered before the connection is
    /// dropped (default none): notices a member that went silent without closing.
    pub keepalive: Option<Duration>,
    /// Refuse requests while the member has no raft leader (etcd's `hasleader` metadata),
    /// rather than waiting for one (default true).
    pub require_leader: bool,
    /// The largest message accepted from etcd: a page of a range, a batch of watch events
    /// (default 64 MiB).
    pub max_message: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(1),
            keepalive: None,
            require_leader: true,
            max_message: 64 << 20,
        }
    }
}

impl Options {
    /// These options with another connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// These options with HTTP/2 keep-alive pings every `interval`.
    pub fn with_keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = Some(interval);
        self
    }

    /// These options with `hasleader` metadata on (true) or off.
    pub fn with_require_leader(mut self, require: bool) -> Self {
        self.require_leader = require;
        self
    }

    /// These options with another largest accepted message.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }
}

/// Adds the metadata every request carries.
#[derive(Clone, Copy, Debug)]
pub struct RequestMetadata {
    require_leader: bool,
}

impl Interceptor for RequestMetadata {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.require_leader {
            req.metadata_mut()
                .insert("hasleader", MetadataValue::from_static("true"));
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, RequestMetadata>;

/// A client of one etcd member. Cloning is cheap and clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    kv: KvClient<Svc>,
    watch: WatchClient<Svc>,
    lease: LeaseClient<Svc>,
    maintenance: MaintenanceClient<Svc>,
}

impl Client {
    /// A client of the member at `endpoint` (`HOST:PORT`, `[V6ADDR]:PORT`, or an `http://`
    /// URL). No connection is made until the first call, so this fails only for an address
    /// that cannot be parsed.
    pub fn connect_lazy(endpoint: &str, options: &Options) -> Result<Client, Error> {
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let bad = |reason: String| Error::BadEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        if url.starts_with("https://") {
            return Err(bad("TLS is not supported; use http://".into()));
        }
        let mut ep = Endpoint::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true);
        if let Some(k) = options.keepalive {
            ep = ep
                .http2_keep_alive_interval(k)
                .keep_alive_timeout(k)
                .keep_alive_while_idle(true);
        }
        let channel = ep.connect_lazy();
        let meta = RequestMetadata {
            require_leader: options.require_leader,
        };
        let max = options.max_message;
        Ok(Client {
            kv: KvClient::with_interceptor(channel.clone(), meta).max_decoding_message_size(max),
            watch: WatchClient::with_interceptor(channel.clone(), meta)
                .max_decoding_message_size(max),
            lease: LeaseClient::with_interceptor(channel.clone(), meta),
            maintenance: MaintenanceClient::with_interceptor(channel, meta),
        })
    }

    /// Reads keys as `req` says (a key, a range, a limit, a revision).
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, Error> {
        Ok(self.kv.clone().range(req).await?.into_inner())
    }

    /// Reads one key at the newest revision.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<pb::RangeResponse, Error> {
        self.range(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
    }

    /// Writes one key.
    pub async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse, Error> {
        Ok(self.kv.clone().put(req).await?.into_inner())
    }

    /// Deletes a key or a range.
    pub async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, Error> {
        Ok(self.kv.clone().delete_range(req).await?.into_inner())
    }

    /// Runs a transaction: `success` if every comparison holds, else `failure`.
    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        Ok(self.kv.clone().txn(req).await?.into_inner())
    }

    /// Discards the history before `revision`; `physical` waits until it is gone from disk.
    pub async fn compact(
        &self,
        revision: i64,
        physical: bool,
    ) -> Result<pb::CompactionResponse, Error> {
        let req = pb::CompactionRequest { revision, physical };
        Ok(self.kv.clone().compact(req).await?.into_inner())
    }

    /// Grants a lease of `ttl_secs` seconds.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<pb::LeaseGrantResponse, Error> {
        let req = pb::LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let resp = self.lease.clone().lease_grant(req).await?.into_inner();
        if resp.error.is_empty() {
            Ok(resp)
        } else {
            Err(tonic::Status::unknown(resp.error).into())
        }
    }

    /// Revokes a lease, deleting every key attached to it in the same revision.
    pub async fn lease_revoke(&self, id: i64) -> Result<pb::LeaseRevokeResponse, Error> {
        let req = pb::LeaseRevokeRequest { id };
        Ok(self.lease.clone().lease_revoke(req).await?.into_inner())
    }

    /// Refreshes a lease once, back to its granted TTL; [`Error::LeaseNotFound`] if it is
    /// gone. (etcd answers a keep-alive for a missing lease with a TTL of 0, not an error.)
    pub async fn lease_keep_alive(&self, id: i64) -> Result<pb::LeaseKeepAliveResponse, Error> {
        // One request on the stream, then the stream's end: etcd answers it first.
        let requests = stream::iter([pb::LeaseKeepAliveRequest { id }]);
        let mut answers = self
            .lease
            .clone()
            .lease_keep_alive(requests)
            .await?
            .into_inner();
        let resp = answers.message().await?.ok_or(Error::Closed)?;
        if resp.ttl <= 0 {
            return Err(Error::LeaseNotFound(id));
        }
        Ok(resp)
    }

    /// A lease's remaining TTL (-1 if it does not exist), with its keys if `keys`.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse, Error> {
        let req = pb::LeaseTimeToLiveRequest { id, keys };
        Ok(self
            .lease
            .clone()
            .lease_time_to_live(req)
            .await?
            .into_inner())
    }

    /// Opens a watch. The first message etcd sends on it confirms the creation (or says why
    /// it was cancelled, such as a compacted start revision); events follow.
    pub async fn watch(&self, req: pb::WatchCreateRequest) -> Result<Watch, Error> {
        let (requests, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(req)),
        };
        // Cannot fail: the channel is new, empty and its receiver alive.
        let _ = requests.try_send(create);
        let outgoing = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let responses = self.watch.clone().watch(outgoing).await?.into_inner();
        Ok(Watch {
            _requests: requests,
            responses,
        })
    }

    /// The member's status: its ID, the leader's, the store's revision and size.
    pub async fn status(&self) -> Result<pb::StatusResponse, Error> {
        Ok(self
            .maintenance
            .clone()
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }
}

/// An open watch: responses in order until etcd ends it or the connection breaks.
#[derive(Debug)]
pub struct Watch {
    /// Held so that the request half of the stream stays open: etcd ends a watch whose
    /// client has closed its side.
    _requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
}

impl Watch {
    /// The next response; `None` once etcd has closed the stream.
    pub async fn message(&mut self) -> Result<Option<pb::WatchResponse>, Error> {
        Ok(self.responses.message().await?)
    }
}

/// The end of the range of every key that starts with `prefix`: `prefix` with its last byte
/// below 0xff incremented and what follows it dropped; `[0]` (every key to the end) when
/// there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl pb::RequestOp {
    /// A put of `key` = `value` inside a transaction, attached to `lease` (0 for none).
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                lease,
                ..Default::default()
            })),
        }
    }

    /// A delete of `key` inside a transaction.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: key.into(),
                    ..Default::default()
                },
            )),
        }
    }
}

impl pb::Compare {
    /// Holds when `key` was last modified at `revision`.
    pub fn mod_revision_is(key: impl Into<Vec<u8>>, revision: i64) -> Self {
        pb::Compare {
            result: pb::compare::CompareResult::Equal.into(),
            target: pb::compare::CompareTarget::Mod.into(),
            key: key.into(),
            target_union: Some(pb::compare::TargetUnion::ModRevision(revision)),
            range_end: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(b"/serval/v1/reg/"), b"/serval/v1/reg0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[tokio::test]
    async fn endpoints_parse_or_fail_clearly() {
        let o = Options::default();
        assert!(Client::connect_lazy("127.0.0.1:2379", &o).is_ok());
        assert!(Client::connect_lazy("[::1]:2379", &o).is_ok());
        assert!(Client::connect_lazy("http://localhost:2379", &o).is_ok());
        let e = Client::connect_lazy("https://h:2379", &o).unwrap_err();
        assert!(e.to_string().contains("TLS"), "{e}");
        let e = Client::connect_lazy("not a host:x", &o).unwrap_err();
        assert!(matches!(e, Error::BadEndpoint { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_member_that_is_down_fails_the_call_not_the_client() {
        // Port 1 on loopback: nothing listens there.
        let c = Client::connect_lazy(
            "127.0.0.1:1",
            &Options::default().with_connect_timeout(Duration::from_millis(200)),
        )
        .unwrap();
        let e = c.get(b"k".to_vec()).await.unwrap_err();
        assert!(matches!(e, Error::Status(_)), "{e}");
        assert!(!e.is_compacted() && !e.is_lease_not_found());
        assert!(e.to_string().contains("refused"), "the cause is kept: {e}");
    }
}
