//! A SIGBUS sent to the process (kill, raise) is not a fault in a guarded
//! mapping: with no handler installed before the guard, it must end the
//! process as it would without the guard. Checked in a child process (this
//! test binary run again), since the expected outcome is death by SIGBUS.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD: &str = "SHRINK_GUARD_SENT_CHILD";

#[test]
fn a_sent_sigbus_still_ends_the_process() {
    if std::env::var_os(CHILD).is_some() {
        // The child: no SIGBUS handler (Rust's runtime installs one for
        // stack overflows, which swallows a sent SIGBUS once; a C program
        // embedding the guard has none), guard a mapping (installing the
        // guard's handler), then send ourselves SIGBUS. Surviving it is
        // the bug.
        // SAFETY: restores the default action; no handler is running.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        let (f, p) = common::mapped("sent", 4096);
        let _g = shrink_guard::guard(p, 4096, f.as_raw_fd(), 0).unwrap();
        // SAFETY: raise() on this thread.
        unsafe { libc::raise(libc::SIGBUS) };
        println!("survived a sent SIGBUS");
        return;
    }
    let me = std::env::current_exe().unwrap();
    let out = Command::new(me)
        .args([
            "--exact",
            "a_sent_sigbus_still_ends_the_process",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "the child {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
