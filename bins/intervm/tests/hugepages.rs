//! Shared regions on hugepages (`backing = { hugetlbfs = PATH }`): the test
//! mounts a hugetlbfs of its own, reserves pages for the region, moves
//! checksummed data between two probe VMs over it, and puts the host back
//! as it was. 2 MiB pages always; 1 GiB pages where the host can reserve
//! one. Needs root (CI runs as root; elsewhere it skips with the reason).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_received_clean, run_config_ok};
use intervm_testkit::{kvm_available, missing};

/// A hugetlbfs mount with `pages` pages of `kib` KiB reserved; undone when
/// dropped.
struct HugePages {
    mount: PathBuf,
    pool: PathBuf,
    before: u64,
}

impl HugePages {
    /// `None` (after saying why) when the pages cannot be had.
    fn reserve(kib: u64, pages: u64) -> Option<Self> {
        let pool = PathBuf::from(format!(
            "/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
        ));
        let read = |p: &Path| -> u64 {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        if !pool.exists() {
            eprintln!("SKIPPED: this host has no {kib} KiB hugepages");
            return None;
        }
        let before = read(&pool);
        // The free pages of the pool may be in use by others: add ours.
        let _ = std::fs::write(&pool, (before + pages).to_string());
        let mount = std::env::temp_dir().join(format!("intervm-huge-{kib}-{}", std::process::id()));
        std::fs::create_dir_all(&mount).unwrap();
        let me = Self {
            mount,
            pool,
            before,
        };
        if read(&me.pool) < before + pages {
            eprintln!(
                "SKIPPED: the kernel could not reserve {pages} more {kib} KiB hugepages (memory too fragmented)"
            );
            return None;
        }
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", &format!("pagesize={kib}K"), "none"])
            .arg(&me.mount)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a hugetlbfs at {}", me.mount.display());
        Some(me)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.mount.join("region"));
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::write(&self.pool, self.before.to_string());
    }
}

fn transfer_over_hugepages(kib: u64, region: &str, pages: u64, size: &str, want: &str) {
    if !kvm_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing("mounting a hugetlbfs and reserving hugepages needs root");
        return;
    }
    let Some(h) = HugePages::reserve(kib, pages) else {
        return;
    };
    let path = h.mount.join("region");
    let body = format!(
        "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = {{ task = \"send\", channel = \"c\", to = \"b\", size = \"{size}\" }}\n\
         [[vm]]\nname = \"b\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = {{ task = \"recv\", channel = \"c\", size = \"{size}\" }}\n\
         [[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"{region}\"\n\
         backing = {{ hugetlbfs = \"{}\" }}\n",
        path.display()
    );
    let out = run_config_ok(&format!("huge-{kib}.toml"), &body);
    assert_received_clean(&out, &format!("b: received {want} of {want} from a over c"));
    // The region lived on that hugetlbfs: its blocks are pages of that size.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&path).unwrap().blksize(), kib << 10);
}

#[test]
fn a_region_on_2_mib_hugepages_carries_checked_data() {
    transfer_over_hugepages(2048, "4M", 2, "256M", "256 MiB");
}

#[test]
fn a_region_on_a_1_gib_hugepage_carries_checked_data() {
    transfer_over_hugepages(1 << 20, "1G", 1, "2G", "2 GiB");
}
