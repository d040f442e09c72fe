//! The Serval service table and flow table (DESIGN.md §2, §4, §5).
//!
//! * [`ServiceTable`]: serviceID prefix → prioritized, weighted [`Target`]s, resolved by longest
//!   prefix match and then a consistent per-flow choice; read through lock-free
//!   [`TableSnapshot`]s.
//! * [`FlowTable`]: this host's flowIDs → flow state, with collision-free random allocation.
//! * [`PrefixMap`]: the persistent longest-prefix-match map under the service table, usable on
//!   its own; [`oracle::BitTrie`] is the naive reference it is tested against.
//!
//! # Why this trie
//!
//! ServiceIDs are 256 bits, and name-derived ones are eight 32-bit label hashes, TLD first, so
//! rules cluster at `/32`, `/64`, `/96` … plus exact `/256` IDs, and their bits are random within
//! each label. A binary or Patricia trie walks up to 256 (or one per distinguishing bit) nodes;
//! [`PrefixMap`] is a multibit trie with an 8-bit stride, so a lookup takes at most 33 steps and
//! usually 5–8, and *path compression* skips the bytes nobody branches on (each node keeps its
//! full key and checks the skipped bytes on arrival with one masked compare of four words).
//! Nodes adapt to their fan-out like ART's: the child slots live in the node's own allocation in
//! one of 17 size classes, indexed through a 256-bit bitmap and a popcount, so a dense node costs
//! 24 bytes per child and a sparse one a few slots. A rule with nothing under it is a *leaf* in
//! its parent's slot rather than a chain of nodes, which keeps memory near 130–150 bytes per
//! rule on name-like rule sets. Prefixes whose length is not a multiple of 8 live in the node
//! whose stride contains them, in a 255-slot bitmap ordered so that the longest match for a byte
//! is its highest set bit. Lookups allocate nothing, never recurse and never backtrack; a batch
//! lookup interleaves 16 lookups with prefetches so their cache misses overlap. An opt-in
//! *anchor index* ([`PrefixMap::with_anchor_index`]) starts a lookup at bit 64 with one hash
//! probe instead of walking the levels above, for about 65 bytes per rule more. See
//! [`prefix_map`].
//!
//! # Why snapshots
//!
//! Lookups must never wait for registrations. [`PrefixMap`] is persistent: cloning shares every
//! node, and a change copies only the O(depth) nodes on its path. The service table keeps the
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
pub use prefix_map::{Match, PrefixMap};
pub use service::{
    Action, ListenerId, Resolution, ServiceTable, TableError, TableSnapshot, TableTx, Target,
};
