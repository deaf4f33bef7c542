//! Pieces shared by the channel workloads: the TSC clock, the payload
//! buffer and the per-peer result records.

use crate::{arch, fail, info, set_result};
use intervm_protocol::probe::{
    results, shmem_source_bytes, ROUND_LOG_GPA, ROUND_LOG_MAX, SHMEM_BUF_GPA as BUF_BASE,
};

/// The TSC, in milliseconds for timeouts.
pub struct Clock {
    khz: u64,
}

impl Clock {
    /// Reads the TSC frequency the VMM put in the boot-info page.
    pub fn new() -> Self {
        // SAFETY: the boot-info page is identity mapped.
        let khz = unsafe { core::ptr::read_volatile(&(*info()).tsc_khz) };
        // Unknown frequency: assume 1 GHz; only timeouts depend on it.
        Self {
            khz: if khz == 0 { 1_000_000 } else { khz },
        }
    }

    /// TSC ticks per millisecond.
    pub fn khz(&self) -> u64 {
        self.khz
    }

    /// Milliseconds since the TSC started.
    pub fn now_ms(&self) -> u64 {
        arch::rdtsc() / self.khz
    }
}

/// Guest RAM size.
pub fn mem_size() -> u64 {
    // SAFETY: the boot-info page is identity mapped.
    unsafe { core::ptr::read_volatile(&(*info()).mem_size) }
}

/// The payload buffer: `shmem_source_bytes(bytes, chunk)` bytes at
/// `SHMEM_BUF_GPA`.
pub fn buffer(bytes: u64, chunk: u64) -> Result<&'static mut [u8], u32> {
    let len = shmem_source_bytes(bytes, chunk);
    if len == 0 || BUF_BASE + len > mem_size() {
        return Err(fail(3, mem_size()));
    }
    // SAFETY: [BUF_BASE, BUF_BASE + len) is guest RAM (checked against
    // mem_size), identity mapped, and used by nothing else in the probe.
    Ok(unsafe { core::slice::from_raw_parts_mut(BUF_BASE as *mut u8, len as usize) })
}

/// A second buffer right after the payload buffer (whose length is
/// `after`), page aligned: `want` bytes, or what guest RAM still has when
/// that is less (but at least `min`).
pub fn scratch(after: usize, want: u64, min: u64) -> Result<&'static mut [u8], u32> {
    let start = (BUF_BASE + after as u64).next_multiple_of(4096);
    let len = want.min(mem_size().saturating_sub(start));
    if len < min.max(1) {
        return Err(fail(3, mem_size()));
    }
    // SAFETY: [start, start + len) is guest RAM (checked against
    // mem_size), identity mapped, past the payload buffer and used by
    // nothing else in the probe.
    Ok(unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len as usize) })
}

/// Writes the result record of `peer`.
pub fn record(peer: u32, bytes: u64, frames: u64, stream: u64, tsc: u64) {
    record_at(results::SHM_PEER_FIRST, peer, bytes, frames, stream, tsc);
}

/// Writes `peer`'s record in the table of records starting at slot `first`
/// ([`results::SHM_PEER_FIRST`] or [`results::SHM_SENT_FIRST`]).
pub fn record_at(first: usize, peer: u32, bytes: u64, frames: u64, stream: u64, tsc: u64) {
    let base = first + peer as usize * results::SHM_RECORD_LEN;
    set_result(base, bytes);
    set_result(base + 1, frames);
    set_result(base + 2, stream);
    set_result(base + 3, tsc);
}

/// The times of a workload's rounds (transfers, or ping-pong round
/// trips): each in the round log, their sum, the fastest and the slowest.
pub struct RoundTimes {
    /// Cycles of all rounds.
    pub total: u64,
    fastest: u64,
    slowest: u64,
}

impl RoundTimes {
    /// No round yet.
    pub fn new() -> Self {
        Self {
            total: 0,
            fastest: u64::MAX,
            slowest: 0,
        }
    }

    /// Notes round `round` (1-based), which took `cycles`.
    pub fn add(&mut self, round: u64, cycles: u64) {
        self.total += cycles;
        self.fastest = self.fastest.min(cycles);
        self.slowest = self.slowest.max(cycles);
        if (1..=ROUND_LOG_MAX).contains(&round) {
            // SAFETY: the round log lies in identity-mapped guest RAM below
            // the probe image that nothing else uses, and `round - 1` is
            // below ROUND_LOG_MAX.
            unsafe {
                core::ptr::write_volatile(
                    (ROUND_LOG_GPA as *mut u64).add(round as usize - 1),
                    cycles,
                )
            };
        }
    }

    /// Publishes the fastest and slowest of `rounds` rounds.
    pub fn publish(&self, rounds: u64) {
        set_result(results::SHM_ROUND_MIN, self.fastest);
        set_result(results::SHM_ROUND_MAX, self.slowest);
        set_result(results::SHM_ROUNDS, rounds);
    }
}
