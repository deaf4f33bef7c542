//! Booting the intervm probe guest.
//!
//! The probe's boot ABI (`intervm_protocol::probe`): the ELF is loaded at
//! its physical addresses, the CPU enters it in 64-bit mode at CPL0 with
//! identity paging (see [`crate::x86::paging`]) and a [`BootInfo`] page at
//! [`BOOT_INFO_GPA`].

use std::io::Cursor;

use intervm_protocol::probe::{BootInfo, State, BOOT_INFO_GPA};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::vm::Vm;
use crate::x86::{paging, regs};
use crate::{Error, Result};

fn info_bytes(info: &BootInfo) -> &[u8] {
    // SAFETY: BootInfo is repr(C), made only of integers and arrays of
    // integers without padding, so every byte is initialised.
    unsafe {
        std::slice::from_raw_parts(
            info as *const BootInfo as *const u8,
            std::mem::size_of::<BootInfo>(),
        )
    }
}

/// Loads `elf` (the probe image) into `vm` and points vCPU 0 at it, with
/// `info` in the boot-info page. `info.mem_size`/`vcpus`/`tsc_khz` are filled in.
pub fn load(vm: &Vm, elf: &[u8], info: &BootInfo) -> Result<()> {
    let mem = vm.memory();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    if ram < 4 << 20 {
        return Err(Error::Load("the probe needs at least 4 MiB of RAM".into()));
    }
    let loaded = Elf::load(mem, None, &mut Cursor::new(elf), None)
        .map_err(|e| Error::Load(format!("probe ELF: {e}")))?;
    regs::write_boot_gdt(mem)?;
    let cr3 = paging::write_identity_tables(mem)?;
    let mut info = *info;
    info.mem_size = ram;
    info.vcpus = vm.vcpus().len() as u32;
    let vcpu0 = vm
        .vcpus()
        .first()
        .ok_or_else(|| Error::Load("no vCPU".into()))?;
    info.tsc_khz = vcpu0.get_tsc_khz().unwrap_or(0) as u64;
    mem.write_slice(info_bytes(&info), GuestAddress(BOOT_INFO_GPA))
        .map_err(|e| Error::Load(format!("writing boot info: {e}")))?;
    regs::setup_long_mode(vcpu0, cr3, loaded.kernel_load.0, 0x8000, 0)
}

/// Loads the probe to run `tasks` one after the other
/// ([`Workload::Sequence`](intervm_protocol::probe::Workload::Sequence)).
/// One task is loaded as itself.
pub fn load_tasks(vm: &Vm, elf: &[u8], tasks: &[BootInfo]) -> Result<()> {
    use intervm_protocol::probe::{TaskEntry, Workload, MAX_TASKS, TASK_TABLE_GPA};
    match tasks {
        [] => Err(Error::Load("no probe task".into())),
        [one] => load(vm, elf, one),
        many if many.len() > MAX_TASKS => Err(Error::Load(format!(
            "{} probe tasks; at most {MAX_TASKS}",
            many.len()
        ))),
        many => {
            for (i, t) in many.iter().enumerate() {
                let e = TaskEntry::from_info(t);
                // SAFETY: TaskEntry is repr(C) and made of integers without
                // padding, so all its bytes are initialised.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        &e as *const TaskEntry as *const u8,
                        std::mem::size_of::<TaskEntry>(),
                    )
                };
                let at = TASK_TABLE_GPA + (i * bytes.len()) as u64;
                vm.memory()
                    .write_slice(bytes, GuestAddress(at))
                    .map_err(|e| Error::Load(format!("writing the task table: {e}")))?;
            }
            let mut info = BootInfo::new(Workload::Sequence, 0, 0);
            info.args[0] = many.len() as u64;
            load(vm, elf, &info)
        }
    }
}

/// The results of task `i` of a sequence, as a boot-info page (the task's
/// workload, arguments and results; the rest from the main page), with the
/// task's exit code (`u32::MAX` if it did not run).
pub fn read_task(mem: &crate::memory::GuestMemoryMmap, i: usize) -> Result<(u32, BootInfo)> {
    use intervm_protocol::probe::{TaskEntry, TASK_TABLE_GPA};
    let mut info = read_info(mem)?;
    let mut e = TaskEntry::from_info(&info);
    // SAFETY: any byte pattern is a valid TaskEntry (integers only).
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            &mut e as *mut TaskEntry as *mut u8,
            std::mem::size_of::<TaskEntry>(),
        )
    };
    let at = TASK_TABLE_GPA + (i * bytes.len()) as u64;
    mem.read_slice(bytes, GuestAddress(at))
        .map_err(|e| Error::Load(format!("reading task {i}: {e}")))?;
    info.workload = e.workload;
    info.args = e.args;
    info.results = e.results;
    Ok((e.exit, info))
}

/// Reads the boot-info page back (results written by the probe).
pub fn read_info(mem: &crate::memory::GuestMemoryMmap) -> Result<BootInfo> {
    let mut info = BootInfo::new(intervm_protocol::probe::Workload::Hello, 0, 0);
    // SAFETY: as in `info_bytes`; any byte pattern is a valid BootInfo.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            &mut info as *mut BootInfo as *mut u8,
            std::mem::size_of::<BootInfo>(),
        )
    };
    mem.read_slice(bytes, GuestAddress(BOOT_INFO_GPA))
        .map_err(|e| Error::Load(format!("reading boot info: {e}")))?;
    Ok(info)
}

/// Result slot `i` of the boot-info page as the probe left it so far (for a
/// host waiting for a value the probe updates as it runs).
pub fn result(mem: &crate::memory::GuestMemoryMmap, i: usize) -> Result<u64> {
    let at = BOOT_INFO_GPA + (BootInfo::RESULTS_OFFSET + 8 * i) as u64;
    if i >= intervm_protocol::probe::RESULT_SLOTS {
        return Err(Error::Load(format!("no result slot {i}")));
    }
    mem.read_obj::<u64>(GuestAddress(at))
        .map_err(|e| Error::Load(format!("reading result {i}: {e}")))
}

/// The first `rounds` entries of a receiving shared-memory probe's round
/// log (TSC cycles per round; see
/// [`ROUND_LOG_GPA`](intervm_protocol::probe::ROUND_LOG_GPA)), at most
/// [`ROUND_LOG_MAX`](intervm_protocol::probe::ROUND_LOG_MAX).
pub fn round_log(mem: &crate::memory::GuestMemoryMmap, rounds: u64) -> Result<Vec<u64>> {
    use intervm_protocol::probe::{ROUND_LOG_GPA, ROUND_LOG_MAX};
    (0..rounds.min(ROUND_LOG_MAX))
        .map(|r| {
            mem.read_obj::<u64>(GuestAddress(ROUND_LOG_GPA + 8 * r))
                .map_err(|e| Error::Load(format!("reading round {}: {e}", r + 1)))
        })
        .collect()
}

// The round log lies between the identity page tables and the probe image.
const _: () = assert!(
    crate::x86::paging::PAGE_TABLES_END <= intervm_protocol::probe::ROUND_LOG_GPA
        && intervm_protocol::probe::ROUND_LOG_GPA + 8 * intervm_protocol::probe::ROUND_LOG_MAX
            <= crate::x86::mptable::MPTABLE_GPA
);

/// Sets argument slot `i` of a running probe's boot-info page (for a task
/// that waits for the host, e.g. `shmem_args::RELEASE`).
pub fn set_arg(mem: &crate::memory::GuestMemoryMmap, i: usize, v: u64) -> Result<()> {
    let at = BOOT_INFO_GPA + (BootInfo::ARGS_OFFSET + 8 * i) as u64;
    if i >= intervm_protocol::probe::ARG_SLOTS {
        return Err(Error::Load(format!("no argument slot {i}")));
    }
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| Error::Load(format!("writing argument {i}: {e}")))
}

/// The probe's current [`State`] as a raw value.
pub fn state(mem: &crate::memory::GuestMemoryMmap) -> u32 {
    mem.read_obj::<u32>(GuestAddress(BOOT_INFO_GPA + BootInfo::STATE_OFFSET as u64))
        .unwrap_or(0)
}

/// Polls until the probe reaches `want` or `timeout` passes.
pub fn wait_state(
    mem: &crate::memory::GuestMemoryMmap,
    want: State,
    timeout: std::time::Duration,
) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if state(mem) >= want as u32 {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    false
}
