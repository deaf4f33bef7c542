//! Doorbell ping-pong on an ivshmem-doorbell device: ring the peer through
//! BAR0's Doorbell register, wait for the peer's ring as an interrupt
//! (MSI-X, or INTx with Interrupt Status), count every one.

use crate::{arch, arg, cpl0, fail, pci, set_result, set_state};
use core::sync::atomic::Ordering;
use intervm_protocol::ivshmem::{self, DOORBELL, INTR_MASK, INTR_STATUS, IV_POSITION};
use intervm_protocol::probe::{
    doorbell_args as a, results, State, DB_BY_REGION, DB_EDGE, DB_INTX, DB_POLL, EXIT_OK,
    INTX_VECTOR, IRQ_VECTOR_BASE,
};
use intervm_protocol::ring;

/// [`intervm_protocol::probe::Workload::DoorbellPingPong`].
pub fn ping_pong() -> u32 {
    let id = ((ivshmem::VENDOR as u32) << 16) | ivshmem::DEVICE as u32;
    let Some(dev) = pci::find_nth(id, arg(a::DEVICE_INDEX) as usize) else {
        return fail(1, arg(a::DEVICE_INDEX));
    };
    let flags = arg(a::FLAGS);
    let intx = flags & DB_INTX != 0;
    let vector = arg(a::VECTOR) as u32;
    // Count from before interrupts can arrive: a peer may ring before this
    // side is set up, and that ring is delivered as soon as it is.
    let counter = if intx {
        &cpl0::PROBE_IRQ_COUNTS[INTX_VECTOR as usize]
    } else {
        &cpl0::PROBE_IRQ_COUNTS[IRQ_VECTOR_BASE as usize + vector as usize]
    };
    let mut seen = counter.load(Ordering::SeqCst);
    dev.write(0x04, (dev.read(0x04) & 0xffff) | 0x6);
    let bar0 = pci::bar_addr(dev, ivshmem::REGS_BAR as u8);
    let _idt = if intx {
        let Some(v) = crate::intx_setup(dev, flags & DB_EDGE != 0) else {
            return fail(3, 0);
        };
        arch::mmio_write32(bar0 + INTR_MASK, 1);
        v
    } else {
        if pci::enable_msix(dev, vector + 1, IRQ_VECTOR_BASE).is_none() {
            return fail(2, 0);
        }
        IRQ_VECTOR_BASE + vector as u8
    };
    set_result(
        results::DB_IV_POSITION,
        arch::mmio_read32(bar0 + IV_POSITION) as u64,
    );
    let rounds = arg(a::ROUNDS);
    let peer_id = if flags & DB_BY_REGION != 0 {
        match peer_by_region(dev, arch::mmio_read32(bar0 + IV_POSITION) as u16) {
            Ok(id) => id as u32,
            Err(code) => return code,
        }
    } else {
        arg(a::PEER) as u32
    };
    let ring = ivshmem::doorbell(peer_id as u16, vector as u16);
    let initiator = arg(a::INITIATOR) == 1;
    set_state(State::Ready);
    let (mut total, mut min, mut max) = (0u64, u64::MAX, 0u64);
    for r in 0..rounds {
        let t0 = arch::rdtsc();
        if initiator {
            arch::mmio_write32(bar0 + DOORBELL, ring);
        }
        // Wait for the peer's ring.
        if flags & DB_POLL != 0 {
            while counter.load(Ordering::SeqCst) == seen {
                core::hint::spin_loop();
            }
        } else {
            while counter.load(Ordering::SeqCst) == seen {
                arch::wait_for_interrupt(counter, seen);
            }
        }
        seen = counter.load(Ordering::SeqCst);
        if intx {
            // Reading Interrupt Status clears it and lowers the line.
            let _ = arch::mmio_read32(bar0 + INTR_STATUS);
            if flags & DB_EDGE == 0 {
                arch::eoi();
            }
        }
        if !initiator {
            arch::mmio_write32(bar0 + DOORBELL, ring);
        }
        let c = arch::rdtsc() - t0;
        total += c;
        min = min.min(c);
        max = max.max(c);
        set_result(results::DB_ROUNDS, r + 1);
    }
    set_result(results::DB_IRQS, counter.load(Ordering::SeqCst));
    set_result(results::DB_TOTAL_CYCLES, total);
    set_result(results::DB_MIN_CYCLES, min);
    set_result(results::DB_MAX_CYCLES, max);
    crate::println!(
        "probe: doorbell: {} round trips, {} interrupts",
        rounds,
        counter.load(Ordering::SeqCst)
    );
    EXIT_OK
}

/// With [`DB_BY_REGION`]: publishes `own` (this side's IVPosition) as member
/// `ME`'s doorbell ID in BAR2's ring region, and returns the ID member
/// `PEER` published, waiting for it up to `JOIN_TIMEOUT_MS`.
fn peer_by_region(dev: pci::Bdf, own: u16) -> Result<u16, u32> {
    let bar = pci::size_bar(dev, ivshmem::SHM_BAR as u8);
    if bar.size < 4096 || bar.addr == 0 {
        return Err(fail(4, bar.size));
    }
    // SAFETY: BAR2 is decoded at `addr` for `size` bytes (memory decoding
    // is on) and identity mapped by the boot page tables.
    let region = unsafe { ring::Region::new(bar.addr as *mut u8, bar.size) };
    let geo = region.geometry().map_err(|e| fail(5, e.code()))?;
    let (me, peer) = (arg(a::ME) as u32, arg(a::PEER) as u32);
    region
        .set_doorbell_id(&geo, me, own)
        .map_err(|e| fail(5, e.code()))?;
    let clock = crate::transfer::Clock::new();
    let t0 = clock.now_ms();
    loop {
        match region.doorbell_id(&geo, peer) {
            Ok(Some(id)) => return Ok(id),
            Ok(None) if clock.now_ms() - t0 <= arg(a::JOIN_TIMEOUT_MS).max(1) => {
                core::hint::spin_loop()
            }
            Ok(None) => return Err(fail(6, peer as u64)),
            Err(e) => return Err(fail(5, e.code())),
        }
    }
}
