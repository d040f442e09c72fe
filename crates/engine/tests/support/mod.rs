//! What the engine's integration tests share: locators, names, endpoints with a fresh table,
//! and draining their output. Each test file includes it with `mod support;`.
#![allow(dead_code, clippy::unwrap_used)] // not every test file uses every helper

use std::sync::Arc;

use serval_engine::Instant;
use serval_engine::endpoint::{Endpoint, EndpointConfig, Event, Transmit};
use serval_table::ServiceTable;
use serval_wire::{Locator, ServiceId};

/// A client host.
pub const A: &str = "10.0.0.1:54324";
/// An instance host.
pub const B: &str = "10.0.0.2:54324";
/// A router.
pub const R: &str = "10.0.0.3:54324";

pub fn loc(s: &str) -> Locator {
    s.parse().unwrap()
}

pub fn svc(name: &str) -> ServiceId {
    ServiceId::from_name(name).unwrap()
}

/// `ms` milliseconds of virtual time.
pub fn at(ms: u64) -> Instant {
    Instant::from_nanos(ms * 1_000_000)
}

/// An endpoint at `addr` with its own empty service table, seeded with `seed`.
pub fn endpoint_with(addr: &str, seed: u8, config: EndpointConfig) -> Endpoint {
    Endpoint::new(
        config,
        [seed; 32],
        Arc::new(ServiceTable::new()),
        vec![loc(addr)],
    )
}

/// [`endpoint_with`] the default configuration.
pub fn endpoint(addr: &str, seed: u8) -> Endpoint {
    endpoint_with(addr, seed, EndpointConfig::default())
}

/// Everything `ep` has to send at `now`.
pub fn drain(ep: &mut Endpoint, now: Instant) -> Vec<Transmit> {
    std::iter::from_fn(|| ep.poll_transmit(now)).collect()
}

/// Every event `ep` has.
pub fn events(ep: &mut Endpoint) -> Vec<Event> {
    std::iter::from_fn(|| ep.poll_event()).collect()
}
