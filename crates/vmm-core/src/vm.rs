//! A VM: KVM objects, guest RAM, the I/O bus, platform devices, vCPU threads.

use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::debug::DebugDevice;
use crate::devices::serial::{SerialDevice, SerialOutput};
use crate::events::EventLoop;
use crate::host::KvmFlavor;
use crate::irq::GsiRouter;
use crate::layout;
use crate::memory::{self, GuestMemoryMmap, MemorySlots, RamBacking};
use crate::pci::{KvmPciPlatform, PciBus, PciConfigIo, PciDevice, PciWindowRouter, SlotInfo};
use crate::vcpu::{self, VmControl, VmExit};
use crate::x86::cpuid;
use crate::{Error, Result};

/// Debug port base (see [`crate::devices::debug`]).
pub const DEBUG_PORT: u16 = 0x500;
/// PCI configuration mechanism #1 ports.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;

/// What a VM is made of.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name, used in logs and console prefixes.
    pub name: String,
    /// RAM in bytes (a multiple of 4 KiB).
    pub mem_size: u64,
    /// Number of vCPUs (1..=255).
    pub vcpus: u8,
    /// Where RAM comes from.
    pub ram_backing: RamBacking,
    /// Where COM1 output goes.
    pub serial: SerialOutput,
}

impl VmConfig {
    /// A config with 1 vCPU, anonymous RAM and stdout console.
    pub fn new(name: impl Into<String>, mem_size: u64) -> Self {
        Self {
            name: name.into(),
            mem_size,
            vcpus: 1,
            ram_backing: RamBacking::Anonymous,
            serial: SerialOutput::Stdout,
        }
    }
}

/// A created, not yet running VM. Add devices, load a guest, then [`Vm::start`].
pub struct Vm {
    name: String,
    kvm: Kvm,
    fd: Arc<VmFd>,
    flavor: KvmFlavor,
    memory: GuestMemoryMmap,
    io: Arc<RwLock<IoManager>>,
    pci: Arc<PciBus>,
    gsi: Arc<Mutex<GsiRouter>>,
    slots: MemorySlots,
    vcpus: Vec<VcpuFd>,
    cpuid: CpuId,
    control: Arc<VmControl>,
    serial: Arc<Mutex<SerialDevice>>,
    /// Last: dropping it stops the loop after the rest of the VM is gone.
    events: EventLoop,
}

impl Vm {
    /// Creates the VM: RAM, irqchip + PIT, vCPUs, COM1, debug port, PCI bus.
    pub fn new(cfg: &VmConfig) -> Result<Self> {
        if cfg.vcpus == 0 {
            return Err(Error::InvalidArgument(
                "a VM needs at least one vCPU".into(),
            ));
        }
        vcpu::install_kick_handler()?;
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::IrqRouting, "IRQ_ROUTING"),
            (Cap::UserMemory, "USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        let flavor = KvmFlavor::detect();
        let fd = Arc::new(kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?);
        // Only needed on VMX, harmless elsewhere: a 3-page TSS region below the IOAPIC.
        if let Err(e) = fd.set_tss_address(0xfffb_d000) {
            log::debug!("KVM_SET_TSS_ADDR: {e} (ignored)");
        }
        fd.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;

        let memory = memory::create_ram(cfg.mem_size, cfg.ram_backing)?;
        let slots = memory::register_ram(&fd, &memory)?;
        let gsi = Arc::new(Mutex::new(GsiRouter::new(fd.clone())));
        gsi.lock()
            .map_err(|_| Error::Device("GSI router lock".into()))?
            .install_defaults()?;

        let cpuid = cpuid::supported(&kvm)?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let v = fd
                .create_vcpu(id as u64)
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            cpuid::configure(&v, &cpuid, id, cfg.vcpus)?;
            vcpus.push(v);
        }

        let control = Arc::new(VmControl::default());
        let io = Arc::new(RwLock::new(IoManager::new()));

        let serial_evt =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::io("serial eventfd"))?;
        fd.register_irqfd(&serial_evt, layout::COM1_GSI)
            .map_err(Error::kvm("KVM_IRQFD (serial)"))?;
        let out = cfg.serial.open(&cfg.name).map_err(Error::io(format!(
            "opening console output {:?}",
            cfg.serial
        )))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_evt, out)));

        let platform = KvmPciPlatform::new(fd.clone(), slots.clone());
        let pci = Arc::new(PciBus::new(Box::new(platform)));

        let vm = Self {
            name: cfg.name.clone(),
            kvm,
            fd,
            flavor,
            memory,
            io,
            pci,
            gsi,
            slots,
            vcpus,
            cpuid,
            control,
            serial,
            events: EventLoop::start(&cfg.name)?,
        };
        vm.add_pio_device(layout::COM1_BASE, 8, vm.serial.clone())?;
        vm.add_pio_device(
            DEBUG_PORT,
            8,
            Arc::new(Mutex::new(DebugDevice::new(vm.control.clone()))),
        )?;
        vm.add_pio_device(PCI_CONFIG_PORT, 8, Arc::new(PciConfigIo(vm.pci.clone())))?;
        let router = Arc::new(PciWindowRouter(vm.pci.clone()));
        vm.add_pio_device(layout::PCI_IO_BASE, layout::PCI_IO_SIZE, router.clone())?;
        vm.add_mmio_device(
            layout::PCI_MMIO32_BASE,
            layout::PCI_MMIO32_SIZE,
            router.clone(),
        )?;
        vm.add_mmio_device(layout::PCI_MMIO64_BASE, layout::PCI_MMIO64_SIZE, router)?;
        log::debug!(
            "{}: created ({} MiB, {} vCPUs, {:?} KVM)",
            cfg.name,
            cfg.mem_size >> 20,
            cfg.vcpus,
            flavor
        );
        Ok(vm)
    }

    /// Registers a PIO device on `[base, base + len)`.
    pub fn add_pio_device(
        &self,
        base: u16,
        len: u16,
        dev: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<()> {
        let range = PioRange::new(PioAddress(base), len)
            .map_err(|e| Error::Device(format!("port range {base:#x}+{len}: {e:?}")))?;
        self.io
            .write()
            .map_err(|_| Error::Device("I/O manager lock".into()))?
            .register_pio(range, dev)
            .map_err(|e| {
                Error::Device(format!(
                    "ports {base:#x}..{:#x}: {e}",
                    base as u32 + len as u32
                ))
            })
    }

    /// Registers an MMIO device on `[base, base + len)`.
    pub fn add_mmio_device(
        &self,
        base: u64,
        len: u64,
        dev: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<()> {
        let range = MmioRange::new(MmioAddress(base), len)
            .map_err(|e| Error::Device(format!("MMIO range {base:#x}+{len}: {e:?}")))?;
        self.io
            .write()
            .map_err(|_| Error::Device("I/O manager lock".into()))?
            .register_mmio(range, dev)
            .map_err(|e| Error::Device(format!("MMIO {base:#x}+{len:#x}: {e}")))
    }

    /// Puts a device on the PCI bus.
    pub fn add_pci_device(&self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<SlotInfo> {
        self.pci.add_device(dev)
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    /// The KVM VM file descriptor (for ioeventfds, irqfds, MSI).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }
    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
    /// What kind of KVM runs this VM.
    pub fn flavor(&self) -> KvmFlavor {
        self.flavor
    }
    /// The VM's event loop, where its devices' event sources are served.
    pub fn events(&self) -> &EventLoop {
        &self.events
    }
    /// The GSI routing table (for MSI vectors of devices).
    pub fn gsi_router(&self) -> &Arc<Mutex<GsiRouter>> {
        &self.gsi
    }
    /// KVM slots for extra memory mappings.
    pub fn memory_slots(&self) -> &MemorySlots {
        &self.slots
    }
    /// The PCI bus.
    pub fn pci(&self) -> &Arc<PciBus> {
        &self.pci
    }
    /// The VM's run state (stop requests, exit reason, exit counters).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }
    /// The vCPUs, to set registers before [`Vm::start`].
    pub fn vcpus(&self) -> &[VcpuFd] {
        &self.vcpus
    }
    /// KVM's supported CPUID as used for the vCPUs.
    pub fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }
    /// The COM1 device (for console input).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// Starts one thread per vCPU.
    pub fn start(mut self) -> Result<RunningVm> {
        let mut threads = Vec::new();
        for (id, v) in self.vcpus.drain(..).enumerate() {
            let io = self.io.clone();
            let ctl = self.control.clone();
            let mem = self.memory.clone();
            let t = std::thread::Builder::new()
                .name(format!("{}-vcpu{id}", self.name))
                .spawn(move || vcpu::run_loop(v, id as u8, io, ctl, mem))
                .map_err(Error::io("spawning a vCPU thread"))?;
            threads.push(t);
        }
        Ok(RunningVm { vm: self, threads })
    }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    vm: Vm,
    threads: Vec<JoinHandle<()>>,
}

impl RunningVm {
    /// The VM (memory, devices, control).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Asks the VM to stop (as if the host pressed the power button).
    pub fn stop(&self) {
        self.vm.control.request_stop(VmExit::Stopped);
    }

    /// Waits for the VM to stop by itself, at most `timeout`; `None` if it
    /// is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.vm.control.wait(Some(timeout))
    }

    /// Waits until the VM stops and all vCPU threads have ended.
    pub fn join(mut self) -> VmExit {
        let exit = self.vm.control.wait(None).unwrap_or(VmExit::Stopped);
        self.join_threads();
        exit
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            while !t.is_finished() {
                self.vm.control.kick_all();
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = t.join();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.vm.control.request_stop(VmExit::Stopped);
            self.join_threads();
        }
    }
}
