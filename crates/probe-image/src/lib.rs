//! The intervm probe guest, embedded.
//!
//! `build.rs` compiles `guests/probe` from source (a `no_std` Rust program
//! with a small CPL0 assembly part) into a freestanding ELF that loads at
//! 1 MiB. This crate exposes its bytes so that a VMM can boot it without any
//! file on disk: `vmm_core::boot::probe` loads it with `linux-loader`.
//!
//! [`shmem`] builds the arguments of the probe's shared-memory workloads and
//! decodes their results, so tests, benchmarks and the launcher drive the
//! probe the same way.
#![deny(missing_docs)]

pub mod portio;
pub mod shmem;

/// The probe guest ELF image.
pub static PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/intervm-probe.elf"));

#[cfg(test)]
mod tests {
    use super::PROBE_ELF;

    #[test]
    fn is_a_static_x86_64_elf_loaded_at_one_mib() {
        assert_eq!(&PROBE_ELF[..4], b"\x7fELF");
        assert_eq!(PROBE_ELF[4], 2, "ELFCLASS64");
        assert_eq!(
            u16::from_le_bytes([PROBE_ELF[18], PROBE_ELF[19]]),
            62,
            "EM_X86_64"
        );
        let entry = u64::from_le_bytes(PROBE_ELF[24..32].try_into().unwrap());
        assert_eq!(entry, 0x10_0000);
    }
}
