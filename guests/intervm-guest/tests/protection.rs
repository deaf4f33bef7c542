//! `shmem check-protection` on a region file, which nothing protects (as
//! under QEMU): every probed write lands and is undone, so the check can
//! tell an unprotected region from one an intervm VMM maps. The protected
//! case needs a VMM: the Linux guest test runs it there.

mod common;

use intervm_guest::shmem::{self, Protection};

#[test]
fn on_an_unprotected_file_every_write_lands_and_is_undone() {
    let (source, path, geo) = common::region("protection", 3);
    let before = std::fs::read(&path).unwrap();
    let found = shmem::check_protection(&source, 1).unwrap();
    let after = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    // The header page and the sections of members 0 and 2.
    let pages = 1 + 2 * geo.section_bytes() / 4096;
    assert_eq!(
        found,
        Protection {
            probed: pages,
            landed: pages,
            own_writable: true,
        }
    );
    assert!(before == after, "a landed write was not undone");
}
