//! What kind of KVM this host provides.
//!
//! On the project's machines `/dev/kvm` is PVM (`kvm_pvm`): software
//! virtualization where guest CPL3 runs natively but guest CPL0 is emulated.
//! Everything in intervm must also work on ordinary VMX/SVM KVM, so callers
//! ask here at run time instead of assuming either.

use std::path::Path;

/// The flavour of KVM behind `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// PVM (`kvm_pvm`): guest CPL0 is emulated instruction by instruction.
    Pvm,
    /// Hardware-assisted KVM (Intel VMX or AMD SVM).
    Hardware,
    /// Some other provider (neither marker found).
    Unknown,
}

impl KvmFlavor {
    /// Detects the flavour from sysfs and `/proc/cpuinfo`.
    pub fn detect() -> Self {
        Self::detect_from(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    /// Detection against other roots (for tests).
    pub fn detect_from(sys_module: &Path, cpuinfo: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            return KvmFlavor::Pvm;
        }
        if sys_module.join("kvm_intel").exists() || sys_module.join("kvm_amd").exists() {
            return KvmFlavor::Hardware;
        }
        match std::fs::read_to_string(cpuinfo) {
            Ok(s)
                if s.lines().any(|l| {
                    l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm"))
                }) =>
            {
                KvmFlavor::Hardware
            }
            _ => KvmFlavor::Unknown,
        }
    }

    /// True when guest CPL0 code is emulated (slow) on this host.
    pub fn cpl0_is_emulated(self) -> bool {
        self == KvmFlavor::Pvm
    }
}

/// Why KVM cannot be used here, or `None` when `/dev/kvm` opens.
pub fn kvm_unavailable_reason() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_flavor_from_fake_roots() {
        let dir = std::env::temp_dir().join(format!("intervm-host-{}", std::process::id()));
        let sys = dir.join("module");
        std::fs::create_dir_all(&sys).unwrap();
        let cpu = dir.join("cpuinfo");
        std::fs::write(&cpu, "flags\t: fpu sse2\n").unwrap();
        assert_eq!(KvmFlavor::detect_from(&sys, &cpu), KvmFlavor::Unknown);
        std::fs::write(&cpu, "flags\t: fpu vmx sse2\n").unwrap();
        assert_eq!(KvmFlavor::detect_from(&sys, &cpu), KvmFlavor::Hardware);
        std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavor::detect_from(&sys, &cpu), KvmFlavor::Pvm);
        assert!(KvmFlavor::Pvm.cpl0_is_emulated());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
