//! vmm-core: a small VMM on rust-vmm crates, the base of intervm.
//!
//! It creates KVM VMs with guest RAM (`vm-memory`), one thread per vCPU,
//! an in-kernel irqchip and PIT, a `vm-device` [`IoManager`](vm_device::device_manager::IoManager)
//! for port and MMIO devices, a COM1 console (`vm-superio`), a debug/exit
//! port, and a PCI bus with BAR placement, memory BARs mapped straight into
//! the guest, MSI-X over irqfds and INTx on IOAPIC pins. Channel devices plug
//! into it through [`pci::PciDevice`] and the `vm-device` traits.
//!
//! It runs on hardware KVM (VMX/SVM) and on PVM (`kvm_pvm`); see [`host`].
//!
//! ```no_run
//! use vmm_core::{Vm, VmConfig, boot::probe};
//! use intervm_protocol::probe::{BootInfo, Workload};
//! # fn main() -> vmm_core::Result<()> {
//! # let probe_elf: &[u8] = &[];
//! let vm = Vm::new(&VmConfig::new("a", 16 << 20))?;
//! probe::load(&vm, probe_elf, &BootInfo::new(Workload::Hello, 0, 0))?;
//! let exit = vm.start()?.join();
//! println!("guest exited: {exit:?}");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod boot;
pub mod devices;
mod error;
pub mod events;
pub mod host;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod pci;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use error::{Error, Result};
/// Surviving a shared file shrunk under a mapping (the `shrink-guard`
/// crate; the vCPU loop calls its `recover` on `EFAULT`).
pub use shrink_guard;
pub use vcpu::VmExit;
pub use vm::{RunningVm, Vm, VmConfig};
