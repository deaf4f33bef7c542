//! What the guest kernel costs a userspace program, measured from inside:
//! one system call and one page fault. On a PVM host both run emulated
//! kernel code (and a system call first faults on the entry page, see
//! `guests/linux/patches/`), which is where a Linux guest's slowness there
//! comes from, not the channels.

use std::time::{Duration, Instant};

use crate::Error;

/// Mean costs.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// One `getppid` system call.
    pub syscall: Duration,
    /// The first write to a fresh anonymous page (a minor fault that
    /// allocates and zeroes the page).
    pub page_fault: Duration,
}

/// Times `count` system calls and `count` page faults.
pub fn measure(count: u64) -> Result<Costs, Error> {
    let t0 = Instant::now();
    for _ in 0..count {
        // SAFETY: getppid has no arguments and cannot fail.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    let syscall = t0.elapsed().div_f64(count as f64);
    let page = 4096usize;
    let len = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(page))
        .ok_or_else(|| Error::Usage(format!("{count} pages do not fit in memory")))?;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Io(
            format!("mapping {len} bytes"),
            std::io::Error::last_os_error(),
        ));
    }
    let t0 = Instant::now();
    for i in 0..count as usize {
        // SAFETY: inside the mapping made above.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(i * page), 1) };
    }
    let page_fault = t0.elapsed().div_f64(count as f64);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, len) };
    Ok(Costs {
        syscall,
        page_fault,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_something() {
        let c = super::measure(100).unwrap();
        assert!(c.syscall > std::time::Duration::ZERO);
        assert!(c.page_fault > std::time::Duration::ZERO);
    }
}
