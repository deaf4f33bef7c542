//! The CPL0 part of the probe, in assembly only.
//!
//! On PVM every CPL0 instruction is emulated (~0.75 µs each), so this file
//! does the minimum at CPL0: load a GDT with user segments and a TSS, build
//! the IDT, software-enable the LAPIC, and `iretq` to [`crate::probe_main`]
//! at CPL3 with IF=1 and IOPL=3. PVM forces IOPL to 0; there `in`/`out` at
//! CPL3 reach the VMM only if the TSS I/O permission bitmap allows the port,
//! so the TSS carries a bitmap that allows all of them.
//!
//! Interrupt and exception entry:
//! - vectors >= 32: count in `PROBE_IRQ_COUNTS[vector]` and in
//!   `PROBE_IRQ_COUNTS[0]` (all of them), EOI, return;
//! - the INTx vector: counted but not EOId; CPL3 acks the device and then
//!   EOIs with service 2, so a level-triggered line cannot storm;
//! - #UD (6): a *service call* from CPL3 (`ud2`, service number in rax,
//!   arguments in rdi/rsi), see [`crate::arch`];
//! - any other exception: record vector, error code and RIP in the boot-info
//!   results and exit through the debug port with `EXIT_EXCEPTION_BASE + vector`.

use core::sync::atomic::AtomicU64;
use intervm_protocol::probe::{
    results, BootInfo, BOOT_INFO_GPA, DEBUG_EXIT_OFFSET, DEBUG_PORT_BASE, EXIT_EXCEPTION_BASE,
    INTX_VECTOR, SPURIOUS_VECTOR,
};

/// Interrupts seen per IDT vector, incremented by the CPL0 handler. Slot 0
/// (vector 0 is an exception, never counted itself) counts every interrupt,
/// for a probe that sleeps until any of several vectors fires.
#[no_mangle]
pub static PROBE_IRQ_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

const FAULT_SLOT: u64 =
    BOOT_INFO_GPA + BootInfo::RESULTS_OFFSET as u64 + 8 * results::FAULT_VECTOR as u64;

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cli
    lea rsp, [rip + probe_kstack_top]
    lgdt [rip + probe_gdt_ptr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rax, [rip + 1f]
    push 0x08
    push rax
    retfq
1:
    /* 64-bit TSS descriptor in GDT slots 5 and 6 */
    lea rax, [rip + probe_tss]
    mov rdx, rax
    shl rdx, 16
    mov rcx, 0xFFFFFF0000
    and rdx, rcx
    mov rcx, rax
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rdx, rcx
    mov rcx, 0x0000890000002068
    or rdx, rcx
    mov [rip + probe_gdt + 40], rdx
    shr rax, 32
    mov [rip + probe_gdt + 48], rax
    lea rax, [rip + probe_kstack_top]
    mov [rip + probe_tss + 4], rax
    mov word ptr [rip + probe_tss + 102], 104
    mov byte ptr [rip + probe_tss + 104 + 8192], 0xff
    mov ax, 0x28
    ltr ax

    /* IDT: 256 interrupt gates, stubs are 16 bytes apart */
    lea rdi, [rip + probe_idt]
    lea rax, [rip + probe_isr_stubs]
    mov ecx, 256
2:
    mov [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8E00
    mov rdx, rax
    shr rdx, 16
    mov [rdi + 6], dx
    shr rdx, 16
    mov [rdi + 8], edx
    mov dword ptr [rdi + 12], 0
    add rax, 16
    add rdi, 16
    dec ecx
    jnz 2b
    lidt [rip + probe_idt_ptr]

    /* LAPIC: TPR = 0, SVR = software enable | spurious vector */
    mov rax, 0xFEE00080
    mov dword ptr [rax], 0
    mov rax, 0xFEE000F0
    mov dword ptr [rax], 0x100 + {spurious}

    /* iretq to CPL3: SS, RSP, RFLAGS (IF | IOPL=3 | bit 1), CS, RIP */
    push 0x1b
    lea rax, [rip + probe_ustack_top]
    sub rax, 8
    push rax
    push 0x3202
    push 0x23
    lea rax, [rip + probe_main]
    push rax
    iretq

    .p2align 4
probe_isr_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    nop
    nop
    .else
    push 0
    .endif
    push vec
    jmp probe_isr_common
    .set vec, vec + 1
    .endr

probe_isr_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    /* [rsp+32]=rdi [rsp+40]=rsi [rsp+64]=rax [rsp+72]=vector [rsp+80]=error [rsp+88]=rip */
    mov rax, [rsp + 72]
    cmp rax, 32
    jae 3f
    cmp rax, 6
    je 4f
    /* fatal exception: record and power off */
    mov rcx, {fault_slot}
    mov [rcx], rax
    mov rdx, [rsp + 80]
    mov [rcx + 8], rdx
    mov rdx, [rsp + 88]
    mov [rcx + 16], rdx
    add eax, {exc_base}
    mov dx, {exit_port}
    out dx, eax
8:
    cli
    hlt
    jmp 8b
3:  /* device interrupt */
    lea rcx, [rip + PROBE_IRQ_COUNTS]
    lock inc qword ptr [rcx + rax * 8]
    lock inc qword ptr [rcx]
    cmp rax, {spurious}
    je 9f
    /* INTx is level triggered: CPL3 acks the device, then EOIs (service 2) */
    cmp rax, {intx}
    je 9f
    mov rcx, 0xFEE000B0
    mov dword ptr [rcx], 0
    jmp 9f
4:  /* service call: ud2 with the service number in rax */
    add qword ptr [rsp + 88], 2
    mov rax, [rsp + 64]
    cmp rax, 0
    jne 5f
    /* 0: wait for an interrupt unless *rdi != rsi already */
    mov rcx, [rsp + 32]
    mov rdx, [rcx]
    cmp rdx, [rsp + 40]
    jne 9f
    sti
    hlt
    cli
    jmp 9f
5:
    cmp rax, 2
    jne 10f
    /* 2: LAPIC EOI (deferred EOI of the INTx vector) */
    mov rcx, 0xFEE000B0
    mov dword ptr [rcx], 0
    jmp 9f
10:
    cmp rax, 3
    jne 11f
    /* 3: triple fault: empty IDT, then #UD -> #DF -> shutdown */
    lidt [rip + probe_null_idt_ptr]
    ud2
11:
    cmp rax, 1
    jne 9f
    /* 1: rdi iterations of `out dx, eax` to port rsi, at CPL0 */
    mov rcx, [rsp + 32]
    mov rdx, [rsp + 40]
    test rcx, rcx
    jz 9f
    xor eax, eax
6:
    out dx, eax
    dec rcx
    jnz 6b
9:
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

    .section .data
    .p2align 4
probe_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CFF2000000FFFF
    .quad 0x00AFFA000000FFFF
    .quad 0
    .quad 0
probe_gdt_ptr:
    .word 7 * 8 - 1
    .quad probe_gdt
    .p2align 4
probe_idt_ptr:
    .word 4095
    .quad probe_idt
probe_null_idt_ptr:
    .word 0
    .quad 0

    .section .bss
    .p2align 12
probe_idt:
    .zero 4096
probe_tss:
    /* 104-byte TSS, then an all-zero I/O permission bitmap (every port
       allowed) and its 0xff terminator. KVM's emulator consults the bitmap
       for `in`/`out` at CPL3 because PVM forces IOPL to 0. */
    .zero 104 + 8192 + 8
    .p2align 4
probe_kstack:
    .zero 16384
probe_kstack_top:
    .p2align 4
probe_ustack:
    .zero 131072
probe_ustack_top:
"#,
    spurious = const SPURIOUS_VECTOR as u32,
    intx = const INTX_VECTOR as u32,
    fault_slot = const FAULT_SLOT,
    exc_base = const EXIT_EXCEPTION_BASE,
    exit_port = const DEBUG_PORT_BASE + DEBUG_EXIT_OFFSET,
);
