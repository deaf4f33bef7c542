//! The host memory object behind BAR2.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use shrink_guard::Guarded;
use vm_memory::{FileOffset, MmapRegion};

use crate::{Error, Result};

/// True when `name` can name a POSIX shared-memory object `/dev/shm/NAME`:
/// 1-200 bytes, no `/` or NUL, and not `.` or `..`.
pub fn is_shm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
}

/// Where the shared region lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// An anonymous memfd: members must be in this process.
    Memfd,
    /// A POSIX shared-memory object, `/dev/shm/NAME`.
    Shm(String),
    /// A regular file (tmpfs recommended).
    File(PathBuf),
    /// A file on a hugetlbfs mount (size must be a multiple of the huge page size).
    Hugetlbfs(PathBuf),
}

/// A mapped shared region.
///
/// The mapping is guarded ([`shrink_guard`]): if another process
/// shrinks the backing, this process keeps running on a private copy and
/// [`SharedRegion::lost`] turns true. That covers this process's own
/// accesses (SIGBUS); a guest's access through KVM makes `KVM_RUN` fail
/// with `EFAULT` instead, and a VMM with its own vCPU loop calls
/// [`shrink_guard::recover`] there and runs the vCPU again (vmm-core's loop
/// does). Opening the first region installs a SIGBUS handler that passes
/// faults elsewhere to the handler installed before it.
pub struct SharedRegion {
    // Dropped before `map`: stop guarding, then unmap.
    guard: Option<Guarded>,
    map: MmapRegion<()>,
    file: File,
    size: u64,
    created: bool,
    label: String,
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("label", &self.label)
            .field("size", &self.size)
            .finish()
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

impl SharedRegion {
    /// Opens (creating it if needed) the backing and maps `size` bytes shared.
    /// An existing non-empty backing of another size is an error, never
    /// truncated or grown.
    pub fn open(backing: &Backing, size: u64) -> Result<Self> {
        if size < 4096 || !size.is_power_of_two() {
            return Err(Error::BadSize(size));
        }
        let (file, label, hugetlb) = match backing {
            Backing::Memfd => (
                shrink_guard::memfd("intervm-shmem", 0).map_err(|source| Error::Io {
                    what: "memfd".into(),
                    source,
                })?,
                "memfd".to_string(),
                false,
            ),
            Backing::Shm(name) => {
                if !is_shm_name(name) {
                    return Err(Error::BadName(name.clone()));
                }
                let p = Path::new("/dev/shm").join(name);
                (open_file(&p)?, p.display().to_string(), false)
            }
            Backing::File(p) => (open_file(p)?, p.display().to_string(), false),
            Backing::Hugetlbfs(p) => (open_file(p)?, p.display().to_string(), true),
        };
        let found = file.metadata().map_err(io(format!("{label}: stat")))?.len();
        let created = found == 0;
        if created {
            file.set_len(size)
                .map_err(io(format!("{label}: sizing to {size} bytes")))?;
        } else if found != size {
            return Err(Error::SizeMismatch {
                path: label,
                found,
                wanted: size,
            });
        }
        let map = map_shared(&file, size, hugetlb, &label)?;
        Ok(Self {
            guard: guard(&map, &file),
            map,
            file,
            size,
            created,
            label,
        })
    }

    /// Maps an already open shared-memory file (for example one received
    /// from an ivshmem server) whole; its size must be a power of two.
    pub fn from_file(file: File, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let size = file.metadata().map_err(io(format!("{label}: stat")))?.len();
        if size < 4096 || !size.is_power_of_two() {
            return Err(Error::BadSize(size));
        }
        let map = map_shared(&file, size, false, &label)?;
        Ok(Self {
            guard: guard(&map, &file),
            map,
            file,
            size,
            created: false,
            label,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Host address of the first byte.
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    /// True when this call created (sized) the backing.
    pub fn created(&self) -> bool {
        self.created
    }
    /// The backing file (e.g. to pass to another process).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// A human-readable name of the backing.
    pub fn label(&self) -> &str {
        &self.label
    }
    /// True once another process shrank the backing under this mapping:
    /// this process now sees private zeroed memory there, and the channel
    /// over it is lost (report it; nothing else is affected).
    pub fn lost(&self) -> bool {
        self.guard.as_ref().is_some_and(Guarded::lost)
    }

    /// Faults every page of the mapping in, writable, without changing a
    /// byte (`MADV_POPULATE_WRITE`, Linux 5.14): the first messages
    /// through a fresh region then take no page faults (about 1 ms per
    /// 2 MiB on the PVM host of `docs/REPORT.md`), at the price of that
    /// time once, up front, and of the memory being resident. For regions
    /// only VMMs touch, such as port-I/O rings.
    pub fn populate(&self) -> Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the range is this object's live mapping; the advice
        // only faults pages in and never changes their contents.
        let r = unsafe {
            libc::madvise(
                self.map.as_ptr() as *mut libc::c_void,
                self.size as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(Error::Io {
                what: format!("{}: populating {} bytes", self.label, self.size),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// Guards `map` (of `file`) against the file being shrunk.
fn guard(map: &MmapRegion<()>, file: &File) -> Option<Guarded> {
    use std::os::fd::AsRawFd;
    let g = shrink_guard::guard(map.as_ptr(), map.size(), file.as_raw_fd(), 0);
    if g.is_none() {
        log::warn!(
            "more than {} shared regions: this one is not guarded against being shrunk",
            shrink_guard::MAX_GUARDED
        );
    }
    g
}

/// Maps `size` bytes of `file` read-write and shared.
fn map_shared(file: &File, size: u64, hugetlb: bool, label: &str) -> Result<MmapRegion<()>> {
    let fo = FileOffset::new(
        file.try_clone()
            .map_err(io(format!("{label}: duplicating the descriptor")))?,
        0,
    );
    vm_memory::mmap::MmapRegionBuilder::new(size as usize)
        .with_file_offset(fo)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_hugetlbfs(hugetlb)
        .build()
        .map_err(|e| Error::Io {
            what: format!("{label}: mmap"),
            source: std::io::Error::other(e.to_string()),
        })
}

/// Opens (creating it `0600` if missing) a backing. Never follows a
/// symbolic link, and refuses anything but a regular file owned by this
/// user: in a shared directory such as `/dev/shm`, another user could have
/// planted a link to a file of ours (which would then be formatted), or a
/// file of theirs (which they could read or resize under us).
fn open_file(p: &Path) -> Result<File> {
    use std::os::unix::fs::MetadataExt;
    let shown = p.display().to_string();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => Error::UntrustedBacking {
                path: shown.clone(),
                why: "is a symbolic link; name the file itself".into(),
            },
            _ => Error::Io {
                what: format!("{shown}: open"),
                source,
            },
        })?;
    let meta = f.metadata().map_err(io(format!("{shown}: stat")))?;
    if !meta.file_type().is_file() {
        return Err(Error::UntrustedBacking {
            path: shown,
            why: "is not a regular file".into(),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::UntrustedBacking {
            path: shown,
            why: format!(
                "belongs to uid {}, not to this user (uid {me}), who could read or resize it \
                 under every member; remove it, or use a backing this user owns",
                meta.uid()
            ),
        });
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many pages of `r` are resident (`mincore`).
    fn resident(r: &SharedRegion) -> usize {
        let mut v = vec![0u8; (r.size() / 4096) as usize];
        // SAFETY: the range is `r`'s live mapping; `v` has a byte per page.
        let rc = unsafe {
            libc::mincore(
                r.host_addr() as *mut libc::c_void,
                r.size() as usize,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn populate_faults_every_page_in_and_keeps_the_bytes() {
        let r = SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap();
        // SAFETY: inside the mapping.
        unsafe { r.host_addr().add(5000).write_volatile(0x5a) };
        assert_eq!(resident(&r), 1, "only the page written");
        r.populate().unwrap();
        assert_eq!(resident(&r), 256);
        // SAFETY: as above.
        assert_eq!(unsafe { r.host_addr().add(5000).read_volatile() }, 0x5a);
    }

    #[test]
    fn sizes_must_be_powers_of_two() {
        assert!(matches!(
            SharedRegion::open(&Backing::Memfd, 3000),
            Err(Error::BadSize(3000))
        ));
        assert!(matches!(
            SharedRegion::open(&Backing::Memfd, 12288),
            Err(Error::BadSize(_))
        ));
        let r = SharedRegion::open(&Backing::Memfd, 1 << 16).unwrap();
        assert!(r.created());
        assert_eq!(r.size(), 1 << 16);
    }

    #[test]
    fn backings_that_are_links_or_not_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("intervm-region-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, vec![7u8; 4096]).unwrap();
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = SharedRegion::open(&Backing::File(link.clone()), 4096).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            vec![7u8; 4096],
            "untouched"
        );
        let e = SharedRegion::open(&Backing::File(dir.clone()), 4096).unwrap_err();
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_backing_owned_by_another_user_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: giving a file to another user needs root");
            return;
        }
        let p = std::env::temp_dir().join(format!("intervm-region-theirs-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = SharedRegion::open(&Backing::File(p.clone()), 4096).unwrap_err();
        assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn shm_backing_is_shared_and_never_resized() {
        let name = format!("intervm-test-{}", std::process::id());
        let a = SharedRegion::open(&Backing::Shm(name.clone()), 1 << 16).unwrap();
        let b = SharedRegion::open(&Backing::Shm(name.clone()), 1 << 16).unwrap();
        assert!(a.created() && !b.created());
        // SAFETY: both map 64 KiB; offset 100 is inside.
        unsafe {
            a.host_addr().add(100).write_volatile(0x5a);
            assert_eq!(b.host_addr().add(100).read_volatile(), 0x5a);
        }
        let e = SharedRegion::open(&Backing::Shm(name.clone()), 1 << 17).unwrap_err();
        assert!(
            e.to_string()
                .contains("exists with 65536 bytes, but the channel wants 131072"),
            "{e}"
        );
        assert!(matches!(
            SharedRegion::open(&Backing::Shm("a/b".into()), 4096),
            Err(Error::BadName(_))
        ));
        std::fs::remove_file(Path::new("/dev/shm").join(name)).unwrap();
    }
}
