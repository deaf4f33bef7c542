//! Finding an ivshmem device in sysfs and mapping one of its BARs.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::Error;

/// `/sys/bus/pci/devices`.
pub const SYSFS_DEVICES: &str = "/sys/bus/pci/devices";

fn read_hex(p: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(p).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// PCI functions under `root` (normally [`SYSFS_DEVICES`]) with the given
/// vendor and device IDs, sorted by address.
pub fn find(root: &Path, vendor: u32, device: u32) -> Result<Vec<PathBuf>, Error> {
    let entries = std::fs::read_dir(root).map_err(|e| Error::Io(root.display().to_string(), e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            read_hex(&p.join("vendor")) == Some(vendor)
                && read_hex(&p.join("device")) == Some(device)
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Picks the device: `bdf` (e.g. `0000:00:03.0` or `00:03.0`) if given,
/// else the only one present.
pub fn pick(root: &Path, vendor: u32, device: u32, bdf: Option<&str>) -> Result<PathBuf, Error> {
    let all = find(root, vendor, device)?;
    let names = || {
        all.iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match bdf {
        Some(b) => all
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(b))
            })
            .cloned()
            .ok_or_else(|| {
                Error::NoDevice(format!(
                    "no {vendor:04x}:{device:04x} at {b} (found: {})",
                    names()
                ))
            }),
        None => match all.len() {
            0 => Err(Error::NoDevice(format!(
                "no {vendor:04x}:{device:04x} device under {}",
                root.display()
            ))),
            1 => Ok(all[0].clone()),
            _ => Err(Error::NoDevice(format!(
                "several {vendor:04x}:{device:04x} devices ({}); pick one with --device",
                names()
            ))),
        },
    }
}

/// A shared mapping of a file (a sysfs `resourceN` file or any file
/// holding the region): of all of it, or of windows of it
/// ([`Mapping::reserve`]).
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    /// Windows are mapped on demand from this file (`None`: all of it is
    /// mapped).
    windows: Option<std::fs::File>,
}

impl Mapping {
    /// Maps the whole file `path` read-write and shared.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_at(path, region_len(path)?, 0)
    }

    /// Maps `len` bytes of `path` at `offset` read-write and shared (UIO
    /// selects map N with offset N * page size).
    pub fn open_at(path: &Path, len: usize, offset: usize) -> Result<Self, Error> {
        let f = open_rw(path)?;
        // SAFETY: a fresh shared mapping of a file we opened read-write; the
        // kernel picks the address. The file may be written by other VMs:
        // the ring code only accesses it through atomics and copies it
        // validates.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io(
                format!("{}: mmap", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
            windows: None,
        })
    }

    /// Reserves address space for the whole file `path` and maps only its
    /// first `first` bytes; [`Mapping::reveal`] maps more. A region of
    /// several GiB costs the guest kernel a page-table entry per 4 KiB
    /// mapped (minutes on PVM, where that kernel code is emulated), while
    /// the ring protocol uses only its header and its rings.
    pub fn reserve(path: &Path, first: usize) -> Result<Self, Error> {
        let len = region_len(path)?;
        let f = open_rw(path)?;
        // SAFETY: a fresh private mapping without access or backing: it only
        // holds the address range for the windows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io(
                format!("{}: reserving {len} bytes of address space", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let map = Self {
            ptr: ptr as *mut u8,
            len,
            windows: Some(f),
        };
        map.reveal(0, first.min(len))?;
        Ok(map)
    }

    /// Maps bytes `offset..offset + len` of the file at the same place in
    /// the reservation, read-write and shared. Page aligned (rounded out);
    /// nothing to do on a mapping of the whole file.
    pub fn reveal(&self, offset: usize, len: usize) -> Result<(), Error> {
        let Some(f) = &self.windows else {
            return Ok(());
        };
        let start = offset / 4096 * 4096;
        let end = offset
            .checked_add(len)
            .map(|e| e.next_multiple_of(4096).min(self.len))
            .filter(|e| *e > start && start < self.len)
            .ok_or_else(|| {
                Error::NoDevice(format!(
                    "window {offset:#x}+{len:#x} outside the region of {:#x} bytes",
                    self.len
                ))
            })?;
        // SAFETY: replaces pages [start, end) of our own reservation (checked
        // to lie inside it) with a shared mapping of the same bytes of the
        // file we opened read-write.
        let ptr = unsafe {
            libc::mmap(
                self.ptr.add(start) as *mut libc::c_void,
                end - start,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                f.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io(
                format!("mmap of region bytes {start:#x}..{end:#x}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// First byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: `open` refuses those).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The size of the region file `path` (at least a page).
fn region_len(path: &Path) -> Result<usize, Error> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::Io(path.display().to_string(), e))?
        .len() as usize;
    if len < 4096 {
        return Err(Error::NoDevice(format!(
            "{}: only {len} bytes",
            path.display()
        )));
    }
    Ok(len)
}

fn open_rw(path: &Path) -> Result<std::fs::File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::Io(path.display().to_string(), e))
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` or `reserve` mapped (the
        // windows lie inside the reservation).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Turns on memory decoding for a device no driver has claimed (writes 1
/// to its sysfs `enable`).
pub fn enable(dev: &Path) -> Result<(), Error> {
    let p = dev.join("enable");
    if std::fs::read_to_string(&p).is_ok_and(|s| s.trim() != "0") {
        return Ok(());
    }
    std::fs::write(&p, "1").map_err(|e| Error::Io(p.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(devs: &[(&str, &str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "intervm-guest-sysfs-{}-{}",
            std::process::id(),
            devs.len()
        ));
        let _ = std::fs::remove_dir_all(&root);
        for (bdf, v, d) in devs {
            let p = root.join(bdf);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("vendor"), format!("{v}\n")).unwrap();
            std::fs::write(p.join("device"), format!("{d}\n")).unwrap();
        }
        root
    }

    #[test]
    fn finds_ivshmem_by_ids_and_address() {
        let root = fake_sysfs(&[
            ("0000:00:00.0", "0x8086", "0x1237"),
            ("0000:00:04.0", "0x1af4", "0x1110"),
            ("0000:00:03.0", "0x1af4", "0x1110"),
        ]);
        let all = find(&root, 0x1af4, 0x1110).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[0].ends_with("0000:00:03.0"));
        let e = pick(&root, 0x1af4, 0x1110, None).unwrap_err().to_string();
        assert!(e.contains("several") && e.contains("0000:00:04.0"), "{e}");
        assert!(pick(&root, 0x1af4, 0x1110, Some("00:04.0"))
            .unwrap()
            .ends_with("0000:00:04.0"));
        let e = pick(&root, 0x1af4, 0x1110, Some("00:09.0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no 1af4:1110 at 00:09.0"), "{e}");
        assert!(pick(&root, 0x1af4, 0x9999, None)
            .unwrap_err()
            .to_string()
            .contains("no 1af4:9999"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
