/*
 * programs.c - the probe's programs (all but `cpus`, see smp.c). Each prints
 * the lines documented in README.md and returns 0, or returns fail(reason).
 */
#include "probe.h"

#define IRQ_BUDGET_US 2000000
#define UART_IRQ_ROUNDS 3
#define COM1_IOAPIC_PIN 4
#define IOAPIC_MASKED (1u << 16)
#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1
#define MCR_DTR_RTS_OUT2 0x0B
#define DEBUG_PORT 0x80

int prog_hello(uint64_t arg)
{
	(void)arg;
	kputs("hello from probe");
	return 0;
}

#define ECHO_MAX 256

int prog_echo(uint64_t arg)
{
	char line[ECHO_MAX + 1];

	(void)arg;
	for (;;) {
		size_t len = 0;
		int c;

		while ((c = uart_getc()) != '\n') {
			if (c == '\r')
				continue;
			if (len < ECHO_MAX)
				line[len++] = (char)c;
		}
		line[len] = '\0';
		kprintf("echo: %s\n", line);
		if (!strcmp(line, "end"))
			return 0;
	}
}

int prog_boottimer(uint64_t arg)
{
	(void)arg;
	mmio_write8(BOOT_TIMER_ADDR, 123);
	kputs("boottimer: written");
	return 0;
}

static void ioapic_route(unsigned pin, uint32_t low, uint32_t dest)
{
	ioapic_write(0x10 + 2 * pin + 1, dest << 24);
	ioapic_write(0x10 + 2 * pin, low);
}

static int irq_uart(void)
{
	uint32_t bsp;
	int got = 0;

	/* The 8259s would also see IRQ 4 (as vector 4 through LINT0 ExtINT). */
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);
	lapic_enable();
	bsp = lapic_id();
	/* fixed delivery, physical destination, edge, active high, unmasked */
	ioapic_route(COM1_IOAPIC_PIN, VEC_UART, bsp);
	outb(COM1 + UART_MCR, MCR_DTR_RTS_OUT2);
	(void)inb(COM1 + UART_IIR);
	set_interrupts(true);
	for (int round = 0; round < UART_IRQ_ROUNDS; round++) {
		uint32_t before = uart_irq_count;
		uint64_t end;

		uart_wait_thre(); /* THRE interrupt fires on enable only if THR is empty */
		end = deadline_us(IRQ_BUDGET_US);
		outb(COM1 + UART_IER, 0x02);
		while (uart_irq_count == before && !expired(end))
			cpu_relax();
		if (uart_irq_count == before)
			break;
		got++;
	}
	set_interrupts(false);
	outb(COM1 + UART_IER, 0x00);
	ioapic_route(COM1_IOAPIC_PIN, VEC_UART | IOAPIC_MASKED, bsp);
	if (got < UART_IRQ_ROUNDS)
		return fail("irq: uart interrupt %d of %d timed out (IIR 0x%x, IOAPIC pin 4 0x%x)",
			    got + 1, UART_IRQ_ROUNDS, inb(COM1 + UART_IIR),
			    ioapic_read(0x10 + 2 * COM1_IOAPIC_PIN));
	kprintf("irq: uart %d interrupts\n", got);
	return 0;
}

int prog_irq(uint64_t arg)
{
	uint32_t before = int80_count;

	(void)arg;
	__asm__ volatile("int %0" : : "i"(VEC_INT80) : "memory");
	if (int80_count != before + 1)
		return fail("irq: int 0x80 handler did not run");
	kputs("irq: int80 ok");
	return irq_uart();
}

int prog_pioloop(uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		outb(COM1 + UART_SCR, (uint8_t)i);
	kprintf("pioloop: %lu done\n", n);
	return 0;
}

int prog_mmioloop(uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		mmio_write32(BOOT_TIMER_ADDR + 8, (uint32_t)i);
	kprintf("mmioloop: %lu done\n", n);
	return 0;
}

int prog_spin0(uint64_t n)
{
	uint64_t count = n;

	/* The CPL0 handler brackets the loop with outb(0x80, 0xA0/0xA1). */
	__asm__ volatile("int %[v]" : "+D"(count) : [v] "i"(VEC_SPIN0) : "rax", "rcx", "memory");
	kprintf("spin0: %lu done\n", n);
	return 0;
}

int prog_spin3(uint64_t n)
{
	uint64_t count = n;

	outb(DEBUG_PORT, 0xB0);
	if (count)
		__asm__ volatile("1: dec %0\n\tjnz 1b" : "+r"(count) : : "cc");
	outb(DEBUG_PORT, 0xB1);
	kprintf("spin3: %lu done\n", n);
	return 0;
}

int prog_fault(uint64_t arg)
{
	(void)arg;
	kputs("fault: now");
	uart_flush();
	triple_fault();
}

int prog_selftest(uint64_t arg)
{
	(void)arg;
	if (prog_hello(0) || prog_boottimer(0) || prog_irq(0) || prog_cpus(0))
		return -1;
	return 0;
}

#define COUNTER_PERIOD_US 100000

/*
 * counter: "counter: N" about every 100 ms, forever (until the VMM stops the
 * guest). Pause/resume and snapshot/restore tests watch it continue: each
 * line is the previous one plus 1, whatever happened to the VM in between.
 * The wait is a CPL3 TSC loop, so it costs nothing to emulate on PVM.
 */
int prog_counter(uint64_t arg)
{
	uint64_t period = COUNTER_PERIOD_US * tsc_khz() / 1000;

	(void)arg;
	for (uint64_t n = 0;; n++) {
		uint64_t next = rdtsc() + period;

		kprintf("counter: %lu\n", n);
		while (rdtsc() < next)
			__asm__ volatile("pause");
	}
}

/*
 * idle: "probe: idle", then nothing until the VMM stops the guest (what a
 * booted kernel with nothing to do looks like from outside). A CPL3 pause
 * loop: no VM exits, one host CPU busy while it runs.
 */
int prog_idle(uint64_t arg)
{
	(void)arg;
	kputs("probe: idle");
	uart_flush();
	for (;;)
		__asm__ volatile("pause");
}
