//! COM1: a `vm-superio` 8250 UART behind the `vm-device` PIO traits.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Where a VM's console output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOutput {
    /// The host's stdout, each line prefixed with `[vm-name] `.
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Kept in memory (tests read it with [`SerialBuffer::contents`]).
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

/// Prefixes each line with a tag, drops carriage returns, and writes whole
/// lines at once so the consoles of several VMs sharing stdout do not mix
/// within a line.
struct LinePrefix<W: Write> {
    prefix: String,
    inner: W,
    line: Vec<u8>,
}

impl<W: Write> LinePrefix<W> {
    fn new(prefix: String, inner: W) -> Self {
        Self {
            prefix,
            inner,
            line: Vec::new(),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        let mut out = Vec::with_capacity(self.prefix.len() + self.line.len());
        out.extend_from_slice(self.prefix.as_bytes());
        out.append(&mut self.line);
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
                _ => {
                    self.line.push(b);
                    // Bound the buffer for guests that never send a newline.
                    if self.line.len() >= 4096 {
                        self.line.push(b'\n');
                        self.emit()?;
                    }
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for LinePrefix<W> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.line.push(b'\n');
            let _ = self.emit();
        }
    }
}

impl SerialOutput {
    /// Opens the sink for a VM called `name`.
    pub fn open(&self, name: &str) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOutput::Stdout => Box::new(LinePrefix::new(format!("[{name}] "), io::stdout())),
            SerialOutput::File(p) => Box::new(File::options().create(true).append(true).open(p)?),
            SerialOutput::Buffer(b) => Box::new(b.clone()),
            SerialOutput::Sink => Box::new(io::sink()),
        })
    }
}

/// The serial interrupt: an eventfd bound to the COM1 GSI with an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART as a PIO device (8 ports at its base).
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
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
}
