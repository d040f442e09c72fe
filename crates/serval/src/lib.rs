//! Serval in Rust: connect to services by name.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use serval::{Endpoint, ServiceId, ServicePrefix};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let server = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()]).await?;
//! let service = ServiceId::from_name("echo.example.com").unwrap();
//! let mut listener = server.listen(ServicePrefix::exact(service))?;
//!
//! let client = Endpoint::bind(&["127.0.0.1:0".parse().unwrap()]).await?;
//! let mut stream = client.connect_via(service, server.local_locators()[0]).await?;
//! stream.write_all(b"hello").await?;
//! stream.shutdown().await?;
//!
//! let mut accepted = listener.accept().await?;
//! let mut got = Vec::new();
//! accepted.read_to_end(&mut got).await?;
//! # Ok(()) }
//! ```
//!
//! With a service router, neither side needs the other's address: the server calls
//! [`Endpoint::set_router`], which registers its listeners there (and keeps the registrations
//! alive, and withdraws them when a listener is dropped), and the client calls
//! [`Endpoint::set_router`] or [`Endpoint::set_default_route`] and then
//! [`Endpoint::connect`] by name. A router itself uses [`Endpoint::serve_registrations`].
//!
//! The [`Endpoint`] owns UDP sockets (batched with `quinn-udp`) and a task that drives the
//! sans-IO [`serval_engine`] state machines; [`Stream`] is shaped like `tokio::net::TcpStream`,
//! [`ServiceListener`] like `TcpListener`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod asked_move;
mod datagram;
mod delay;
mod endpoint;
mod migrate;
mod moving;
mod multipath;
mod netwatch;
mod registration;
mod standby;
mod stream;

pub use asked_move::{REQUEST_MOVE_LIMIT, REQUEST_MOVE_REPEAT};
pub use datagram::DatagramSocket;
pub use delay::{DelayedSyn, HeldSynId, ReleaseError, Verdict};
pub use endpoint::{
    DEFAULT_DISCOVERY_GROUP, DEFAULT_DISCOVERY_GROUP_V6, DEFAULT_DISCOVERY_PORT,
    DEFAULT_DISCOVERY_TIMEOUT, DiscoveryConfig, Endpoint, Registration, ServiceListener,
};
pub use migrate::{
    AGENT_LIMIT, ASKED_MOVE_BACKOFF, FlowMove, HANDOVER_LIMIT, MIGRATE_SERVICE, MigrationConfig,
    Migrator, Phases, REBIND_LIMIT,
};
pub use moving::{DRAIN_LIMIT, DRAIN_TARGET, ExportedStream, MoveFailed};
pub use multipath::{AddPathError, MAX_PATHS, PathInfo, PathSummary, Scheduler, UnknownScheduler};
pub use netwatch::{FollowHost, PathEvent};
pub use registration::{REQUEST_QUEUE, RegistrationRequests, RegistrationStatus};
pub use serval_engine::connection::ConnectError;
pub use serval_engine::connection::{Role, State as ConnectionState};
pub use serval_engine::endpoint::ConnectionHandle;
pub use serval_engine::endpoint::NamedDatagram;
pub use serval_engine::endpoint::{
    CERT_SYN_LEN, CertError, CertProblem, CertificateChain, CloseReason, EndpointConfig,
    IdentityError, PeerIdentity, Protection, RevocationLists, ServerName, SynCookies, SynRateLimit,
    TrustAnchors,
};
pub use serval_engine::endpoint::{
    ConnectionInfo, EndpointStats, MAX_APP_STATE, RegistrationRequest,
};
pub use serval_engine::registrar::{LeaseConfig, RegistrarEvent, RegistrationState};
pub use serval_engine::transport::conn::TransportStats;
pub use serval_keys::{PrivateKey, PublicKey};
pub use serval_table::{Action, Target};
pub use serval_wire::registration::{MessageType, RegistrationRepr, RejectReason};
pub use serval_wire::{FlowId, Locator, ServiceId, ServicePrefix};
pub use standby::{DEFAULT_DETECT, HEARTBEAT, STANDBY_LOST, StandbyConfig, Takeover, run_standby};
pub use stream::{OwnedReadHalf, OwnedWriteHalf, ReadHalf, Stream, WriteHalf};
