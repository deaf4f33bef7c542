//! `intervm-guest portio`: the port-I/O channel from Linux userspace.
//!
//! The program gets the channel's ports with `ioperm` (or `iopl(3)` for
//! ports above 0x3ff, where `ioperm` cannot reach), then talks to the
//! device's registers (`intervm_protocol::portio`) with `in`/`out` of any
//! width, `rep ins/outs`, or descriptors. A descriptor names a
//! guest-physical buffer: the tool locks its buffer in memory and looks up
//! its physical address in `/proc/self/pagemap` (root only). A buffer from
//! a 2 MiB huge page is physically contiguous, so messages can be up to
//! 2 MiB; otherwise each message must fit one 4 KiB page.
//!
//! The exchange follows the probe guest's convention, so the tool and probe
//! guests interoperate: the receiver sends each sender a one-byte "go"
//! message and starts its clock; a sender starts when it has it.
//!
//! Port access goes through the [`Ports`] trait so the protocol logic runs
//! in tests against the real device model without real ports.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use intervm_protocol::portio::*;
use intervm_protocol::probe::{shmem_frame_bytes, shmem_source_bytes};
use intervm_protocol::ring::{checksum, fill_pattern, fold};

use crate::shmem::Summary;
use crate::Error;

/// A buffer the device can reach by guest-physical address.
pub struct DmaBuf {
    /// Where the program sees it.
    pub ptr: *mut u8,
    /// Bytes.
    pub len: usize,
    /// Its guest-physical address (contiguous for `len` bytes).
    pub phys: u64,
}

/// Port access and physically addressed memory.
pub trait Ports {
    /// `in` of `width` bytes (1, 2 or 4).
    fn input(&mut self, port: u16, width: usize) -> u32;
    /// `out` of `width` bytes.
    fn output(&mut self, port: u16, width: usize, v: u32);
    /// `rep outs` of `src` in elements of `width` bytes.
    fn rep_out(&mut self, port: u16, src: &[u8], width: usize);
    /// `rep ins` into `dst` in elements of `width` bytes.
    fn rep_in(&mut self, port: u16, dst: &mut [u8], width: usize);
    /// A buffer of at least `len` bytes for descriptors (may be smaller if
    /// physically contiguous memory is scarce; check `len`).
    fn dma_buffer(&mut self, len: usize) -> Result<DmaBuf, Error>;
}

/// How bytes cross.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// Descriptor mode.
    pub descriptor: bool,
    /// Access width in port mode.
    pub width: usize,
    /// `rep` in port mode.
    pub rep: bool,
}

struct Dev<'a, P: Ports> {
    p: &'a mut P,
    base: u16,
}

impl<P: Ports> Dev<'_, P> {
    fn rd(&mut self, reg: u16) -> u32 {
        self.p.input(self.base + reg, 4)
    }
    fn wr(&mut self, reg: u16, v: u32) {
        self.p.output(self.base + reg, 4, v)
    }
    fn command(&mut self, c: u32) -> u32 {
        self.wr(CONTROL, c);
        self.rd(RESULT)
    }
    fn check(&mut self, r: u32) -> Result<(), Error> {
        match r {
            R_OK => Ok(()),
            r => Err(Error::Port(r)),
        }
    }
    fn set_desc(&mut self, phys: u64, len: usize) {
        self.wr(DESC_ADDR_LO, phys as u32);
        self.wr(DESC_ADDR_HI, (phys >> 32) as u32);
        self.wr(DESC_LEN, len as u32);
    }
    fn put(&mut self, msg: &[u8], m: Mode) {
        let port = self.base + DATA;
        let w = m.width;
        let whole = msg.len() / w * w;
        if m.rep {
            self.p.rep_out(port, &msg[..whole], w);
        } else {
            for c in msg[..whole].chunks_exact(w) {
                let mut b = [0u8; 4];
                b[..w].copy_from_slice(c);
                self.p.output(port, w, u32::from_le_bytes(b));
            }
        }
        for &b in &msg[whole..] {
            self.p.output(port, 1, b as u32);
        }
    }
    fn get(&mut self, dst: &mut [u8], m: Mode) {
        let port = self.base + DATA;
        let w = m.width;
        let whole = dst.len() / w * w;
        if m.rep {
            self.p.rep_in(port, &mut dst[..whole], w);
        } else {
            for c in dst[..whole].chunks_exact_mut(w) {
                let v = self.p.input(port, w).to_le_bytes();
                c.copy_from_slice(&v[..w]);
            }
        }
        for b in &mut dst[whole..] {
            *b = self.p.input(port, 1) as u8;
        }
    }
}

pub use crate::Payload;

fn wait_for<P: Ports>(
    dev: &mut Dev<'_, P>,
    limit: Duration,
    mut ok: impl FnMut(&mut Dev<'_, P>) -> bool,
) -> Result<(), Error> {
    let t0 = Instant::now();
    while !ok(dev) {
        if t0.elapsed() > limit {
            return Err(Error::Port(R_PEER_GONE));
        }
    }
    Ok(())
}

/// Sends `payload` to member `to` through the device at `base`.
pub fn send<P: Ports>(
    ports: &mut P,
    base: u16,
    to: u32,
    payload: &Payload,
    message: usize,
    mode: Mode,
    join_timeout: Duration,
) -> Result<Summary, Error> {
    let mut dev = Dev { p: ports, base };
    dev.wr(PEER, to);
    let r = dev.rd(RESULT);
    dev.check(r)?;
    let max = dev.rd(MAX_MESSAGE) as usize;
    let mut message = shmem_frame_bytes(message as u64, u64::MAX, max as u64) as usize;
    let mut dma = None;
    if mode.descriptor {
        let b = dev.p.dma_buffer(message)?;
        if b.len < message {
            return Err(Error::NoContiguousBuffer {
                want: message,
                got: b.len,
            });
        }
        dma = Some(b);
    }
    let (size, src, mut file) = match payload {
        Payload::Pattern { seed, size } => {
            message = shmem_frame_bytes(message as u64, *size, max as u64) as usize;
            let mut src = vec![0u8; shmem_source_bytes(*size, message as u64) as usize];
            fill_pattern(*seed, 0, &mut src);
            (*size, src, None)
        }
        Payload::File(p) => (
            u64::MAX,
            vec![0u8; message],
            Some(std::fs::File::open(p).map_err(|e| Error::Io(p.display().to_string(), e))?),
        ),
    };
    // Faulted in before the clock starts (a first touch is a page fault
    // of milliseconds in a Linux guest on PVM).
    let mut buf = crate::touched_buffer(message);
    wait_for(&mut dev, join_timeout, |d| d.rd(RX_LEN) > 0)?;
    dev.command(C_DISCARD_RX);
    let start = Instant::now();
    let (mut sent, mut msgs, mut stream, mut pos) = (0u64, 0u64, 0u64, 0usize);
    loop {
        let n = match &mut file {
            Some(f) => crate::shmem::read_full(f, &mut buf)
                .map_err(|e| Error::Io("reading the payload".into(), e))?,
            None if sent >= size => break,
            None => {
                let n = (message.min((size - sent) as usize)).min(src.len() - pos);
                buf[..n].copy_from_slice(&src[pos..pos + n]);
                pos = (pos + n) % src.len();
                n
            }
        };
        let msg = &buf[..n];
        let cmd = match &dma {
            Some(d) => {
                // SAFETY: `d` is a locked buffer of at least `message >= n` bytes.
                unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), d.ptr, n) };
                dev.set_desc(d.phys, n);
                C_SEND_DESC
            }
            None => {
                dev.put(msg, mode);
                C_SEND
            }
        };
        loop {
            match dev.command(cmd) {
                R_OK => break,
                R_WOULD_BLOCK if dev.rd(STATUS) & S_PEER_GONE == 0 => std::hint::spin_loop(),
                R_WOULD_BLOCK => return Err(Error::Port(R_PEER_GONE)),
                r => return Err(Error::Port(r)),
            }
        }
        if n == 0 {
            break;
        }
        stream = fold(stream, checksum(msg));
        sent += n as u64;
        msgs += 1;
    }
    Ok(Summary {
        bytes: sent,
        frames: msgs,
        stream,
        elapsed: start.elapsed(),
    })
}

/// Receives from member `from` until `size` bytes or an empty message.
#[allow(clippy::too_many_arguments)]
pub fn recv<P: Ports>(
    ports: &mut P,
    base: u16,
    from: u32,
    size: Option<u64>,
    out: Option<&PathBuf>,
    mode: Mode,
    timeout: Duration,
    join_timeout: Duration,
) -> Result<Summary, Error> {
    let mut dev = Dev { p: ports, base };
    dev.wr(PEER, from);
    let r = dev.rd(RESULT);
    dev.check(r)?;
    let max = dev.rd(MAX_MESSAGE) as usize;
    let dma = if mode.descriptor {
        Some(dev.p.dma_buffer(max)?)
    } else {
        None
    };
    let mut sink = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::Io(p.display().to_string(), e))?,
        )),
        None => None,
    };
    // Faulted in before the clock starts, as for the sender.
    let mut buf = crate::touched_buffer(max);
    wait_for(&mut dev, join_timeout, |d| {
        d.rd(STATUS) & S_PEER_PRESENT != 0
    })?;
    let start = Instant::now();
    dev.put(
        &[1],
        Mode {
            descriptor: false,
            width: 1,
            rep: false,
        },
    );
    let r = dev.command(C_SEND);
    dev.check(r)?;
    let (mut got, mut msgs, mut stream, mut last) = (0u64, 0u64, 0u64, Duration::ZERO);
    let mut idle = Instant::now();
    while size.is_none_or(|s| got < s) {
        let n = dev.rd(RX_LEN) as usize;
        if n == 0 {
            if idle.elapsed() > timeout {
                if dev.rd(STATUS) & (S_PEER_GONE | S_RX_READY) == S_PEER_GONE {
                    return Err(Error::Port(R_PEER_GONE));
                }
                idle = Instant::now();
            }
            // An empty message ends a file stream: RX_LEN is 0 but a
            // message is current.
            // (STATUS may pull in a new message: look at RX_LEN again.)
            if size.is_none() && dev.rd(STATUS) & S_RX_READY != 0 && dev.rd(RX_LEN) == 0 {
                dev.command(C_DISCARD_RX);
                break;
            }
            continue;
        }
        if n > buf.len() {
            return Err(Error::Port(R_TOO_LARGE));
        }
        match &dma {
            Some(d) if n <= d.len => {
                dev.set_desc(d.phys, d.len);
                let r = dev.command(C_RECV_DESC);
                dev.check(r)?;
                // SAFETY: the device wrote `n <= d.len` bytes into the buffer.
                unsafe { std::ptr::copy_nonoverlapping(d.ptr, buf.as_mut_ptr(), n) };
            }
            _ => dev.get(&mut buf[..n], mode),
        }
        let msg = &buf[..n];
        stream = fold(stream, checksum(msg));
        got += n as u64;
        msgs += 1;
        last = start.elapsed();
        idle = Instant::now();
        if let Some(w) = &mut sink {
            w.write_all(msg)
                .map_err(|e| Error::Io("writing the payload".into(), e))?;
        }
    }
    if let Some(mut w) = sink {
        w.flush()
            .map_err(|e| Error::Io("writing the payload".into(), e))?;
    }
    Ok(Summary {
        bytes: got,
        frames: msgs,
        stream,
        elapsed: last,
    })
}

/// Real ports, for a Linux guest (root).
pub struct Hardware {
    bufs: Vec<(*mut libc::c_void, usize)>,
}

impl Hardware {
    /// Asks the kernel for ports `base..base + PORT_COUNT`.
    pub fn open(base: u16) -> Result<Self, Error> {
        Self::open_range(base, PORT_COUNT)
    }

    /// Asks the kernel for ports `base..base + count`.
    pub fn open_range(base: u16, count: u16) -> Result<Self, Error> {
        let end = base as u32 + count as u32;
        // SAFETY: ioperm/iopl change this process's I/O permission only.
        let r = unsafe {
            if end <= 0x400 {
                libc::ioperm(base as libc::c_ulong, count as libc::c_ulong, 1)
            } else {
                libc::iopl(3)
            }
        };
        if r != 0 {
            return Err(Error::Io(
                format!("access to ports {base:#x}..{end:#x} (run as root)"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { bufs: Vec::new() })
    }
}

impl Drop for Hardware {
    fn drop(&mut self) {
        for (p, len) in self.bufs.drain(..) {
            // SAFETY: unmapping buffers this struct mapped.
            unsafe { libc::munmap(p, len) };
        }
    }
}

fn phys_of(virt: usize) -> Result<u64, Error> {
    let page = 4096usize;
    let mut f = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| Error::Io("/proc/self/pagemap".into(), e))?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start((virt / page * 8) as u64))
        .map_err(|e| Error::Io("/proc/self/pagemap".into(), e))?;
    let mut e = [0u8; 8];
    f.read_exact(&mut e)
        .map_err(|e| Error::Io("/proc/self/pagemap".into(), e))?;
    let entry = u64::from_le_bytes(e);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        return Err(Error::NoDevice(
            "/proc/self/pagemap hides physical addresses (need root)".into(),
        ));
    }
    Ok(pfn * page as u64 + (virt % page) as u64)
}

impl Ports for Hardware {
    fn input(&mut self, port: u16, width: usize) -> u32 {
        let v: u32;
        // SAFETY: port I/O on ports this process was granted; no memory effects.
        unsafe {
            match width {
                1 => {
                    let b: u8;
                    std::arch::asm!("in al, dx", in("dx") port, out("al") b, options(nostack, preserves_flags));
                    v = b as u32;
                }
                2 => {
                    let w: u16;
                    std::arch::asm!("in ax, dx", in("dx") port, out("ax") w, options(nostack, preserves_flags));
                    v = w as u32;
                }
                _ => {
                    std::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags))
                }
            }
        }
        v
    }

    fn output(&mut self, port: u16, width: usize, v: u32) {
        // SAFETY: as for `input`.
        unsafe {
            match width {
                1 => {
                    std::arch::asm!("out dx, al", in("dx") port, in("al") v as u8, options(nostack, preserves_flags))
                }
                2 => {
                    std::arch::asm!("out dx, ax", in("dx") port, in("ax") v as u16, options(nostack, preserves_flags))
                }
                _ => {
                    std::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags))
                }
            }
        }
    }

    fn rep_out(&mut self, port: u16, src: &[u8], width: usize) {
        let n = src.len() / width;
        // SAFETY: reads `n * width <= src.len()` bytes; DF is clear.
        unsafe {
            match width {
                1 => {
                    std::arch::asm!("rep outsb", in("dx") port, inout("rsi") src.as_ptr() => _, inout("rcx") n => _, options(nostack, preserves_flags, readonly))
                }
                2 => {
                    std::arch::asm!("rep outsw", in("dx") port, inout("rsi") src.as_ptr() => _, inout("rcx") n => _, options(nostack, preserves_flags, readonly))
                }
                _ => {
                    std::arch::asm!("rep outsd", in("dx") port, inout("rsi") src.as_ptr() => _, inout("rcx") n => _, options(nostack, preserves_flags, readonly))
                }
            }
        }
    }

    fn rep_in(&mut self, port: u16, dst: &mut [u8], width: usize) {
        let n = dst.len() / width;
        // SAFETY: writes `n * width <= dst.len()` bytes; DF is clear.
        unsafe {
            match width {
                1 => {
                    std::arch::asm!("rep insb", in("dx") port, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") n => _, options(nostack, preserves_flags))
                }
                2 => {
                    std::arch::asm!("rep insw", in("dx") port, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") n => _, options(nostack, preserves_flags))
                }
                _ => {
                    std::arch::asm!("rep insd", in("dx") port, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") n => _, options(nostack, preserves_flags))
                }
            }
        }
    }

    fn dma_buffer(&mut self, len: usize) -> Result<DmaBuf, Error> {
        // A locked 2 MiB huge page is physically contiguous; fall back to
        // one locked 4 KiB page.
        let attempts = [
            (2usize << 20, libc::MAP_HUGETLB | libc::MAP_LOCKED),
            (4096, libc::MAP_LOCKED),
        ];
        for (size, extra) in attempts {
            // SAFETY: a fresh anonymous private mapping.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                continue;
            }
            self.bufs.push((p, size));
            let phys = phys_of(p as usize)?;
            return Ok(DmaBuf {
                ptr: p as *mut u8,
                len: size.min(len.max(1)),
                phys,
            });
        }
        Err(Error::Io(
            "allocating a locked buffer for descriptors".into(),
            std::io::Error::last_os_error(),
        ))
    }
}
