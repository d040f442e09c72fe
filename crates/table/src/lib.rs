//! The Serval service table and flow table (DESIGN.md §2, §4, §5).
//!
//! * [`ServiceTable`]: serviceID prefix → prioritized, weighted [`Target`]s, resolved by longest
//!   prefix match and then a consistent per-flow choice; read through lock-free
//!   [`TableSnapshot`]s.
//! * [`FlowTable`]: this host's flowIDs → flow state, with collision-free random allocation.
//! * [`PrefixMap`]: the persistent longest-prefix-match map under the service table, usable on
//!   its own; [`oracle::BitTrie`] is the naive reference it is tested against.
//!
//! # Why hash probes per chunk level
//!
//! ServiceIDs are 256 bits, and name-derived ones are 32-bit label chunks, TLD first (the last
//! label takes the rest), so rules cluster at `/32`, `/64`, `/96` … plus exact `/256` IDs. A
//! trie walks one node per stride and at a million rules pays a cache miss for most of them (it
//! measured about five dependent misses per lookup). [`PrefixMap`] instead keeps every rule in
//! a hash table keyed by `(length, prefix)` and probes the nine chunk levels longest first; a
//! rule of another length hangs under a node (or value-less marker) at the chunk level above
//! it, whose bitmap says which extra lengths to probe. The table is split into small
//! open-addressed shards, and the directory of shards carries a 256-bit Bloom filter per shard
//! that stays in the last-level cache, so probes for absent keys rarely go past it and a lookup
//! usually reads one shard slot beyond the filters (measured in `BENCHMARKS.md`, issue 14). A batch lookup reads the filters of 16 lookups, then loads the 16
//! candidate slots, in two tight loops, so their misses overlap. Keys are hashed with a
//! per-map random seed so crafted IDs cannot pile into one shard. See [`prefix_map`].
//!
//! # Why snapshots
//!
//! Lookups must never wait for registrations. [`PrefixMap`] is persistent: cloning shares all
//! storage, and a change copies only the top directory array, one directory group and one shard
//! (each a few kilobytes) if they are shared. The service table keeps the
//! current map behind an [`arc_swap::ArcSwap`]: a reader's [`ServiceTable::snapshot`] is one
//! atomic load; a writer (one at a time, under a mutex) clones the map, applies a batch of
//! changes and publishes the result with one atomic store. Readers see each batch entirely or not
//! at all, and a snapshot they hold never changes under them.
//!
//! # Why rendezvous hashing
//!
//! Every router on a flow's path must pick the same instance for it, and removing an instance
//! must move only its own flows (DESIGN.md §5). Weighted rendezvous hashing gives both with no
//! shared state: each candidate's score depends only on the flow key and the candidate's
//! identity (a hash of what it *is*, not of its position), the best score wins, and a candidate
//! wins in proportion to its weight. It needs no table rebuild on change (unlike Maglev) and
//! entries have few targets, so scoring each is cheap. Scores are bit-identical across
//! platforms; see [`choice`].
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod choice;
pub mod flow;
pub mod oracle;
pub mod prefix_map;
pub mod service;

pub use flow::FlowTable;
pub use prefix_map::PrefixMap;
pub use service::{
    Action, ListenerId, Resolution, ServiceTable, TableError, TableSnapshot, TableTx, Target,
};
