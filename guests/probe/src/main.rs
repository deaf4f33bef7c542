//! The intervm probe guest.
//!
//! A bare-metal x86-64 program that the intervm VMM boots for fast tests and
//! benchmarks. Its CPL0 part ([`cpl0`]) only sets up descriptor tables and
//! interrupt entry; everything else runs at CPL3, where PVM executes guest
//! code natively. The VMM tells it what to do through the boot-info page
//! (`intervm_protocol::probe`), and it answers in the same page.
#![no_std]
#![no_main]

mod arch;
mod chaos;
mod console;
mod cpl0;
mod doorbell;
mod exchange;
mod mem;
mod pci;
mod portio;
mod shmem;
mod transfer;

use core::sync::atomic::Ordering;
use intervm_protocol::probe::{
    results, BootInfo, State, TaskEntry, Workload, BOOT_INFO_GPA, BOOT_INFO_MAGIC,
    BOOT_INFO_VERSION, DEBUG_EXIT_OFFSET, DEBUG_PORT_BASE, DEBUG_SCRATCH_OFFSET,
    EXIT_BAD_BOOT_INFO, EXIT_FAILED, EXIT_OK, INTX_VECTOR, IRQ_VECTOR_BASE, MAX_TASKS,
    RESULT_SLOTS, TASK_TABLE_GPA,
};

pub(crate) fn info() -> *mut BootInfo {
    BOOT_INFO_GPA as *mut BootInfo
}

fn arg(i: usize) -> u64 {
    // SAFETY: the boot-info page is identity mapped and owned by the probe.
    unsafe { core::ptr::read_volatile(&(*info()).args[i]) }
}

fn result(i: usize) -> u64 {
    // SAFETY: the boot-info page is identity mapped and owned by the probe.
    unsafe { core::ptr::read_volatile(&(*info()).results[i]) }
}

fn set_result(i: usize, v: u64) {
    // SAFETY: as for `arg`; volatile because the host may read it live.
    unsafe { core::ptr::write_volatile(&mut (*info()).results[i], v) }
}

fn set_state(s: State) {
    core::sync::atomic::fence(Ordering::SeqCst);
    // SAFETY: as for `set_result`.
    unsafe { core::ptr::write_volatile(&mut (*info()).state, s as u32) }
}

/// Powers off through the debug port with `code`.
fn exit(code: u32) -> ! {
    arch::outl(DEBUG_PORT_BASE + DEBUG_EXIT_OFFSET, code);
    // The VMM stops this vCPU at the write above; never reached.
    loop {
        core::hint::spin_loop();
    }
}

fn fail(reason: u64, detail: u64) -> u32 {
    set_result(results::FAIL_REASON, reason);
    set_result(results::FAIL_DETAIL, detail);
    println!("probe: FAILED reason={} detail={:#x}", reason, detail);
    EXIT_FAILED
}

/// CPL3 entry, reached by `iretq` from [`cpl0`].
#[no_mangle]
extern "C" fn probe_main() -> ! {
    // SAFETY: fixed boot-info address, written by the VMM before boot.
    let (magic, version, workload) = unsafe {
        let p = info();
        (
            core::ptr::read_volatile(&(*p).magic),
            core::ptr::read_volatile(&(*p).version),
            core::ptr::read_volatile(&(*p).workload),
        )
    };
    if magic != BOOT_INFO_MAGIC || version != BOOT_INFO_VERSION {
        println!(
            "probe: bad boot info (magic {:#x}, version {})",
            magic, version
        );
        exit(EXIT_BAD_BOOT_INFO);
    }
    set_state(State::Running);
    let code = run_workload(workload, true);
    set_state(State::Done);
    exit(code)
}

fn run_workload(workload: u32, top: bool) -> u32 {
    match Workload::from_u32(workload) {
        Some(Workload::Hello) => hello(),
        Some(Workload::PioRoundTrip) => pio_round_trip(),
        Some(Workload::PciScan) => pci_scan(),
        Some(Workload::MsixWait) => irq_wait(true),
        Some(Workload::IntxWait) => irq_wait(false),
        Some(Workload::BarMove) => bar_move(),
        Some(Workload::Fault) => fault(),
        Some(Workload::ShmemSend) => shmem::send(),
        Some(Workload::ShmemRecv) => shmem::recv(),
        Some(Workload::PortioSend) => portio::send(),
        Some(Workload::PortioRecv) => portio::recv(),
        Some(Workload::DoorbellPingPong) => doorbell::ping_pong(),
        Some(Workload::Chaos) => chaos::run(),
        Some(Workload::ShmemPingPong) => shmem::ping_pong(),
        Some(Workload::PortioPingPong) => portio::ping_pong(),
        Some(Workload::ShmemExchange) => exchange::run(),
        Some(Workload::Sequence) if top => sequence(),
        Some(Workload::Sequence) => EXIT_BAD_BOOT_INFO,
        None => {
            println!("probe: unknown workload {}", workload);
            EXIT_BAD_BOOT_INFO
        }
    }
}

/// [`Workload::Sequence`]: each task's arguments go into the boot-info
/// page, its results come back into its table entry.
fn sequence() -> u32 {
    let n = (arg(0) as usize).min(MAX_TASKS);
    for i in 0..n {
        let e = (TASK_TABLE_GPA as usize + i * core::mem::size_of::<TaskEntry>()) as *mut TaskEntry;
        // SAFETY: the table lies in identity-mapped guest RAM below the page
        // tables (checked at compile time in the protocol crate), written
        // by the VMM before boot and owned by the probe while it runs.
        unsafe {
            let args = core::ptr::read_volatile(&(*e).args);
            core::ptr::write_volatile(&mut (*info()).args, args);
            core::ptr::write_volatile(&mut (*info()).results, [0; RESULT_SLOTS]);
            let code = run_workload(core::ptr::read_volatile(&(*e).workload), false);
            let results = core::ptr::read_volatile(&(*info()).results);
            core::ptr::write_volatile(&mut (*e).results, results);
            core::ptr::write_volatile(&mut (*e).exit, code);
            if code != EXIT_OK {
                return code;
            }
        }
    }
    EXIT_OK
}

fn hello() -> u32 {
    println!("intervm probe: hello from CPL3, tag {}", arg(0));
    EXIT_OK
}

fn pio_round_trip() -> u32 {
    let n = arg(0);
    let port = DEBUG_PORT_BASE + DEBUG_SCRATCH_OFFSET;
    let t0 = arch::rdtsc();
    for i in 0..n {
        arch::outl(port, i as u32);
    }
    let t1 = arch::rdtsc();
    arch::pio_loop_cpl0(n, port);
    let t2 = arch::rdtsc();
    set_result(results::PIO_ITERATIONS, n);
    set_result(results::PIO_CPL3_CYCLES, t1 - t0);
    set_result(results::PIO_CPL0_CYCLES, t2 - t1);
    EXIT_OK
}

fn pci_scan() -> u32 {
    let mut count = 0usize;
    pci::for_each(|b| {
        if count >= results::PCI_MAX {
            return;
        }
        let base = results::PCI_FIRST + count * results::PCI_RECORD_LEN;
        set_result(base, b.raw() as u64);
        set_result(base + 1, b.id().unwrap_or(0) as u64);
        let class = b.read(0x08) >> 8;
        let htype = (b.read(0x0c) >> 16) & 0xff;
        set_result(base + 2, ((class as u64) << 8) | htype as u64);
        if htype & 0x7f == 0 {
            let mut i = 0u8;
            while i < 6 {
                let bar = pci::size_bar(b, i);
                set_result(base + 3 + i as usize, bar.size);
                i += if bar.is64 { 2 } else { 1 };
            }
        }
        set_result(base + 9, pci::cap_bitmap(b));
        println!(
            "probe: pci 00:{:02x}.{} id {:08x} class {:06x}",
            b.0,
            b.1,
            b.id().unwrap_or(0),
            class
        );
        count += 1;
    });
    set_result(results::PCI_COUNT, count as u64);
    EXIT_OK
}

const IOAPIC: u64 = 0xfec0_0000;

fn ioapic_write(reg: u32, v: u32) {
    arch::mmio_write32(IOAPIC, reg);
    arch::mmio_write32(IOAPIC + 0x10, v);
}

/// Routes `dev`'s INTx pin (its interrupt line register holds the IOAPIC
/// pin) to [`INTX_VECTOR`] on APIC 0, level-triggered unless `edge`, and
/// enables the device with INTx on. Returns the IDT vector.
pub(crate) fn intx_setup(dev: pci::Bdf, edge: bool) -> Option<u8> {
    let pin = dev.read(0x3c) & 0xff;
    if pin >= 24 {
        return None;
    }
    let level = if edge { 0 } else { 1 << 15 };
    ioapic_write(0x10 + 2 * pin, INTX_VECTOR as u32 | level);
    ioapic_write(0x11 + 2 * pin, 0);
    dev.write(0x04, (dev.read(0x04) & 0xffff & !0x400) | 0x6);
    Some(INTX_VECTOR)
}

fn irq_wait(msix: bool) -> u32 {
    let Some(dev) = pci::find(arg(0) as u32) else {
        return fail(1, arg(0));
    };
    let vector = if msix {
        if pci::enable_msix(dev, arg(1).max(1) as u32, IRQ_VECTOR_BASE).is_none() {
            return fail(2, 0);
        }
        IRQ_VECTOR_BASE
    } else {
        match intx_setup(dev, arg(1) & 1 == 1) {
            Some(v) => v,
            None => return fail(3, dev.read(0x3c) as u64 & 0xff),
        }
    };
    let counter = &cpl0::PROBE_IRQ_COUNTS[vector as usize];
    let want = arg(2);
    set_result(results::IRQ_READY_TSC, arch::rdtsc());
    set_state(State::Ready);
    loop {
        let seen = counter.load(Ordering::SeqCst);
        set_result(results::IRQ_COUNT, seen);
        if seen >= want {
            break;
        }
        if arg(1) & 2 == 2 {
            // Poll at CPL3 instead of halting (interrupts stay enabled).
            while counter.load(Ordering::SeqCst) == seen {
                core::hint::spin_loop();
            }
        } else {
            arch::wait_for_interrupt(counter, seen);
        }
        if !msix && counter.load(Ordering::SeqCst) != seen {
            // Level-triggered: read the device's ack register (args[3], a
            // BAR0 offset; ivshmem's IntrStatus clears on read), then EOI.
            let _ = arch::mmio_read32(pci::bar_addr(dev, 0) + arg(3));
            arch::eoi();
        }
    }
    set_result(results::IRQ_DONE_TSC, arch::rdtsc());
    println!(
        "probe: {} interrupts on vector {:#x}",
        counter.load(Ordering::SeqCst),
        vector
    );
    EXIT_OK
}

fn bar_move() -> u32 {
    let Some(dev) = pci::find(arg(0) as u32) else {
        return fail(1, arg(0));
    };
    let i = arg(1) as u8;
    let new = arg(2);
    let reg = 0x10 + 4 * i;
    let cmd = dev.read(0x04);
    dev.write(0x04, cmd & !0x3);
    let lo = dev.read(reg);
    dev.write(reg, (new as u32 & !0xf) | (lo & 0xf));
    if (lo >> 1) & 3 == 2 {
        dev.write(reg + 4, (new >> 32) as u32);
    }
    dev.write(0x04, cmd | 0x2);
    let seen = arch::read64(new);
    if arg(4) != 0 {
        for page in 0..arg(5) {
            arch::write64(new + page * 4096 + 8, arg(4));
        }
    }
    set_result(results::BAR_MOVE_SEEN, seen);
    set_result(results::BAR_MOVE_OK, (seen == arg(3)) as u64);
    println!(
        "probe: BAR{} now at {:#x}, read {:#x}",
        i,
        pci::bar_addr(dev, i),
        seen
    );
    if seen == arg(3) {
        EXIT_OK
    } else {
        fail(4, seen)
    }
}

fn fault() -> u32 {
    match arg(0) {
        // SAFETY: a deliberate divide error; the CPL0 handler records the
        // exception and powers off.
        0 => unsafe {
            core::arch::asm!("xor edx, edx", "xor eax, eax", "div rcx", in("rcx") 0u64, out("rdx") _, out("rax") _)
        },
        // SAFETY: a deliberate #GP (non-canonical address), handled as above.
        13 => unsafe {
            core::arch::asm!("mov qword ptr [rax], 0", in("rax") 0x8000_0000_0000_0000u64)
        },
        // SAFETY: a deliberate #PF (unmapped address), handled as above.
        14 => unsafe { core::arch::asm!("mov qword ptr [rax], 0", in("rax") 0x7f_0000_0000u64) },
        255 => arch::triple_fault(),
        _ => return fail(5, arg(0)),
    }
    fail(6, arg(0))
}

/// libcore's precompiled unwinding tables name this symbol even though the
/// probe is built with `panic = "abort"`; it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(p: &core::panic::PanicInfo) -> ! {
    println!("probe: panic: {}", p);
    set_result(results::FAIL_REASON, 0xdead);
    exit(EXIT_FAILED)
}
