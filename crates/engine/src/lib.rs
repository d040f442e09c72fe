//! The sans-IO Serval protocol engine.
//!
//! No sockets, no clock, no global random source: time comes in as an [`Instant`] argument and
//! randomness from a source the caller provides. Being plain data, connection state can be
//! exported and imported on another host.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod connection;
pub mod endpoint;
pub mod frame;
pub mod registrar;
mod schedule;
pub mod snapshot;
pub mod time;
pub mod transport;

pub use time::Instant;
