//! The counting global allocator of the memory benchmarks (`conn-mem-bench`,
//! `reg-mem-bench`): every heap allocation of the process goes through `stats_alloc`.

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Live heap bytes right now. (`stats_alloc` already adds a reallocation's growth to
/// `bytes_allocated` and its shrinkage to `bytes_deallocated`; `bytes_reallocated` is the same
/// change again and must not be added.)
pub fn live_heap() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}
