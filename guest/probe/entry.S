/*
 * entry.S - everything that runs in CPL0: PVH entry, long mode switch, the
 * static CPU tables (page tables, GDT, TSS, IDT), the interrupt handlers and
 * the AP trampoline.
 *
 * Why so much is static data: on the PVM host every CPL0 instruction is
 * emulated (~1 us each), so the boot path must not loop. The page tables, the
 * IDT and the TSS descriptor are therefore assembled into .data; the few
 * address bit fields the assembler cannot split (handler and TSS addresses)
 * are computed by the linker script (probe.ld) and patched in as relocations.
 * The boot path is about 30 instructions; then the probe drops to CPL3 with
 * IOPL=3 (and an allow-all I/O bitmap in the TSS, for PVM) and the C code
 * (main.c) runs natively.
 */
#include "defs.h"

	.file "entry.S"		/* else the symbol table names a random temp file */

/* ------------------------------------------------------------------------
 * PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (type 18), owner "Xen".
 */
	.section .note.Xen, "a"
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 4			/* descsz: 32-bit entry address */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_start32

/*
 * From 32-bit protected mode to long mode with the static page tables:
 * PAE, CR3, EFER.LME, then paging (caches on); far jump to \target.
 * Shared by the BSP (PVH entry) and the APs (after the trampoline).
 */
.macro ENTER_LONG_MODE target
	movl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	andl $~(CR0_CD | CR0_NW), %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $SEL_KCODE64, $\target
.endm

/* ------------------------------------------------------------------------
 * BSP entry. PVH state: 32-bit flat protected mode, paging off,
 * %ebx = guest-physical address of struct hvm_start_info, no stack.
 */
	.section .text.entry, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	movl %ebx, pvh_start_info
	lgdt gdt_ptr
	ENTER_LONG_MODE bsp_long

	.code64
bsp_long:
	movb $0xFF, %al		/* mask both 8259s: PVM runs CPL3 with IF=1 */
	outb %al, $0x21
	outb %al, $0xA1
	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq $kstack_top, %rsp
	lidt idt_ptr(%rip)
	movw $SEL_TSS, %ax
	ltr %ax
	/* iretq to probe_main in CPL3, IOPL=3, IF=0 (PVM forces IF=1 in CPL3). */
	pushq $(SEL_UDATA | 3)
	pushq $(ustack_top - 8)	/* as if probe_main had been called */
	pushq $RFLAGS_USER
	pushq $(SEL_UCODE64 | 3)
	pushq $probe_main
	iretq

/* ------------------------------------------------------------------------
 * Interrupt entry stubs: one 16-byte slot per installed vector, so that the
 * static IDT can compute each handler address as isr_stubs + 16 * slot.
 * Slots 0-31: exceptions; 32-37: the vectors listed in defs.h.
 */
	.section .text.isr, "ax"
	.balign 4096
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 32
	.balign 16
	.if vec == 6
	jmp ud_handler		/* #UD: may be a software interrupt, see there */
	.elseif (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	/* the CPU pushed an error code */
	pushq $vec
	jmp exc_common
	.else
	pushq $0
	pushq $vec
	jmp exc_common
	.endif
	.set vec, vec + 1
	.endr
	.balign 16
	jmp irq_uart		/* slot 32: VEC_UART */
	.balign 16
	jmp int80_handler	/* slot 33: VEC_INT80 */
	.balign 16
	jmp spin0_handler	/* slot 34: VEC_SPIN0 */
	.balign 16
	jmp fault_handler	/* slot 35: VEC_FAULT */
	.balign 16
	jmp ifctl_handler	/* slot 36: VEC_IFCTL */
	.balign 16
	iretq			/* slot 37: VEC_SPURIOUS, no EOI */
	.balign 16
	jmp irq_ged		/* slot 38: VEC_GED */
	.balign 16
	.globl isr_stubs_end
isr_stubs_end:

	.text
/* Exceptions: report and end the run (never returns). Stack: vector, error
 * code, then the CPU's frame (rip, cs, rflags, rsp, ss). probe_exception
 * runs in CPL0: slow here, but only on the way to a failure. */
exc_common:
	cld
	movq (%rsp), %rdi
	movq 8(%rsp), %rsi
	movq 16(%rsp), %rdx
	movq %cr2, %rcx
	movq 24(%rsp), %r8	/* cs */
	movq 32(%rsp), %r9	/* rflags */
	andq $-16, %rsp
	call probe_exception
1:	hlt
	jmp 1b

/*
 * #UD. PVM cannot deliver `int n` from CPL3: its instruction emulator does
 * not implement protected-mode INT and injects #UD at the instruction
 * instead. So if CPL3 raised #UD on `int imm8` (0xCD imm8) with one of our
 * DPL3 vectors, finish the software interrupt here: step over the
 * instruction and enter that vector's handler with the frame as is (#UD and
 * INT n push the same frame). On hardware that delivers INT n this path is
 * never taken. About 15 CPL0 instructions.
 */
ud_handler:
	pushq %rax
	testb $3, 16(%rsp)		/* saved CS: from CPL3? */
	jz 1f
	movq 8(%rsp), %rax		/* saved RIP */
	cmpb $0xCD, (%rax)
	jne 1f
	movzbl 1(%rax), %eax
	subl $VEC_INT80, %eax
	cmpl $(VEC_IFCTL - VEC_INT80), %eax
	ja 1f
	addq $2, 8(%rsp)
	movq soft_int_handlers(, %rax, 8), %rax
	xchgq %rax, (%rsp)		/* restore RAX, leave the target on the stack */
	ret
1:	popq %rax
	pushq $0
	pushq $6
	jmp exc_common

/* COM1 interrupt: acknowledge (IIR read), disable it (IER=0), count, EOI. */
irq_uart:
	pushq %rax
	pushq %rdx
	movw $0x3FA, %dx
	inb %dx, %al
	movw $0x3F9, %dx
	xorl %eax, %eax
	outb %al, %dx
	incl uart_irq_count(%rip)
	movl $(LAPIC_BASE + 0xB0), %edx
	movl %eax, (%rdx)
	popq %rdx
	popq %rax
	iretq

int80_handler:
	incl int80_count(%rip)
	iretq

/* Generic Event Device interrupt (edge): count, EOI. */
irq_ged:
	pushq %rax
	pushq %rdx
	incl ged_irq_count(%rip)
	xorl %eax, %eax
	movl $(LAPIC_BASE + 0xB0), %edx
	movl %eax, (%rdx)
	popq %rdx
	popq %rax
	iretq

/* %rdi iterations of dec/jnz in CPL0, bracketed by port 0x80 markers. */
spin0_handler:
	movq %rdi, %rcx
	movb $0xA0, %al
	outb %al, $0x80
	testq %rcx, %rcx
	jz 2f
1:	decq %rcx
	jnz 1b
2:	movb $0xA1, %al
	outb %al, $0x80
	iretq

/* An IDT with limit 0 makes every exception escalate to a triple fault. */
fault_handler:
	lidt null_idt_ptr(%rip)
	ud2

/* Set (%rdi != 0) or clear IF in the interrupted context's rflags. */
ifctl_handler:
	testq %rdi, %rdi
	jz 1f
	orq $0x200, 16(%rsp)
	iretq
1:	andq $~0x200, 16(%rsp)
	iretq

/* ------------------------------------------------------------------------
 * AP trampoline: copied to AP_TRAMPOLINE_ADDR by the BSP (smp.c), entered
 * by SIPI in real mode with CS base = AP_TRAMPOLINE_ADDR. Real mode ->
 * 32-bit protected mode -> long mode (the shared page tables), then
 * ap_long records the LAPIC id and parks. No stack and no IDT needed.
 */
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	lgdtl %cs:(ap_gdt_ptr - ap_tramp_start)
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $SEL_KCODE32, $ap_prot32
	.balign 4
ap_gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:

	.code32
ap_prot32:
	ENTER_LONG_MODE ap_long

	.code64
ap_long:
	movl $1, %eax
	lock xaddl %eax, ap_slot(%rip)
	movl $(LAPIC_BASE + 0x20), %edx
	movl (%rdx), %edx
	shrl $24, %edx
	cmpl $MAX_CPUS, %eax
	jae 1f
	movl %edx, ap_ids(, %rax, 4)
1:	lock incl ap_count(%rip)
2:	cli
	hlt
	jmp 2b

/* ------------------------------------------------------------------------
 * Data shared with the C code (explicitly in .data: no reliance on the
 * loader zeroing .bss).
 */
	.data
	.balign 8
	.globl pvh_start_info, int80_count, uart_irq_count, ged_irq_count, ap_slot, ap_count, ap_ids
pvh_start_info:	.long 0
int80_count:	.long 0
uart_irq_count:	.long 0
ged_irq_count:	.long 0
ap_slot:	.long 0
ap_count:	.long 0
	.balign 8
ap_ids:		.fill MAX_CPUS, 4, 0

/* Handlers of VEC_INT80..VEC_IFCTL, for ud_handler. */
	.balign 8
soft_int_handlers:
	.quad int80_handler, spin0_handler, fault_handler, ifctl_handler

/* GDT: see the SEL_* constants in defs.h. */
	.balign 16
	.globl gdt, gdt_end
gdt:
	.quad 0
	.quad 0x00AF9A000000FFFF	/* 0x08 kernel code, 64-bit */
	.quad 0x00CF92000000FFFF	/* 0x10 kernel data */
	.quad 0x00CF9A000000FFFF	/* 0x18 kernel code, 32-bit (AP trampoline) */
	.quad 0x00CFF2000000FFFF	/* 0x20 user data, DPL3 */
	.quad 0x00AFFA000000FFFF	/* 0x28 user code, 64-bit, DPL3 */
	/* 0x30 64-bit TSS, available; base bytes come from probe.ld */
	.word tss_end - tss - 1
	.word tss_base_0_15
	.byte tss_base_16_23
	.byte 0x89
	.byte 0x00
	.byte tss_base_24_31
	.long 0
	.long 0
gdt_end:

	.balign 8
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	.balign 8
idt_ptr:
	.word idt_end - idt - 1
	.quad idt

	.balign 8
null_idt_ptr:
	.word 0
	.quad 0

/*
 * 64-bit TSS: RSP0 is the stack for interrupts from CPL3. The I/O permission
 * bitmap allows every port: on real VMX/SVM, IOPL=3 already lets CPL3 do
 * port I/O, but PVM runs CPL3 with hardware IOPL 0 and hands the resulting
 * #GP to KVM's instruction emulator, which consults this bitmap instead.
 */
	.balign 16
	.globl tss
tss:
	.long 0
	.quad kstack_top	/* rsp0 */
	.quad 0, 0		/* rsp1, rsp2 */
	.quad 0
	.fill 7, 8, 0		/* ist1..ist7 */
	.quad 0
	.word 0
	.word tss_iomap - tss	/* I/O map base */
tss_iomap:
	.fill 8192, 1, 0	/* ports 0-0xffff: all allowed */
	.byte 0xFF		/* terminator the CPU may read past the last byte */
tss_end:

/* IDT: 256 gates. Exceptions are DPL0; the software vectors are DPL3 so that
 * CPL3 code may `int` them. Handler address = isr_stubs + 16 * slot; probe.ld
 * checks that no slot address crosses a 64 KiB boundary. */
	.macro gate slot, attr
	.word isr_base_0_15 + (\slot) * 16
	.word SEL_KCODE64
	.byte 0
	.byte \attr
	.word isr_base_16_31
	.long 0
	.long 0
	.endm

	.balign 16
	.globl idt
idt:
	.set vec, 0
	.rept 256
	.if vec < 32
	gate vec, 0x8E
	.elseif vec == VEC_UART
	gate 32, 0x8E
	.elseif vec == VEC_INT80
	gate 33, 0xEE
	.elseif vec == VEC_SPIN0
	gate 34, 0xEE
	.elseif vec == VEC_FAULT
	gate 35, 0xEE
	.elseif vec == VEC_IFCTL
	gate 36, 0xEE
	.elseif vec == VEC_SPURIOUS
	gate 37, 0x8E
	.elseif vec == VEC_GED
	gate 38, 0x8E
	.else
	.quad 0, 0		/* not present: #NP if raised */
	.endif
	.set vec, vec + 1
	.endr
idt_end:

/* Identity map of the first 4 GiB with 2 MiB pages, all user-accessible
 * (CPL3 drives MMIO directly); the top GiB (MMIO: boot timer, IOAPIC,
 * LAPIC) is uncached (PCD|PWT). */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + 0x7
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 0x7
	.quad pd + 0x1000 + 0x7
	.quad pd + 0x2000 + 0x7
	.quad pd + 0x3000 + 0x7
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 2048
	.if i >= 1536
	.quad (i << 21) | 0x9F	/* P RW US PWT PCD PS */
	.else
	.quad (i << 21) | 0x87	/* P RW US PS */
	.endif
	.set i, i + 1
	.endr

/* Stacks: not zeroed, not needed. */
	.bss
	.balign 4096
	.globl kstack_top, ustack_top
	.skip KSTACK_SIZE
kstack_top:
	.skip USTACK_SIZE
ustack_top:

	.section .note.GNU-stack, "", @progbits
