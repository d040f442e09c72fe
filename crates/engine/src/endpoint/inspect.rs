//! What an operator sees of each connection (`serval flows`), and the application blob a
//! connection snapshot carries through a move (`docs/snapshot.md`, the APP block).

use serval_table::ListenerId;
use serval_wire::{FlowId, Locator, ServiceId};

use super::{ConnectionHandle, Endpoint};
use crate::Instant;
use crate::connection::{Role, State};
use crate::endpoint::ExportError;
use crate::snapshot::{SnapshotError, SnapshotReader, block};
use crate::transport::conn::TransportStats;

/// The largest application blob a snapshot carries (the APP block): 16 MiB. State beyond that
/// belongs in a store both hosts reach, not in a connection's snapshot.
pub const MAX_APP_STATE: usize = 16 << 20;

/// One live connection as an operator sees it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Its handle on this endpoint.
    pub handle: ConnectionHandle,
    /// Whether this end sent the SYN or answered it.
    pub role: Role,
    /// The service it was opened to.
    pub service: ServiceId,
    /// Where it is in its life.
    pub state: State,
    /// This end's flowID.
    pub local_flow: FlowId,
    /// The peer's flowID.
    pub peer_flow: FlowId,
    /// The locator this end sends from.
    pub local: Locator,
    /// The locator of the peer.
    pub peer: Locator,
    /// The listener that accepted it (a server's), if any.
    pub listener: Option<ListenerId>,
    /// How many times its server end moved between hosts (the move epoch).
    pub moves: u32,
    /// Whether it is exported and frozen here, waiting for its importer.
    pub exported: bool,
    /// The transport's counters (bytes each way, RTT, losses).
    pub stats: TransportStats,
}

impl Endpoint {
    /// The connection `h`, as [`ConnectionInfo`].
    pub fn connection_info(&self, h: ConnectionHandle) -> Option<ConnectionInfo> {
        let c = self.conn_ref(h)?;
        Some(ConnectionInfo {
            handle: h,
            role: c.role,
            service: c.service,
            state: c.state,
            local_flow: c.local_flow,
            peer_flow: c.peer_flow,
            local: c.local,
            peer: c.peer,
            listener: c.listener,
            moves: c.move_epoch(),
            exported: c.is_exported(),
            stats: c.transport.stats(),
        })
    }

    /// Stream bytes connection `h` holds, to send and received unread: what an export now
    /// would carry of its stream.
    pub fn buffered(&self, h: ConnectionHandle) -> Option<(usize, usize)> {
        Some(self.conn_ref(h)?.transport.buffered())
    }

    /// Every live connection of this endpoint, in handle order.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        (0..self.conns.len())
            .filter_map(|i| {
                let generation = *self.generations.get(i)?;
                self.connection_info(ConnectionHandle::new(i, generation))
            })
            .collect()
    }

    /// The live connection whose flowID here is `flow`.
    pub fn find_flow(&self, flow: FlowId) -> Option<ConnectionHandle> {
        self.connections()
            .into_iter()
            .find(|c| c.local_flow == flow)
            .map(|c| c.handle)
    }

    /// [`export`](Self::export), with the application's state for the connection in the
    /// snapshot's APP block (opaque to the engine, at most [`MAX_APP_STATE`] bytes): the
    /// importer hands it to the application that continues the connection
    /// ([`import_with_app`](Self::import_with_app)).
    pub fn export_with_app(
        &mut self,
        h: ConnectionHandle,
        now: Instant,
        app: &[u8],
    ) -> Result<Vec<u8>, ExportError> {
        if app.len() > MAX_APP_STATE {
            return Err(ExportError::AppStateTooLarge(app.len()));
        }
        self.export_blocks(h, now, |w| w.add_bytes(block::APP, app.to_vec()))
    }

    /// [`import`](Self::import), returning the application blob of the snapshot's APP block
    /// too (`None` if it has none).
    pub fn import_with_app(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(ConnectionHandle, Option<Vec<u8>>), SnapshotError> {
        let app = app_block(bytes, now)?;
        let h = self.import_any(bytes, now)?;
        Ok((h, app))
    }

    /// Whether [`import_with_app`](Self::import_with_app) would take the snapshot now, with
    /// the same errors, changing nothing: a migration agent checks before the exporter lets
    /// go of the connection, and imports only once it has.
    pub fn check_import(&self, bytes: &[u8], now: Instant) -> Result<(), SnapshotError> {
        app_block(bytes, now)?;
        self.prepare_import(bytes, now).map(drop)
    }
}

/// The APP block's blob, if the snapshot has one (at most one, of at most
/// [`MAX_APP_STATE`] bytes).
fn app_block(bytes: &[u8], now: Instant) -> Result<Option<Vec<u8>>, SnapshotError> {
    let app = {
        let r = SnapshotReader::parse(bytes)?;
        let mut blocks = r.blocks(block::APP, now);
        let first = blocks.next();
        if blocks.next().is_some() {
            return Err(SnapshotError::Malformed {
                block: block::APP,
                reason: "more than one APP block",
            });
        }
        first.map(|mut b| {
            let n = b.remaining();
            b.raw(n).map(<[u8]>::to_vec)
        })
    }
    .transpose()?;
    if app.as_ref().is_some_and(|a| a.len() > MAX_APP_STATE) {
        return Err(SnapshotError::Malformed {
            block: block::APP,
            reason: "application state larger than MAX_APP_STATE",
        });
    }
    Ok(app)
}
