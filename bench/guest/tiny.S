/*
 * tiny.S - the smallest useful PVH guest, for start-up benchmarks.
 *
 * It prints "pyvm" on COM1 and resets through the i8042, so a VMM's whole
 * life - process start, VM build, first KVM_RUN, a few port exits, teardown -
 * is timed, and nothing of the guest's own. About 20 instructions, all in
 * 32-bit protected mode (the PVH entry state): on a PVM host each costs
 * ~1 us of emulation, which is noise next to the VMM's start-up.
 *
 * Built with -DSTAY it halts instead, for density figures: many idle VMs.
 * Otherwise it then ends its VMM: QEMU -M microvm through an isa-debug-exit device at
 * 0xf4, pyvmm through the i8042 reset (QEMU's microvm has no i8042; pyvmm
 * ignores the write to 0xf4), so the same ELF measures both.
 */
	.section .note.Xen, "a"
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 4			/* descsz: the 32-bit entry address */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long start

	.text
	.code32
	.globl start
start:
	movw $0x3f8, %dx	/* COM1 data register */
	movb $'p', %al
	outb %al, %dx
	movb $'y', %al
	outb %al, %dx
	movb $'v', %al
	outb %al, %dx
	movb $'m', %al
	outb %al, %dx
#ifndef STAY
	movb $0x31, %al		/* QEMU's isa-debug-exit (pyvmm has no device there) */
	outb %al, $0xf4
	movb $0xfe, %al		/* i8042: pulse the CPU reset line (pyvmm; QEMU has exited) */
	outb %al, $0x64
#endif
1:	hlt			/* interrupts are off: a halted vCPU costs nothing */
	jmp 1b
