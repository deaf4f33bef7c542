//! The ivshmem UIO driver (`guest-modules/ivshmem_uio`) from userspace:
//! find `/dev/uioN` by the driver's name in `/sys/class/uio`, map BAR0
//! (map 0) and BAR2 (map 1), ring peers through the Doorbell register and
//! sleep in `read()` until rung.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::pci::Mapping;
use crate::shmem::Notifier;
use crate::Error;
use intervm_protocol::ivshmem;
use intervm_protocol::notify::SPIN_US_PVM;

/// `/sys/class/uio`.
pub const SYSFS_UIO: &str = "/sys/class/uio";
/// The name the driver registers.
pub const DRIVER_NAME: &str = "ivshmem";

const IV_POSITION: usize = ivshmem::IV_POSITION as usize;
const DOORBELL: usize = ivshmem::DOORBELL as usize;
/// The registers the tool uses (IntrMask .. Doorbell).
const REGISTER_BYTES: usize = 16;

/// `/dev/uioN` devices of the ivshmem driver under `class` (normally
/// [`SYSFS_UIO`]), sorted.
pub fn find(class: &Path) -> Result<Vec<PathBuf>, Error> {
    let rd = std::fs::read_dir(class).map_err(|e| Error::Io(class.display().to_string(), e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == DRIVER_NAME)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    v.sort();
    Ok(v)
}

/// Attribute `what` (`size`, `offset`, ...) of map `n` of `/dev/uioN`
/// from sysfs, a hexadecimal number.
fn map_attr(class: &Path, dev: &Path, n: u32, what: &str) -> Result<usize, Error> {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let p = class.join(&name).join(format!("maps/map{n}/{what}"));
    let s = std::fs::read_to_string(&p).map_err(|e| Error::Io(p.display().to_string(), e))?;
    usize::from_str_radix(s.trim().trim_start_matches("0x"), 16)
        .map_err(|_| Error::NoDevice(format!("{}: not a number: {s:?}", p.display())))
}

/// Size of map `n` of `/dev/uioN` from sysfs.
pub fn map_size(class: &Path, dev: &Path, n: u32) -> Result<usize, Error> {
    map_attr(class, dev, n, "size")
}

/// Where in map `n` of `/dev/uioN` its region starts (the driver offers a
/// BAR that does not start on a page as the pages holding it).
pub fn map_offset(class: &Path, dev: &Path, n: u32) -> Result<usize, Error> {
    map_attr(class, dev, n, "offset")
}

/// Picks `/dev/uioN`: the one given, or the only ivshmem one.
pub fn pick(class: &Path, given: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let all = find(class)?;
    match all.len() {
        1 => Ok(all[0].clone()),
        0 => Err(Error::NoDevice(format!(
            "no UIO device named {DRIVER_NAME:?} under {} (is ivshmem_uio loaded?)",
            class.display()
        ))),
        _ => Err(Error::NoDevice(format!(
            "several ivshmem UIO devices ({}); pick one with --uio",
            all.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// An open ivshmem UIO device.
pub struct Uio {
    file: File,
    regs: Mapping,
    /// Where the registers start in `regs`.
    offset: usize,
    adaptive: Option<Duration>,
}

impl Uio {
    /// Opens `dev` and maps its registers.
    pub fn open(class: &Path, dev: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|e| Error::Io(dev.display().to_string(), e))?;
        let size = map_size(class, dev, 0)?;
        let offset = map_offset(class, dev, 0)?;
        if offset
            .checked_add(REGISTER_BYTES)
            .is_none_or(|end| end > size)
        {
            return Err(Error::NoDevice(format!(
                "{}: register map of {size:#x} bytes with the registers at {offset:#x}",
                dev.display()
            )));
        }
        let regs = Mapping::open_at(dev, size, 0)?;
        // Interrupts on, as UIO does it (a 4-byte write of 1): a process
        // before this one may have left INTx masked. The driver takes it
        // as a no-op for MSI-X; EIO means the device has no interrupt.
        match (&file).write_all(&1u32.to_ne_bytes()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
            Err(e) => {
                return Err(Error::Io(
                    format!("{}: enabling interrupts", dev.display()),
                    e,
                ))
            }
        }
        Ok(Self {
            file,
            regs,
            offset,
            adaptive: Some(Duration::from_micros(SPIN_US_PVM)),
        })
    }

    /// Sets adaptive notification with a polling budget, or `None` for a
    /// doorbell per frame (both sides must agree).
    pub fn set_adaptive(&mut self, budget: Option<Duration>) {
        self.adaptive = budget;
    }

    /// Maps the shared memory (map 1).
    pub fn shared(class: &Path, dev: &Path) -> Result<Mapping, Error> {
        let page = 4096;
        Mapping::open_at(dev, map_size(class, dev, 1)?, page)
    }

    fn reg(&self, off: usize) -> *mut u32 {
        // SAFETY: the map holds REGISTER_BYTES from `offset` (checked in
        // open) and `off` is a register offset below that.
        unsafe { self.regs.ptr().add(self.offset + off) as *mut u32 }
    }

    /// This device's peer ID.
    pub fn iv_position(&self) -> u16 {
        // SAFETY: a mapped device register.
        unsafe { std::ptr::read_volatile(self.reg(IV_POSITION)) as u16 }
    }

    /// Rings `peer` on `vector`.
    pub fn ring_vector(&self, peer: u16, vector: u16) {
        // SAFETY: a mapped device register.
        unsafe { std::ptr::write_volatile(self.reg(DOORBELL), ivshmem::doorbell(peer, vector)) }
    }

    /// Waits up to `timeout` for an interrupt; returns the driver's total
    /// count if one came.
    pub fn wait_irq(&mut self, timeout: Duration) -> Result<Option<u32>, Error> {
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n <= 0 {
            return Ok(None);
        }
        let mut b = [0u8; 4];
        self.file
            .read_exact(&mut b)
            .map_err(|e| Error::Io("reading the UIO device".into(), e))?;
        Ok(Some(u32::from_ne_bytes(b)))
    }
}

impl Notifier for Uio {
    fn my_id(&mut self) -> Option<u16> {
        Some(self.iv_position())
    }
    fn ring(&mut self, id: u16) {
        self.ring_vector(id, 0);
    }
    fn wait(&mut self, timeout: Duration) {
        let _ = self.wait_irq(timeout);
    }
    fn adaptive(&self) -> Option<Duration> {
        self.adaptive
    }
}

/// Ping-pong of `rounds` doorbells with `peer`; returns the round-trip
/// times (initiator) or answer times.
pub fn ping_pong(
    uio: &mut Uio,
    peer: u16,
    rounds: u64,
    initiator: bool,
    timeout: Duration,
) -> Result<Vec<Duration>, Error> {
    let mut times = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t0 = Instant::now();
        if initiator {
            uio.ring_vector(peer, 0);
        }
        if uio.wait_irq(timeout)?.is_none() {
            return Err(Error::NoDevice(format!(
                "no doorbell from peer {peer} within {timeout:?}"
            )));
        }
        if !initiator {
            uio.ring_vector(peer, 0);
        }
        times.push(t0.elapsed());
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_driver_and_its_map_sizes() {
        let root = std::env::temp_dir().join(format!("intervm-uio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (n, name) in [("uio0", "other"), ("uio1", "ivshmem"), ("uio2", "ivshmem")] {
            std::fs::create_dir_all(root.join(n).join("maps/map1")).unwrap();
            std::fs::write(root.join(n).join("name"), format!("{name}\n")).unwrap();
            std::fs::write(root.join(n).join("maps/map1/size"), "0x0000000000400000\n").unwrap();
        }
        assert_eq!(
            find(&root).unwrap(),
            vec![PathBuf::from("/dev/uio1"), PathBuf::from("/dev/uio2")]
        );
        let e = pick(&root, None).unwrap_err().to_string();
        assert!(e.contains("several") && e.contains("/dev/uio2"), "{e}");
        assert_eq!(map_size(&root, Path::new("/dev/uio1"), 1).unwrap(), 4 << 20);
        std::fs::write(root.join("uio1/maps/map1/offset"), "0x100\n").unwrap();
        assert_eq!(map_offset(&root, Path::new("/dev/uio1"), 1).unwrap(), 0x100);
        std::fs::remove_dir_all(root.join("uio2")).unwrap();
        assert_eq!(pick(&root, None).unwrap(), PathBuf::from("/dev/uio1"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
