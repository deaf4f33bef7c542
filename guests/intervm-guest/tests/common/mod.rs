//! What the tests that map a region file share.

use std::path::PathBuf;

use intervm_guest::shmem::{self, Source};
use intervm_protocol::ring::Geometry;

/// A 1 MiB region file in /dev/shm, formatted by the tool for `members`
/// members: its source, path and layout. The caller removes the file.
pub fn region(tag: &str, members: u32) -> (Source, PathBuf, Geometry) {
    let path = PathBuf::from(format!(
        "/dev/shm/intervm-guest-{tag}-{}",
        std::process::id()
    ));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let source = Source {
        device: None,
        resource: Some(path.clone()),
        sysfs: PathBuf::from("/nonexistent"),
        uio: None,
    };
    let geo = shmem::format(&source, members, false).unwrap();
    (source, path, geo)
}
