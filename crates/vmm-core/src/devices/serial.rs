//! COM1: a `vm-superio` 8250 UART behind the `vm-device` PIO traits.
//!
//! Output goes where [`SerialOutput`] says; input is queued with
//! [`SerialDevice::enqueue_input`], for example by a
//! [`ConsoleInput`](super::console::ConsoleInput) thread reading the host's
//! stdin.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Where a VM's console output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOutput {
    /// The host's stdout, each line prefixed with `[vm-name] ` and written
    /// whole, so the lines of several VMs do not mix.
    #[default]
    Stdout,
    /// The host's stdout like [`SerialOutput::Stdout`], but a partial line
    /// (a shell prompt waiting for input) is written at once instead of
    /// when its newline comes: the output side of an interactive console.
    Console,
    /// Appended to a file.
    File(PathBuf),
    /// Kept in memory, all of it (tests read it with
    /// [`SerialBuffer::contents`]); it grows with everything the guest
    /// prints, so it is for tests and short runs.
    Buffer(SerialBuffer),
    /// Dropped.
    Sink,
}

/// A shared in-memory console capture.
#[derive(Clone, Debug, Default)]
pub struct SerialBuffer(Arc<Mutex<Vec<u8>>>);

impl SerialBuffer {
    /// A new, empty buffer.
    pub fn new() -> Self {
        Self::default()
    }
    /// Everything written so far, lossily decoded.
    pub fn contents(&self) -> String {
        match self.0.lock() {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        }
    }
}

impl Write for SerialBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A line is written out, with a newline added, once it holds this many
/// bytes (one more when the last was a control character, shown as two):
/// a guest that never sends a newline cannot grow the VMM's memory.
const MAX_LINE: usize = 4096;

/// Prefixes each line with a tag, drops carriage returns, and writes whole
/// lines at once so the consoles of several VMs sharing stdout do not mix
/// within a line. An `eager` one also writes a partial line at the end of
/// each write (prompts show up before their newline).
struct LinePrefix<W: Write> {
    prefix: String,
    inner: W,
    line: Vec<u8>,
    eager: bool,
    /// The prefix and part of the current line are already out.
    mid_line: bool,
    /// Control characters are shown as `^X`.
    sanitize: bool,
}

impl<W: Write> LinePrefix<W> {
    fn new(prefix: String, inner: W) -> Self {
        Self {
            prefix,
            inner,
            line: Vec::new(),
            eager: false,
            mid_line: false,
            sanitize: false,
        }
    }

    fn eager(prefix: String, inner: W) -> Self {
        let mut w = Self::new(prefix, inner);
        w.eager = true;
        w
    }

    /// Like [`LinePrefix::new`], showing control characters (escape
    /// sequences above all) as `^X` instead of passing them to the
    /// terminal: a guest's log cannot retitle, recolour or rewrite the
    /// host's terminal, or reach its clipboard.
    fn sanitized(prefix: String, inner: W) -> Self {
        let mut w = Self::new(prefix, inner);
        w.sanitize = true;
        w
    }

    fn emit(&mut self) -> io::Result<()> {
        let mut out = Vec::with_capacity(self.prefix.len() + self.line.len());
        if !self.mid_line {
            out.extend_from_slice(self.prefix.as_bytes());
        }
        out.append(&mut self.line);
        self.mid_line = out.last() != Some(&b'\n');
        self.inner.write_all(&out)?;
        self.inner.flush()
    }
}

impl<W: Write> Write for LinePrefix<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            match b {
                b'\r' => {}
                b'\n' => {
                    self.line.push(b);
                    self.emit()?;
                }
                b => {
                    if self.sanitize && (b < 0x20 && b != b'\t' || b == 0x7f) {
                        self.line.extend_from_slice(&[b'^', b ^ 0x40]);
                    } else {
                        self.line.push(b);
                    }
                    // Bound the buffer for guests that never send a newline.
                    if self.line.len() >= MAX_LINE {
                        self.line.push(b'\n');
                        self.emit()?;
                    }
                }
            }
        }
        if self.eager && !self.line.is_empty() {
            self.emit()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for LinePrefix<W> {
    fn drop(&mut self) {
        if !self.line.is_empty() || self.mid_line {
            self.line.push(b'\n');
            let _ = self.emit();
        }
    }
}

impl SerialOutput {
    /// Opens the sink for a VM called `name`.
    pub fn open(&self, name: &str) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOutput::Stdout => {
                Box::new(LinePrefix::sanitized(format!("[{name}] "), io::stdout()))
            }
            // The user's own terminal on the guest: sequences pass, as in
            // any terminal session.
            SerialOutput::Console => {
                Box::new(LinePrefix::eager(format!("[{name}] "), io::stdout()))
            }
            SerialOutput::File(p) => Box::new(File::options().create(true).append(true).open(p)?),
            SerialOutput::Buffer(b) => Box::new(b.clone()),
            SerialOutput::Sink => Box::new(io::sink()),
        })
    }
}

/// The serial interrupt: an eventfd bound to the COM1 GSI with an irqfd.
pub struct EventFdTrigger(
    /// The eventfd registered as the COM1 GSI's irqfd.
    pub EventFd,
);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Counts the guest's reads of the receive buffer, so that a writer who
/// found the FIFO full can sleep until there is room again.
#[derive(Debug, Default)]
pub(crate) struct RxReads {
    count: Mutex<u64>,
    cv: Condvar,
}

impl RxReads {
    /// Reads so far.
    pub(crate) fn count(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the count differs from `seen`, a [`RxReads::wake`], a
    /// spurious wake-up or `timeout`, whichever comes first.
    pub(crate) fn wait_since(&self, seen: u64, timeout: Duration) {
        let count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        if *count == seen {
            let _ = self.cv.wait_timeout(count, timeout);
        }
    }

    /// Wakes every waiter without counting a read.
    pub(crate) fn wake(&self) {
        let _guard = self.count.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }
}

impl SerialEvents for RxReads {
    fn buffer_read(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_all();
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

/// The UART as a PIO device (8 ports at its base).
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, Arc<RxReads>, Box<dyn Write + Send>>,
    reads: Arc<RxReads>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let reads = Arc::new(RxReads::default());
        Self {
            uart: Serial::with_events(EventFdTrigger(irq), reads.clone(), out),
            reads,
        }
    }

    /// Queues bytes for the guest to read (console input), as many as fit
    /// in the 64-byte receive FIFO, and raises the interrupt if the guest
    /// enabled it. Returns how many were queued: 0 when the FIFO is full
    /// (or the guest has the UART in loopback mode); retry the rest once
    /// the guest has read.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let fits = self.uart.fifo_capacity().min(bytes.len());
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(UartError::FullFifo) => 0,
            // The bytes are queued; only the interrupt failed (the guest
            // still finds them when it next looks at the line status).
            Err(UartError::Trigger(e)) => {
                log::warn!("serial: raising the receive interrupt: {e}");
                fits
            }
            Err(e) => {
                log::warn!("serial: queueing input: {e:?}");
                0
            }
        }
    }

    /// The read counter console input waits on.
    pub(crate) fn rx_reads(&self) -> Arc<RxReads> {
        self.reads.clone()
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 || offset >= 8 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 || offset >= 8 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::debug!("serial write: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let buf = SerialBuffer::new();
        let mut dev = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(buf.clone()));
        for b in b"hi\n" {
            dev.pio_write(PioAddress(0x3f8), 0, &[*b]);
        }
        assert_eq!(buf.contents(), "hi\n");
        let mut wide = [0u8; 2];
        dev.pio_read(PioAddress(0x3f8), 5, &mut wide);
        assert_eq!(wide, [0xff, 0xff], "wrong-width reads fill 0xff");
    }

    #[test]
    fn stdout_lines_get_the_vm_prefix() {
        let mut out = Vec::new();
        {
            let mut w = LinePrefix::new("[a] ".into(), &mut out);
            w.write_all(b"one\r\ntw").unwrap();
            w.write_all(b"o\nunterminated").unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[a] one\n[a] two\n[a] unterminated\n"
        );
    }

    #[test]
    fn escape_sequences_from_a_guest_never_reach_the_terminal() {
        let mut out = Vec::new();
        {
            // Set the window title, write the clipboard (OSC 52), clear.
            let mut w = LinePrefix::sanitized("[a] ".into(), &mut out);
            w.write_all(b"\x1b]0;owned\x07\x1b]52;c;aGk=\x07\x1b[2Jok\tdone\x7f\n")
                .unwrap();
        }
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "[a] ^[]0;owned^G^[]52;c;aGk=^G^[[2Jok\tdone^?\n");
        assert!(!s.contains('\x1b'));
    }

    #[test]
    fn a_guest_that_never_ends_a_line_cannot_grow_the_buffer() {
        // Printable bytes and control bytes (shown as two each) alike.
        for (byte, shown) in [(b'x', "x"), (0x01, "^A")] {
            let mut out = Vec::new();
            let mut w = LinePrefix::sanitized("[a] ".into(), &mut out);
            for _ in 0..100 {
                w.write_all(&[byte; 1000]).unwrap();
                assert!(w.line.len() <= MAX_LINE, "{} bytes held", w.line.len());
            }
            drop(w);
            let s = String::from_utf8(out).unwrap();
            assert!(
                s.lines().all(|l| l.len() <= 4 + MAX_LINE + 1),
                "a line too long"
            );
            let shown_total: usize = s.lines().map(|l| l[4..].len()).sum();
            assert_eq!(shown_total, 100_000 * shown.len(), "bytes lost");
        }
    }

    #[test]
    fn console_output_writes_partial_lines_at_once() {
        let out = SerialBuffer::new();
        let mut w = LinePrefix::eager("[a] ".into(), out.clone());
        w.write_all(b"boot\r\n~ # ").unwrap();
        assert_eq!(
            out.contents(),
            "[a] boot\n[a] ~ # ",
            "the prompt is out before its newline"
        );
        w.write_all(b"e").unwrap();
        w.write_all(b"cho\r\n~ # ").unwrap();
        assert_eq!(out.contents(), "[a] boot\n[a] ~ # echo\n[a] ~ # ");
        drop(w);
        assert_eq!(
            out.contents(),
            "[a] boot\n[a] ~ # echo\n[a] ~ # \n",
            "the last partial line is ended"
        );
    }
}
