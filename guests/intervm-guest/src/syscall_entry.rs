//! A check of the guest kernel's PVM system-call shim
//! (`guests/linux/patches/`): a user program that jumps straight to the
//! kernel's system-call entry, with registers of its choosing, gets no more
//! than a `syscall` would give it.
//!
//! On a PVM host `syscall` at CPL3 stays at CPL3 and faults on the entry
//! page; the shim completes the call from that page fault, taking the
//! return address from RCX and the flags from R11. A program can reach the
//! same fault with a plain `jmp` and any RCX/R11 (on VMX/SVM too), so the
//! shim must keep privileged flags out and refuse kernel return addresses.
//! This module does exactly that jump, twice, in child processes:
//! - with a user return address and R11 full of privileged flags (IOPL 3,
//!   NT, RF, VM, VIF, VIP) plus two harmless ones (CF, AC): a tracer
//!   (`PTRACE_SYSCALL`) reads the registers the kernel built at the
//!   system-call entry stop and checks the privileged flags are gone, IF
//!   is set, the harmless ones survived, and the call is the one asked for
//!   (`getppid`, whose result the child checks after returning);
//! - with a non-canonical return address: the child must die of SIGSEGV
//!   (the kernel must neither crash nor return there).
//!
//! x86-64 Linux only; needs nothing but fork and ptrace.

use crate::Error;

/// Flags a user may not set: IOPL (both bits), NT, RF, VM, VIF, VIP.
pub const PRIVILEGED_FLAGS: u64 = 0x3000 | 0x4000 | 0x1_0000 | 0x2_0000 | 0x8_0000 | 0x10_0000;
/// Flags a user may set with POPF; these two must pass through: CF, AC.
pub const USER_FLAGS_KEPT: u64 = 0x1 | 0x4_0000;
const IF: u64 = 0x200;
const SYS_GETPPID: u64 = 110;

/// The result of [`check`]: the registers the kernel saw for the forged
/// call, as the tracer read them.
#[derive(Debug)]
pub struct Report {
    /// RFLAGS the kernel will return to user mode with.
    pub flags: u64,
    /// The return address the kernel will resume at.
    pub rip: u64,
}

fn os(what: &str) -> Error {
    Error::Io(what.into(), std::io::Error::last_os_error())
}

fn fail(what: String) -> Error {
    Error::NoDevice(what)
}

/// Jumps to `entry` with RCX = the next instruction, R11 = `r11`, RAX =
/// getppid; returns what RAX held afterwards. Only returns if the kernel
/// resumes at RCX.
#[cfg(target_arch = "x86_64")]
fn forged_call(entry: u64, r11: u64) -> u64 {
    let ret: u64;
    // SAFETY: transfers control to `entry`, a kernel address this process
    // cannot execute: the CPU raises a page fault and the kernel (its
    // system-call shim, or the ordinary fault path) decides. Either it runs
    // getppid and resumes at label 2 with RCX and R11 clobbered (declared),
    // or it kills the process. No memory of ours is touched.
    unsafe {
        std::arch::asm!(
            "lea rcx, [rip + 2f]",
            "jmp {entry}",
            "2:",
            entry = in(reg) entry,
            in("r11") r11,
            inout("rax") SYS_GETPPID => ret,
            out("rcx") _,
        );
    }
    ret
}

/// Jumps to `entry` with a non-canonical return address; never returns.
#[cfg(target_arch = "x86_64")]
fn forged_call_to_kernel_space(entry: u64) -> ! {
    // SAFETY: as in forged_call, but RCX points nowhere a user may run:
    // the kernel must kill this process, which is what the caller checks.
    unsafe {
        std::arch::asm!(
            "jmp {entry}",
            entry = in(reg) entry,
            in("rcx") 0x8000_0000_0000_1000u64,
            in("r11") 0x202u64,
            in("rax") SYS_GETPPID,
            options(noreturn),
        );
    }
}

fn wait(pid: libc::pid_t) -> Result<libc::c_int, Error> {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(os("waitpid"));
    }
    Ok(status)
}

fn ptrace(req: libc::c_uint, pid: libc::pid_t, data: *mut libc::c_void) -> Result<(), Error> {
    // SAFETY: requests on our own traced child; `data` is null or points
    // to a live struct of the size the request writes.
    if unsafe { libc::ptrace(req, pid, std::ptr::null_mut::<libc::c_void>(), data) } < 0 {
        return Err(os("ptrace"));
    }
    Ok(())
}

/// Runs both forged calls against the system-call entry at `entry` (the
/// address of `entry_SYSCALL_64`, e.g. from `nm vmlinux`).
#[cfg(target_arch = "x86_64")]
pub fn check(entry: u64) -> Result<Report, Error> {
    let report = traced_forgery(entry)?;
    if report.flags & PRIVILEGED_FLAGS != 0 {
        return Err(fail(format!(
            "the kernel kept privileged flags from R11: rflags {:#x}",
            report.flags
        )));
    }
    if report.flags & IF == 0 || report.flags & USER_FLAGS_KEPT != USER_FLAGS_KEPT {
        return Err(fail(format!(
            "unexpected rflags {:#x} (want IF and CF|AC set)",
            report.flags
        )));
    }
    // A return address in kernel space: the child must die of SIGSEGV.
    // SAFETY: fork in a single-threaded tool; the child only jumps.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os("fork"));
    }
    if pid == 0 {
        forged_call_to_kernel_space(entry);
    }
    let status = wait(pid)?;
    if !(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV) {
        return Err(fail(format!(
            "a jump to the entry with a kernel return address ended with status {status:#x}, not SIGSEGV"
        )));
    }
    Ok(report)
}

#[cfg(target_arch = "x86_64")]
fn traced_forgery(entry: u64) -> Result<Report, Error> {
    let hostile = PRIVILEGED_FLAGS | USER_FLAGS_KEPT | 0x2;
    // SAFETY: fork in a single-threaded tool; the child only calls
    // async-signal-safe functions and the forged call, then _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os("fork"));
    }
    if pid == 0 {
        // SAFETY: plain system calls in the child.
        unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::raise(libc::SIGSTOP);
            let ok = forged_call(entry, hostile) == libc::getppid() as u64;
            libc::_exit(if ok { 0 } else { 3 });
        }
    }
    let status = wait(pid)?;
    if !libc::WIFSTOPPED(status) {
        return Err(fail(format!("the child did not stop: status {status:#x}")));
    }
    // System-call stops until the forged getppid's entry stop (raise()
    // makes a few calls of its own after the SIGSTOP).
    // SAFETY: user_regs_struct is plain data; zeroed is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    let mut found = false;
    for _ in 0..32 {
        ptrace(libc::PTRACE_SYSCALL, pid, std::ptr::null_mut())?;
        let status = wait(pid)?;
        if !libc::WIFSTOPPED(status) {
            return Err(fail(format!(
                "the forged call did not reach a system-call stop: status {status:#x}"
            )));
        }
        ptrace(
            libc::PTRACE_GETREGS,
            pid,
            &mut regs as *mut libc::user_regs_struct as *mut libc::c_void,
        )?;
        if regs.orig_rax == SYS_GETPPID {
            found = true;
            break;
        }
    }
    ptrace(libc::PTRACE_DETACH, pid, std::ptr::null_mut())?;
    if !found {
        return Err(fail("no stop at the forged getppid".into()));
    }
    let status = wait(pid)?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(fail(format!(
            "the forged getppid did not return its result: status {status:#x}"
        )));
    }
    Ok(Report {
        flags: regs.eflags,
        rip: regs.rip,
    })
}
