//! The workspace's one system module: the only code allowed `unsafe` (docs/architecture.md,
//! "Conventions"). Every other crate denies it. What is here has no safe wrapper in the crates
//! the workspace uses, and each call carries its own SAFETY note:
//!
//! * [`trim_heap`]: glibc's `malloc_trim`, for daemons whose freed memory would otherwise stay
//!   resident (the `serval` command);
//! * [`repair`]: entering a network namespace from one thread, the `TCP_REPAIR` family of
//!   socket options, the `SIOCOUTQ`/`SIOCINQ` ioctls, rtnetlink address changes and a
//!   gratuitous ARP — the TCP hand-off that `pause-bench` measures Serval's server moves
//!   against (issue 10);
//! * [`fdpass`]: taking ownership of file descriptors received over a Unix socket
//!   (`SCM_RIGHTS`), for `serval expose`'s hand-over of its backend connections to a new
//!   process (issue 10 item 5);
//! * [`tcpcount`]: `TCP_INFO`'s byte counters, for `serval expose --standby-of` to learn what
//!   a dead primary wrote to and read from its backend connections;
//! * [`prefetch`]: the CPU's prefetch hint, for lookups that overlap their cache misses
//!   (`serval_table`'s batched longest-prefix match);
//! * [`advise_huge_pages`]: `madvise(MADV_HUGEPAGE)`, so that a large table that is read at
//!   random costs fewer TLB misses (`serval_table`'s anchor index).
#![allow(unsafe_code)]
#![warn(missing_docs)]

pub mod fdpass;
pub mod repair;
pub mod tcpcount;

/// Hands freed heap memory back to the operating system (glibc's `malloc_trim(0)`); nothing
/// on other allocators. Only pages that hold no live allocation are returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_heap() {
    unsafe extern "C" {
        /// glibc: releases free memory from the heaps (`malloc_trim(3)`).
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointers, touches only the allocator's own free memory
    // under its own locks, and may be called from any thread at any time.
    unsafe {
        malloc_trim(0);
    }
}

/// Other allocators (musl, other systems) return memory their own way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_heap() {}

/// Asks the CPU to start loading the cache line that holds `*r` (into every cache level), and
/// returns at once. A hint only: it never faults, changes no state a program can observe
/// except timing, and does nothing on targets without such an instruction here.
#[inline(always)]
pub fn prefetch<T: ?Sized>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 takes any address, valid or not, and neither reads memory into the
    // program nor faults; `r` is a valid reference besides. SSE is in every x86-64 CPU.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (r as *const T).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Asks the kernel to back the whole 2 MiB pages inside `s` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`), best effort: pages not yet touched get a huge page when first
/// written if one is free. Changes no contents; returns whether the kernel took the advice
/// (there may be no whole huge page inside `s`, or transparent huge pages may be off).
pub fn advise_huge_pages<T>(s: &[T]) -> bool {
    const HUGE: usize = 2 << 20;
    let start = s.as_ptr() as usize;
    let end = start + core::mem::size_of_val(s);
    let (from, to) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    if to <= from {
        return false;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: the range lies inside `s`'s allocation, which stays mapped while `s` is
    // borrowed; MADV_HUGEPAGE changes how it is backed, never its contents or its mapping.
    unsafe {
        libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}
