//! vCPU threads: the run loop and exit dispatch.
//!
//! Each vCPU runs on its own thread. PIO and MMIO exits go to the VM's
//! `vm-device` [`IoManager`]; an access nobody claims reads as all-ones and
//! is counted. A stop request (guest exit, host stop, a fatal exit on any
//! vCPU) reaches a thread inside `KVM_RUN` as a signal whose handler sets
//! `immediate_exit`, so no vCPU is left running.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::debug::ExitRequest;
use crate::memory::GuestMemoryMmap;

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this code to the debug exit port.
    Guest(u32),
    /// The guest triple-faulted or asked KVM for a shutdown/reset.
    Shutdown,
    /// The host asked the VM to stop.
    Stopped,
    /// A vCPU hit an error KVM or intervm cannot handle.
    Error(String),
}

impl VmExit {
    /// A process exit status: the guest's code, 0 for a host stop,
    /// 128+ for shutdown and errors.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::Guest(c) => (*c).min(127) as i32,
            VmExit::Stopped => 0,
            VmExit::Shutdown => 129,
            VmExit::Error(_) => 130,
        }
    }
}

/// Exit counters, per VM.
#[derive(Debug, Default)]
pub struct ExitStats {
    /// Port I/O exits handled.
    pub pio: AtomicU64,
    /// MMIO exits handled.
    pub mmio: AtomicU64,
    /// Accesses no device claimed.
    pub unclaimed: AtomicU64,
    /// Instructions (`int3`, `fwait`) the VMM completed after KVM's
    /// emulator gave up on them (PVM).
    pub emulated: AtomicU64,
}

/// Shared run state of a VM: the first exit reason, and who to kick.
#[derive(Default)]
pub struct VmControl {
    exit: Mutex<Option<VmExit>>,
    cv: Condvar,
    stopping: AtomicBool,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Exit counters.
    pub stats: ExitStats,
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run page, set
        // while its VcpuFd is alive; immediate_exit is a plain byte.
        unsafe { (*p).immediate_exit = 1 };
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> crate::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            res = Err(crate::Error::io("installing the vCPU kick signal handler")(
                std::io::Error::from_raw_os_error(e.errno()),
            ));
        }
    });
    res
}

impl VmControl {
    /// Records `exit` (the first one wins) and kicks every vCPU.
    pub fn request_stop(&self, exit: VmExit) {
        {
            let mut e = self.exit.lock().unwrap_or_else(|p| p.into_inner());
            if e.is_none() {
                *e = Some(exit);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        self.kick_all();
    }

    /// True once a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sends the kick signal to every registered vCPU thread.
    pub fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for &t in threads.iter() {
            // SAFETY: t is a live thread of this process; it deregisters
            // itself before exiting (under this lock).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Blocks until a stop is requested or `timeout` passes.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> Option<VmExit> {
        let guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let guard = match timeout {
            Some(t) => self
                .cv
                .wait_timeout_while(guard, t, |e| e.is_none())
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0),
            None => self
                .cv
                .wait_while(guard, |e| e.is_none())
                .unwrap_or_else(|p| p.into_inner()),
        };
        guard.clone()
    }

    /// The exit reason, if the VM stopped.
    pub fn exit(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(me);
    }

    fn deregister_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&t| t != me);
    }
}

impl ExitRequest for Arc<VmControl> {
    fn request_exit(&self, code: u32) {
        self.request_stop(VmExit::Guest(code));
    }
}

/// Width in bytes of one element of the current port-I/O exit (1, 2 or 4).
/// `VcpuExit::IoIn/IoOut` give `size * count` bytes; the size is only in
/// `kvm_run`.
fn io_element_size() -> usize {
    let run = KVM_RUN.with(|c| c.get());
    if run.is_null() {
        return 1;
    }
    // SAFETY: `run` is this thread's vCPU's kvm_run mapping (set at the top
    // of `run_loop`, alive until the loop ends), and the caller handles a
    // KVM_EXIT_IO, so the `io` member of the union is the active one.
    let size = unsafe { (*run).__bindgen_anon_1.io.size };
    match size {
        1 | 2 | 4 => size as usize,
        _ => 1,
    }
}

/// `KVM_INTERNAL_ERROR_EMULATION`: KVM's instruction emulator gave up.
const INTERNAL_ERROR_EMULATION: u32 = 1;
const INT3: u8 = 0xcc;
const FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;

fn internal_suberror() -> Option<u32> {
    let run = KVM_RUN.with(|c| c.get());
    if run.is_null() {
        return None;
    }
    // SAFETY: `run` is this thread's vCPU's kvm_run mapping and the caller
    // handles a KVM_EXIT_INTERNAL_ERROR, whose union member is `internal`.
    Some(unsafe { (*run).__bindgen_anon_1.internal.suberror })
}

/// PVM's emulator gives up on a few instructions that Linux runs at CPL0:
/// `int3` (a boot self-test, and code patching) and `fwait` (when a task's
/// FPU state is dropped, e.g. at exec). KVM reports an emulation failure;
/// if the instruction at RIP is one of these, do what the CPU would:
/// for `int3`, step over it and deliver `#BP`; for `fwait` with no pending
/// x87 exception (the kernel masks them all), step over it. Returns what
/// was emulated, or `None` if it was something else.
fn emulate_unsupported(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Option<Emulated> {
    let mut regs = vcpu.get_regs().ok()?;
    let tr = vcpu.translate_gva(regs.rip).ok()?;
    if tr.valid == 0 {
        return None;
    }
    let op = mem.read_obj::<u8>(GuestAddress(tr.physical_address)).ok()?;
    match op {
        INT3 => {
            let mut events = vcpu.get_vcpu_events().ok()?;
            regs.rip += 1;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            vcpu.set_regs(&regs).ok()?;
            vcpu.set_vcpu_events(&events).ok()?;
            Some(Emulated::Int3)
        }
        FWAIT => {
            regs.rip += 1;
            vcpu.set_regs(&regs).ok()?;
            Some(Emulated::Fwait)
        }
        _ => None,
    }
}

/// Instructions the VMM completed for KVM's emulator.
enum Emulated {
    Int3,
    Fwait,
}

/// Runs `vcpu` until the VM stops. Call on the vCPU's own thread. `mem` is
/// the guest RAM, read when an exit has to look at guest instructions.
///
/// A panic while handling an exit (a device bug a guest found) stops the
/// whole VM with [`VmExit::Error`] naming it, instead of leaving a VM
/// whose vCPU is gone and which would then never stop.
pub fn run_loop(
    mut vcpu: VcpuFd,
    id: u8,
    io: Arc<RwLock<IoManager>>,
    ctl: Arc<VmControl>,
    mem: GuestMemoryMmap,
) {
    KVM_RUN.with(|c| c.set(vcpu.get_kvm_run() as *mut kvm_run));
    ctl.register_thread();
    let run = std::panic::AssertUnwindSafe(|| handle_exits(&mut vcpu, id, &io, &ctl, &mem));
    if let Err(panic) = std::panic::catch_unwind(run) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        ctl.request_stop(VmExit::Error(format!(
            "vcpu{id}: the VMM panicked while handling an exit: {what}"
        )));
    }
    ctl.deregister_thread();
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// The body of [`run_loop`]: runs and handles exits until the VM stops.
fn handle_exits(
    vcpu: &mut VcpuFd,
    id: u8,
    io: &RwLock<IoManager>,
    ctl: &VmControl,
    mem: &GuestMemoryMmap,
) {
    while !ctl.stopping() {
        let exit = vcpu.run();
        let io = io.read().unwrap_or_else(|p| p.into_inner());
        match exit {
            // A string instruction (`rep ins/outs`) can bring several
            // elements in one exit; devices see one access per element, as
            // the guest issued them.
            Ok(VcpuExit::IoIn(port, data)) => {
                ctl.stats.pio.fetch_add(1, Ordering::Relaxed);
                for element in data.chunks_mut(io_element_size()) {
                    if io.pio_read(PioAddress(port), element).is_err() {
                        ctl.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                        log::debug!("vcpu{id}: unclaimed in from port {port:#x}");
                        element.fill(0xff);
                    }
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctl.stats.pio.fetch_add(1, Ordering::Relaxed);
                for element in data.chunks(io_element_size()) {
                    if io.pio_write(PioAddress(port), element).is_err() {
                        ctl.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                        log::debug!("vcpu{id}: unclaimed out to port {port:#x}");
                    }
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctl.stats.mmio.fetch_add(1, Ordering::Relaxed);
                if io.mmio_read(MmioAddress(addr), data).is_err() {
                    ctl.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                    log::debug!("vcpu{id}: unclaimed MMIO read at {addr:#x}");
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctl.stats.mmio.fetch_add(1, Ordering::Relaxed);
                if io.mmio_write(MmioAddress(addr), data).is_err() {
                    ctl.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                    log::debug!("vcpu{id}: unclaimed MMIO write at {addr:#x}");
                }
            }
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(..)) => {
                log::info!("vcpu{id}: guest shutdown (triple fault or reset)");
                ctl.request_stop(VmExit::Shutdown);
            }
            Ok(VcpuExit::Hlt) => ctl.request_stop(VmExit::Shutdown),
            Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::InternalError) => {
                let sub = internal_suberror();
                let done = if sub == Some(INTERNAL_ERROR_EMULATION) {
                    emulate_unsupported(vcpu, mem)
                } else {
                    None
                };
                if let Some(what) = done {
                    ctl.stats.emulated.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "vcpu{id}: completed {} for KVM",
                        match what {
                            Emulated::Int3 => "int3",
                            Emulated::Fwait => "fwait",
                        }
                    );
                } else {
                    let regs = vcpu_state(vcpu);
                    ctl.request_stop(VmExit::Error(format!(
                        "vcpu{id}: KVM internal error (suberror {sub:?}) ({regs})"
                    )));
                }
            }
            Ok(other) => {
                let what = format!("{other:?}");
                let regs = vcpu_state(vcpu);
                ctl.request_stop(VmExit::Error(format!(
                    "vcpu{id}: unhandled exit {what} ({regs})"
                )));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            // A guest access to a shared page that another process cut
            // off (it shrank the file): that region becomes private
            // memory, its owner reports it lost, and the guest goes on.
            Err(e) if e.errno() == libc::EFAULT && crate::shrink_guard::recover() => {
                log::warn!("vcpu{id}: a shared region can no longer be read (shrunk by another process?); continuing on a private copy");
            }
            Err(e) => {
                ctl.request_stop(VmExit::Error(format!("vcpu{id}: KVM_RUN: {e}")));
            }
        }
    }
}

fn vcpu_state(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} cs={:#x} cr0={:#x} cr3={:#x}",
            r.rip, r.rsp, s.cs.selector, s.cr0, s.cr3
        ),
        _ => "registers unavailable".into(),
    }
}
