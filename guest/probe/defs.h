/*
 * Constants shared by the assembly (entry.S) and the C code of the probe.
 *
 * Only #defines live here so that the assembler can include it, too.
 */
#ifndef PROBE_DEFS_H
#define PROBE_DEFS_H

/* GDT selectors; the layout is fixed in entry.S. */
#define SEL_KCODE64 0x08
#define SEL_KDATA 0x10
#define SEL_KCODE32 0x18
#define SEL_UDATA 0x20 /* DPL3; use with RPL 3 */
#define SEL_UCODE64 0x28 /* DPL3; use with RPL 3 */
#define SEL_TSS 0x30 /* 16-byte descriptor: two GDT slots */

/* Interrupt vectors the probe installs besides the 32 exceptions. */
#define VEC_UART 0x30 /* COM1 through IOAPIC pin 4 */
#define VEC_GED 0x31 /* the Generic Event Device's GSI (vmgenid program) */
#define VEC_INT80 0x80 /* DPL3: counts its calls (irq program) */
#define VEC_SPIN0 0x81 /* DPL3: dec/jnz loop of %rdi iterations in CPL0 */
#define VEC_FAULT 0x82 /* DPL3: loads an empty IDT and faults: triple fault */
#define VEC_IFCTL 0x83 /* DPL3: %rdi != 0 sets IF of the caller, 0 clears it */
#define VEC_SPURIOUS 0xFF /* LAPIC spurious vector: no EOI */

/* Control register and MSR bits used on the way to long mode. */
#define CR0_PE 0x00000001
#define CR0_NW 0x20000000
#define CR0_CD 0x40000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xC0000080
#define EFER_LME 0x00000100

/* rflags for CPL3: IOPL=3 (in/out/cli/sti allowed), bit 1 always set. */
#define RFLAGS_USER 0x3002

/* Fixed addresses. */
#define AP_TRAMPOLINE_ADDR 0x8000 /* SIPI vector 0x08 */
#define AP_SIPI_VECTOR (AP_TRAMPOLINE_ADDR >> 12)
#define LAPIC_BASE 0xFEE00000
#define IOAPIC_BASE 0xFEC00000
#define BOOT_TIMER_ADDR 0xD0000000

/* Size of the table where started APs record their APIC ids. */
#define MAX_CPUS 64

#define KSTACK_SIZE 16384
#define USTACK_SIZE 65536

#endif
