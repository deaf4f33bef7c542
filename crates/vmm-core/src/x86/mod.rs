//! x86-64 CPU state for direct 64-bit entry: GDT, page tables, registers.

pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod paging;
pub mod regs;
