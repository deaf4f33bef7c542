//! Booting Linux with the x86 64-bit boot protocol.
//!
//! [`load`] puts a kernel (`vmlinux` ELF or `bzImage`), an optional
//! initramfs and a command line into a [`Vm`], writes the zero page
//! (`boot_params` with the e820 map), an RNG seed as `setup_data`, and an MP
//! table so Linux finds the vCPUs and the IOAPIC without ACPI, and points
//! vCPU 0 at the kernel's 64-bit entry. The PCI bus of [`crate::pci`] needs
//! nothing more: Linux scans it through ports `0xcf8`/`0xcfc`, keeps the BARs
//! vmm-core assigned, and enables MSI-X itself.
//!
//! Guest-physical layout used during boot (all below 1 MiB except the
//! kernel and the initramfs):
//!
//! ```text
//! 0x1000   boot GDT              0x7000   zero page (boot_params)
//! 0x8ff0   initial stack         0x9000   setup_data: RNG seed
//! 0x20000  identity page tables  0x40000  command line
//! 0x9fc00 .. 0x100000 reserved (MP table at 0xf0000)
//! 0x1000000 kernel               top of low RAM: initramfs
//! ```
//!
//! On PVM (`kvm_pvm`) an unmodified kernel needs a few command-line
//! switches to avoid instructions PVM's emulator lacks; [`cmdline_for`] adds
//! them when the VM runs on PVM, and the vCPU loop turns the emulator's
//! failure on `int3` into the `#BP` the kernel expects (see [`crate::vcpu`]).

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, SETUP_RNG_SEED};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::host::KvmFlavor;
use crate::layout;
use crate::vm::Vm;
use crate::x86::{mptable, paging, regs};
use crate::{Error, Result};

/// Guest address of the zero page.
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Guest address of the RNG seed `setup_data` node.
pub const SETUP_DATA_GPA: u64 = 0x9000;
/// Guest address of the command line.
pub const CMDLINE_GPA: u64 = 0x40000;
/// Longest command line accepted (Linux's `COMMAND_LINE_SIZE` on x86).
pub const CMDLINE_MAX: usize = 2048;
/// Where the kernel may start (1 MiB); a `vmlinux` loads at its own
/// physical addresses (16 MiB for a default build).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the reserved legacy area (EBDA, VGA, BIOS) below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
// The MP table must sit in the part e820 reserves.
const _: () = assert!(mptable::MPTABLE_GPA >= EBDA_START && mptable::MPTABLE_END <= HIMEM_START);

/// Least RAM a Linux guest gets.
pub const MIN_RAM: u64 = 32 << 20;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGN: u32 = 0x100_0000;
const RNG_SEED_LEN: usize = 32;
/// Offset of the 64-bit entry point in a bzImage's protected-mode part.
const BZIMAGE_ENTRY64: u64 = 0x200;
/// Default highest initramfs address when the kernel gives none.
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// What a command line needs on every host: the console on COM1, no
/// reboot loop (a panic or reboot ends the VM at once), and no probing of
/// what vmm-core does not have.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 reboot=t nokaslr \
    8250.nr_uarts=1 i8042.noaux i8042.nokbd tsc=reliable no_timer_check";

/// What PVM's instruction emulator needs (README, "Linux guests"): no XSAVE, no
/// CPU features whose instructions it cannot emulate, and trust in the RNG
/// seed so the kernel does not spend a minute gathering entropy. Also
/// `rodata=off`: write-protecting the kernel's text and read-only data
/// rewrites page tables with emulated CPL0 code, which costs about 5 s of a
/// 22 s boot; on PVM a Linux guest is a test guest (its userspace runs
/// only with the system-call shim, and slowly), so the boot time matters
/// more than that hardening. And
/// `maxcpus=1`: starting a secondary vCPU (INIT/SIPI into real-mode code)
/// hangs the boot on PVM, so a Linux VM with several vCPUs uses one there.
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=smap,popcnt,rdrand,rdseed,fsgsbase,\
rdpid,movbe,bmi1,bmi2,avx,avx2,pku,umip,clflushopt,clwb random.trust_bootloader=on \
rodata=off maxcpus=1";

/// The full command line for a VM on `flavor`: [`BASE_CMDLINE`], then
/// [`PVM_CMDLINE`] on PVM, then `extra` (which wins where Linux takes the
/// last value of a repeated switch).
pub fn cmdline_for(flavor: KvmFlavor, extra: &str) -> String {
    let mut s = String::from(BASE_CMDLINE);
    if flavor == KvmFlavor::Pvm {
        s.push(' ');
        s.push_str(PVM_CMDLINE);
    }
    if !extra.trim().is_empty() {
        s.push(' ');
        s.push_str(extra.trim());
    }
    s
}

/// Which format a kernel image is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`: entered at its ELF entry point. The
    /// right choice on PVM, where decompressing at CPL0 is emulated (a
    /// 1.1 MB bzImage of the same kernel had not finished after 300 s).
    Elf,
    /// A `bzImage`: its compressed kernel is entered at offset 0x200 and
    /// decompresses itself.
    BzImage,
}

impl KernelFormat {
    /// Guesses the format from the first bytes of the image.
    pub fn detect(image: &[u8]) -> Option<Self> {
        if image.starts_with(b"\x7fELF") {
            Some(Self::Elf)
        } else if image.len() > 0x206 && &image[0x202..0x206] == b"HdrS" {
            Some(Self::BzImage)
        } else {
            None
        }
    }
}

/// Where things went in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedLinux {
    /// The image's format.
    pub format: KernelFormat,
    /// 64-bit entry point vCPU 0 starts at.
    pub entry: u64,
    /// First byte after the kernel.
    pub kernel_end: u64,
    /// The initramfs `(address, length)`, if any.
    pub initrd: Option<(u64, u64)>,
}

/// Loads `image` with loader `L` at its own addresses (at least 1 MiB).
fn load_image<L: KernelLoader>(
    mem: &crate::memory::GuestMemoryMmap,
    image: &[u8],
    what: &str,
) -> Result<KernelLoaderResult> {
    L::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| Error::Load(format!("{what}: {e}")))
}

/// The e820 map for RAM of `mem_size` bytes.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, kind| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in layout::ram_ranges(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

fn random_seed() -> Result<[u8; RNG_SEED_LEN]> {
    let mut seed = [0u8; RNG_SEED_LEN];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        return Err(Error::io("reading an RNG seed for the guest")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(seed)
}

/// Loads `kernel` (+ `initrd`) with `cmdline` into `vm` and sets vCPU 0 up
/// for the 64-bit entry. `cmdline` is used as given; build it with
/// [`cmdline_for`] to get the console and the PVM switches.
pub fn load(vm: &Vm, kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str) -> Result<LoadedLinux> {
    let mem = vm.memory();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    if ram < MIN_RAM {
        return Err(Error::Load(format!(
            "Linux needs at least {} MiB of RAM, the VM has {} MiB",
            MIN_RAM >> 20,
            ram >> 20
        )));
    }
    let format = KernelFormat::detect(kernel)
        .ok_or_else(|| Error::Load("the kernel is neither an ELF vmlinux nor a bzImage".into()))?;
    let mut params = boot_params::default();
    // Both loaders place the image above 1 MiB and report where it went;
    // a bzImage also brings its setup header for the zero page.
    let loaded = match format {
        KernelFormat::Elf => load_image::<Elf>(mem, kernel, "vmlinux")?,
        KernelFormat::BzImage => load_image::<BzImage>(mem, kernel, "bzImage")?,
    };
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load.0,
        KernelFormat::BzImage => loaded.kernel_load.0 + BZIMAGE_ENTRY64,
    };
    let kernel_end = loaded.kernel_end;

    // Command line.
    if cmdline.len() >= CMDLINE_MAX {
        return Err(Error::Load(format!(
            "command line is {} bytes, at most {} fit",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut cl =
        Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Load(format!("command line: {e}")))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Load(format!("command line {cmdline:?}: {e}")))?;
    load_cmdline(mem, GuestAddress(CMDLINE_GPA), &cl)
        .map_err(|e| Error::Load(format!("writing the command line: {e}")))?;

    // Initramfs: as high in low RAM as the kernel allows, page aligned.
    let low_end = ram.min(layout::LOW_RAM_MAX);
    let initrd_at = match initrd {
        None => None,
        Some(img) => {
            let max = match params.hdr.initrd_addr_max {
                0 => INITRD_ADDR_MAX,
                m => m as u64,
            };
            let top = low_end.min(max + 1);
            let len = img.len() as u64;
            let addr = top.checked_sub(len).map(|a| a & !0xfff);
            match addr {
                Some(a) if a >= kernel_end.next_multiple_of(0x1000) => {
                    mem.write_slice(img, GuestAddress(a))
                        .map_err(|e| Error::Load(format!("writing the initramfs: {e}")))?;
                    Some((a, len))
                }
                _ => {
                    return Err(Error::Load(format!(
                        "the initramfs ({} KiB) does not fit between the kernel end \
                         ({kernel_end:#x}) and {top:#x}; give the VM more RAM",
                        len >> 10
                    )))
                }
            }
        }
    };

    // RNG seed: setup_data { next, type, len, data[] }.
    let seed = random_seed()?;
    let mut node = Vec::with_capacity(16 + RNG_SEED_LEN);
    node.extend_from_slice(&0u64.to_le_bytes());
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes());
    node.extend_from_slice(&seed);
    mem.write_slice(&node, GuestAddress(SETUP_DATA_GPA))
        .map_err(|e| Error::Load(format!("writing setup_data: {e}")))?;

    // The zero page.
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGN;
    }
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.setup_data = SETUP_DATA_GPA;
    if let Some((addr, len)) = initrd_at {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    let map = e820_map(ram);
    if map.len() > params.e820_table.len() {
        return Err(Error::Load("e820 map too long".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_GPA)),
        mem,
    )
    .map_err(|e| Error::Load(format!("writing the zero page: {e}")))?;

    if vm.flavor() == KvmFlavor::Pvm && vm.vcpus().len() > 1 && cmdline.contains("maxcpus=1") {
        log::warn!(
            "{}: Linux uses 1 of its {} vCPUs on PVM (secondary CPU start-up hangs there)",
            vm.name(),
            vm.vcpus().len()
        );
    }
    let intx = match vm.flavor() {
        KvmFlavor::Pvm => mptable::PciIntx::Edge,
        _ => mptable::PciIntx::Level,
    };
    mptable::write(mem, vm.vcpus().len() as u8, intx)?;
    regs::write_boot_gdt(mem)?;
    let cr3 = paging::write_identity_tables(mem)?;
    let vcpu0 = vm
        .vcpus()
        .first()
        .ok_or_else(|| Error::Load("no vCPU".into()))?;
    regs::setup_long_mode(vcpu0, cr3, entry, BOOT_STACK, ZERO_PAGE_GPA)?;
    log::debug!(
        "{}: Linux {format:?} entry {entry:#x}, kernel end {kernel_end:#x}, initrd {initrd_at:x?}",
        vm.name()
    );
    Ok(LoadedLinux {
        format,
        entry,
        kernel_end,
        initrd: initrd_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_legacy_area_and_splits_around_the_pci_hole() {
        let m = e820_map(256 << 20);
        let v: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            v,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let big = e820_map(4 << 30);
        let last = big.last().unwrap();
        assert_eq!(
            (last.addr, last.size),
            (layout::HIGH_RAM_START, (4 << 30) - layout::LOW_RAM_MAX)
        );
    }

    #[test]
    fn detects_formats_and_refuses_others() {
        assert_eq!(
            KernelFormat::detect(b"\x7fELF\x02\x01"),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(KernelFormat::detect(&bz), Some(KernelFormat::BzImage));
        assert_eq!(KernelFormat::detect(b"#!/bin/sh"), None);
    }

    #[test]
    fn pvm_switches_only_on_pvm_and_extra_goes_last() {
        let vmx = cmdline_for(KvmFlavor::Hardware, "rdinit=/init quiet");
        assert!(!vmx.contains("noxsave"));
        assert!(vmx.ends_with("rdinit=/init quiet"));
        let pvm = cmdline_for(KvmFlavor::Pvm, "");
        assert!(pvm.contains("noxsave") && pvm.contains("random.trust_bootloader=on"));
        assert!(pvm.starts_with(BASE_CMDLINE));
    }
}
