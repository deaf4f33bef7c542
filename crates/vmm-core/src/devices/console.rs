//! Console input: bytes from a host file descriptor (usually stdin) into a
//! VM's COM1.
//!
//! A [`ConsoleInput`] owns one thread that sleeps in `poll(2)` until the
//! input has bytes (or it is told to stop), reads them and queues them in
//! the UART's receive FIFO with [`SerialDevice::enqueue_input`], which
//! raises the serial interrupt (IRQ 4 for COM1) when the guest enabled it.
//! Bytes pass unchanged: no newline or control-character translation.
//!
//! When the 64-byte FIFO is full the thread waits until the guest reads
//! from it, with a 50 ms upper bound per wait (the guest may also free the
//! FIFO without reading, e.g. by leaving loopback mode). At end of input it
//! stops forwarding; the VM runs on. Terminal modes are left alone, so from
//! a terminal the guest gets a line when Enter is pressed.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::serial::{RxReads, SerialDevice};

/// Longest sleep while the receive FIFO is full before trying again.
const FIFO_RETRY: Duration = Duration::from_millis(50);

struct Stop {
    flag: AtomicBool,
    evt: EventFd,
    reads: Arc<RxReads>,
}

impl Stop {
    fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::warn!("console input: stop eventfd: {e}");
        }
        self.reads.wake();
    }
    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// A thread forwarding a host file descriptor to a VM's serial input.
///
/// Dropping it stops forwarding, as [`ConsoleInput::stop`] does.
pub struct ConsoleInput {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

impl ConsoleInput {
    /// Starts forwarding everything read from `input` to `serial`'s receive
    /// FIFO, on a thread named after `name` (the VM).
    pub fn spawn(serial: Arc<Mutex<SerialDevice>>, input: OwnedFd, name: &str) -> io::Result<Self> {
        let reads = serial
            .lock()
            .map_err(|_| io::Error::other("serial device lock poisoned"))?
            .rx_reads();
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reads,
        });
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-console-in"))
            .spawn(move || forward(File::from(input), &serial, &s))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// [`ConsoleInput::spawn`] on a duplicate of the host's standard input.
    pub fn stdin(serial: Arc<Mutex<SerialDevice>>, name: &str) -> io::Result<Self> {
        let fd = io::stdin().as_fd().try_clone_to_owned()?;
        Self::spawn(serial, fd, name)
    }

    /// Waits until the input ends (end of file or a read error) and every
    /// byte read has been queued; returns how many bytes were forwarded.
    pub fn join(mut self) -> io::Result<u64> {
        self.wait()
    }

    /// Stops forwarding (bytes read but not yet queued are dropped) and
    /// waits for the thread; returns how many bytes were forwarded.
    pub fn stop(mut self) -> io::Result<u64> {
        self.stop.request();
        self.wait()
    }

    fn wait(&mut self) -> io::Result<u64> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("console input thread panicked"))),
            None => Ok(0),
        }
    }
}

impl Drop for ConsoleInput {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.request();
            let _ = self.wait();
        }
    }
}

/// Sleeps until `input` is readable or a stop is requested; false on stop.
fn wait_readable(input: &File, stop: &Stop) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if stop.requested() {
            return Ok(false);
        }
        // SAFETY: two valid pollfds that live across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            // Readable, hung up or in error: the read says which.
            return Ok(!stop.requested());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The thread: read, queue, repeat until end of input or a stop.
fn forward(mut input: File, serial: &Mutex<SerialDevice>, stop: &Stop) -> io::Result<u64> {
    let mut buf = [0u8; 4096];
    let mut total = 0u64;
    loop {
        if !wait_readable(&input, stop)? {
            return Ok(total);
        }
        let n = match input.read(&mut buf) {
            Ok(0) => {
                log::debug!("console input: end of input after {total} bytes");
                return Ok(total);
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let seen = stop.reads.count();
            let queued = serial
                .lock()
                .map_err(|_| io::Error::other("serial device lock poisoned"))?
                .enqueue_input(rest);
            total += queued as u64;
            rest = &rest[queued..];
            if queued == 0 {
                if stop.requested() {
                    return Ok(total);
                }
                stop.reads.wait_since(seen, FIFO_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;
    use std::time::Instant;
    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;

    const COM1: PioAddress = PioAddress(0x3f8);
    /// Only catches hangs; nothing here waits for it to pass.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// A UART whose interrupt eventfd the test waits on, as the guest's
    /// interrupt handler would, with the receive interrupt enabled.
    fn uart() -> (Arc<Mutex<SerialDevice>>, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        let dev = Arc::new(Mutex::new(dev));
        // IER: received-data-available interrupt on (what Linux's 8250 sets).
        dev.lock().unwrap().pio_write(COM1, 1, &[0x01]);
        (dev, irq)
    }

    fn reg(dev: &Mutex<SerialDevice>, offset: u16) -> u8 {
        let mut b = [0u8];
        dev.lock().unwrap().pio_read(COM1, offset, &mut b);
        b[0]
    }

    /// Blocks until the interrupt eventfd fires (or panics at `deadline`);
    /// returns how many interrupts it counted.
    fn wait_irq(irq: &EventFd, deadline: Instant) -> u64 {
        let mut p = libc::pollfd {
            fd: irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        assert_eq!(n, 1, "no serial interrupt before the deadline");
        irq.read().unwrap()
    }

    /// Runs `f` on a thread, failing if it takes longer than [`DEADLINE`].
    fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(DEADLINE).expect("did not finish in time")
    }

    #[test]
    fn piped_input_reaches_the_guest_raw_with_interrupts_through_a_full_fifo() {
        let (dev, irq) = uart();
        let (reader, mut writer) = io::pipe().unwrap();
        let input = ConsoleInput::spawn(dev.clone(), reader.into(), "t").unwrap();
        // 1000 bytes, far more than the 64-byte FIFO, with every byte value
        // a terminal or a translation layer might touch (CR, LF, ^C, ^D, NUL).
        let sent: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        writer.write_all(&sent).unwrap();
        drop(writer); // end of input

        // The guest's interrupt handler: wait for IRQ, read IIR, drain RBR
        // while LSR says data ready.
        let deadline = Instant::now() + DEADLINE;
        let mut got = Vec::new();
        let mut interrupts = 0;
        while got.len() < sent.len() {
            interrupts += wait_irq(&irq, deadline);
            let _iir = reg(&dev, 2);
            while reg(&dev, 5) & 0x01 != 0 {
                got.push(reg(&dev, 0));
            }
        }
        assert_eq!(got, sent, "bytes changed on the way");
        // The FIFO holds 64 of the 1000 bytes, and the loop above drains
        // only after an interrupt: had a refill raised none, `wait_irq`
        // would have hit the deadline. How many there were depends on how
        // the forwarder and this loop interleave (one interrupt may cover
        // several refills while the loop drains), so it is not bounded.
        assert!(interrupts >= 1);
        // End of input ends the forwarder by itself, with every byte queued.
        assert_eq!(within_deadline(move || input.join()).unwrap(), 1000);
        // The UART (so the VM) carries on: more input still gets through.
        assert_eq!(dev.lock().unwrap().enqueue_input(b"x"), 1);
        assert_eq!(reg(&dev, 0), b'x');
    }

    #[test]
    fn a_full_fifo_is_not_overrun_and_stop_ends_a_blocked_forwarder() {
        let (dev, irq) = uart();
        let (reader, mut writer) = io::pipe().unwrap();
        let input = ConsoleInput::spawn(dev.clone(), reader.into(), "t").unwrap();
        writer.write_all(&[b'a'; 100]).unwrap();
        // The first interrupt means the first bytes are in; the guest never
        // reads, so the forwarder waits for room with 36 bytes left over.
        wait_irq(&irq, Instant::now() + DEADLINE);
        let forwarded = within_deadline(move || input.stop()).unwrap();
        assert_eq!(forwarded, 64, "only what fits in the FIFO");
        let mut n = 0;
        while reg(&dev, 5) & 0x01 != 0 {
            assert_eq!(reg(&dev, 0), b'a');
            n += 1;
        }
        assert_eq!(n, 64);
        drop(writer);
    }

    #[test]
    fn stop_ends_a_forwarder_waiting_for_input() {
        let (dev, _irq) = uart();
        let (reader, writer) = io::pipe().unwrap();
        let input = ConsoleInput::spawn(dev, reader.into(), "t").unwrap();
        assert_eq!(within_deadline(move || input.stop()).unwrap(), 0);
        drop(writer);
    }

    #[test]
    fn enqueue_reports_a_full_fifo_as_nothing_queued() {
        let (dev, _irq) = uart();
        let mut d = dev.lock().unwrap();
        assert_eq!(d.enqueue_input(&[1; 100]), 64);
        assert_eq!(d.enqueue_input(&[1; 10]), 0);
        assert_eq!(d.enqueue_input(&[]), 0);
    }
}
