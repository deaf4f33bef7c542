//! CPL3 helpers: port I/O, MMIO, TSC and service calls into the CPL0 part.

use core::arch::asm;

/// `out` of one byte.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the VMM owns every port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nostack, preserves_flags)) }
}

/// `out` of a dword.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags)) }
}

/// `in` of a dword.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) }
    v
}

/// `out` of a word.
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nostack, preserves_flags)) }
}

/// `in` of a byte.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, preserves_flags)) }
    v
}

/// `in` of a word.
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nostack, preserves_flags)) }
    v
}

/// `rep outs` of `src.len() / width` elements of `width` bytes (1, 2 or 4).
pub fn rep_outs(port: u16, src: &[u8], width: usize) {
    let count = src.len() / width;
    // SAFETY: reads `count * width <= src.len()` bytes of `src`; the
    // direction flag is clear (the ABI guarantees it).
    unsafe {
        match width {
            1 => {
                asm!("rep outsb", in("dx") port, inout("rsi") src.as_ptr() => _, inout("rcx") count => _, options(nostack, preserves_flags, readonly))
            }
            2 => {
                asm!("rep outsw", in("dx") port, inout("rsi") src.as_ptr() => _, inout("rcx") count => _, options(nostack, preserves_flags, readonly))
            }
            _ => {
                asm!("rep outsd", in("dx") port, inout("rsi") src.as_ptr() => _, inout("rcx") count => _, options(nostack, preserves_flags, readonly))
            }
        }
    }
}

/// `rep ins` of `dst.len() / width` elements of `width` bytes (1, 2 or 4).
pub fn rep_ins(port: u16, dst: &mut [u8], width: usize) {
    let count = dst.len() / width;
    // SAFETY: writes `count * width <= dst.len()` bytes of `dst`; the
    // direction flag is clear.
    unsafe {
        match width {
            1 => {
                asm!("rep insb", in("dx") port, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") count => _, options(nostack, preserves_flags))
            }
            2 => {
                asm!("rep insw", in("dx") port, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") count => _, options(nostack, preserves_flags))
            }
            _ => {
                asm!("rep insd", in("dx") port, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") count => _, options(nostack, preserves_flags))
            }
        }
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads a counter (CR4.TSD is clear).
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack)) }
    ((hi as u64) << 32) | lo as u64
}

/// Volatile 32-bit MMIO read at a guest-physical (identity-mapped) address.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the probe identity-maps the address space with user access; the
    // caller passes an address inside a BAR or a platform MMIO page.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Volatile 32-bit MMIO write.
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Volatile 64-bit memory read.
pub fn read64(addr: u64) -> u64 {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Volatile 64-bit memory write.
pub fn write64(addr: u64, v: u64) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Service 0: sleep at CPL0 with interrupts enabled until an interrupt
/// arrives, unless `*counter != seen` already (checked with IF=0, so no
/// wake-up is lost).
pub fn wait_for_interrupt(counter: &core::sync::atomic::AtomicU64, seen: u64) {
    // SAFETY: `ud2` traps to the probe's #UD handler, which implements the
    // service and returns after the instruction; it preserves all registers.
    unsafe {
        asm!("ud2", in("rax") 0u64, in("rdi") counter.as_ptr(), in("rsi") seen, options(nostack))
    }
}

/// Service 1: `count` iterations of `out dx, eax` to `port` at CPL0.
pub fn pio_loop_cpl0(count: u64, port: u16) {
    // SAFETY: as for `wait_for_interrupt`.
    unsafe { asm!("ud2", in("rax") 1u64, in("rdi") count, in("rsi") port as u64, options(nostack)) }
}

/// Service 2: LAPIC end-of-interrupt (for the level-triggered INTx vector).
pub fn eoi() {
    // SAFETY: as for `wait_for_interrupt`.
    unsafe { asm!("ud2", in("rax") 2u64, options(nostack)) }
}

/// Service 3: triple fault (the VMM sees a shutdown).
pub fn triple_fault() -> ! {
    // SAFETY: as for `wait_for_interrupt`; never returns.
    unsafe { asm!("ud2", in("rax") 3u64, options(nostack, noreturn)) }
}
