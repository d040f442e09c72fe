//! The router behind the admin API ([`serval_admin`]): its table, leases, health and counters.

use serval_admin::{AdminSource, DelayVerdict, DelayedView, Metric};
use serval_registry::{Health, Leased};
use serval_table::{Action, TableSnapshot, Target};
use serval_wire::ServicePrefix;

use crate::Router;

impl AdminSource for Router {
    fn table(&self) -> TableSnapshot {
        Router::table(self)
    }

    fn leases(&self) -> Vec<Leased> {
        self.registrations()
    }

    fn registry_health(&self) -> Health {
        Router::registry_health(self)
    }

    fn metrics(&self) -> Vec<Metric> {
        let s = self.stats();
        let healthy = matches!(Router::registry_health(self), Health::Synced);
        vec![
            Metric::gauge(
                "router_registrations",
                "Registrations held (this router's replica of the registry).",
                s.registrations,
            ),
            Metric::gauge(
                "router_table_prefixes",
                "Prefixes in the service table (registered and static).",
                Router::table(self).len() as u64,
            ),
            Metric::gauge(
                "router_registry_synced",
                "1 while the registry serves fresh data, 0 while degraded.",
                u64::from(healthy),
            ),
            Metric::counter(
                "router_registrations_accepted",
                "REGISTERs acknowledged, refreshes included.",
                s.registrations_accepted,
            ),
            Metric::counter(
                "router_registrations_created",
                "REGISTERs that created a registration.",
                s.registrations_created,
            ),
            Metric::counter(
                "router_registrations_rejected_not_accepted",
                "REGISTERs refused: prefix not accepted here.",
                s.rejected_not_accepted,
            ),
            Metric::counter(
                "router_registrations_rejected_limit",
                "REGISTERs refused: the registration limit was reached.",
                s.rejected_limit,
            ),
            Metric::counter(
                "router_registrations_rejected_unavailable",
                "REGISTERs refused: the registry could not be written.",
                s.rejected_unavailable,
            ),
            Metric::counter(
                "router_registrations_rejected_unauthorized",
                "Requests refused: under an authorized prefix and not signed by its key.",
                s.rejected_unauthorized,
            ),
            Metric::counter(
                "router_registrations_rejected_cookie_required",
                "Requests refused: the 60-byte form, with no room for a cookie.",
                s.rejected_cookie_required,
            ),
            Metric::counter(
                "router_registration_cookies_sent",
                "COOKIE answers: requests without a valid cookie (first contact or a forged source).",
                s.cookies_sent,
            ),
            Metric::gauge(
                "router_authorizations",
                "Prefix authorizations enforced (this router's and the registry's).",
                s.authorizations,
            ),
            Metric::counter(
                "router_authorizations_malformed",
                "Authorizations from the registry skipped: the key does not parse.",
                s.authorizations_malformed,
            ),
            Metric::counter(
                "router_unregistrations",
                "UNREGISTERs handled.",
                s.unregistrations,
            ),
            Metric::counter(
                "router_registrations_moved",
                "Registrations replaced by the same instance at a new locator.",
                s.moved,
            ),
            Metric::counter(
                "router_registrations_expired",
                "Registrations gone without an UNREGISTER through this router.",
                s.expired,
            ),
            Metric::counter(
                "router_registration_requests_dropped",
                "Registration requests dropped because the queues were full.",
                s.requests_dropped,
            ),
            Metric::counter(
                "router_registrations_malformed",
                "Registration messages that did not parse.",
                s.registrations_malformed,
            ),
            Metric::counter(
                "router_datagrams_received",
                "Datagrams received.",
                s.received,
            ),
            Metric::counter(
                "router_datagrams_malformed",
                "Datagrams that did not parse.",
                s.malformed,
            ),
            Metric::counter(
                "router_syns_forwarded",
                "SYNs (and datagrams by name) forwarded to an instance.",
                s.syns_forwarded,
            ),
            Metric::counter(
                "router_syns_nacked",
                "SYNs answered with a NACK: no registration serves the name.",
                s.syns_nacked,
            ),
            Metric::counter(
                "router_syns_dropped",
                "SYNs dropped: hop limit, forwarding loop or full send queue.",
                s.syns_dropped,
            ),
            Metric::counter(
                "router_syns_rate_limited",
                "SYNs dropped because their client address exceeded its rate.",
                s.syns_rate_limited,
            ),
            Metric::gauge(
                "router_delay_held",
                "SYNs held by DELAY rules now, waiting for a verdict.",
                s.syns_held_now,
            ),
            Metric::counter(
                "router_delay_syns_held",
                "SYNs a DELAY rule held.",
                s.syns_held,
            ),
            Metric::counter(
                "router_delay_resolved",
                "Held SYNs released with a resolve verdict (looked up again).",
                s.delay_resolved,
            ),
            Metric::counter(
                "router_delay_dropped",
                "Held SYNs released with a drop verdict (client NACKed).",
                s.delay_dropped,
            ),
            Metric::counter(
                "router_delay_timeouts",
                "Held SYNs that got no verdict in time (client NACKed).",
                s.delay_timeouts,
            ),
            Metric::counter(
                "router_delay_overflows",
                "SYNs a DELAY rule could not hold: the queue was full.",
                s.delay_overflows,
            ),
        ]
    }

    fn add_rule(&self, prefix: ServicePrefix, target: Target) -> Result<(), String> {
        Router::add_rule(self, prefix, target)
    }

    fn remove_rule(&self, prefix: ServicePrefix, action: Action) -> Result<bool, String> {
        Ok(Router::remove_rule(self, prefix, action))
    }

    fn delayed(&self) -> Vec<DelayedView> {
        self.held_syns()
            .into_iter()
            .map(|d| DelayedView {
                id: d.id.0,
                service: d.service.to_string(),
                client: d.client.to_string(),
                held_ms: d.held_for.as_millis() as u64,
                expires_in_ms: d.expires_in.as_millis() as u64,
            })
            .collect()
    }

    fn release(&self, id: u64, verdict: DelayVerdict) -> Result<bool, String> {
        let verdict = match verdict {
            DelayVerdict::Resolve => serval::Verdict::Resolve,
            DelayVerdict::Drop => serval::Verdict::Drop,
        };
        Ok(Router::release(self, serval::HeldSynId(id), verdict).is_ok())
    }
}
