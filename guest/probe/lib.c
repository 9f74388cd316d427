/*
 * lib.c - the probe's tiny runtime: strings, COM1 console, formatting,
 * TSC time keeping and APIC register helpers.
 */
#include "probe.h"

/* --- strings ------------------------------------------------------------- */

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (unsigned char)*a - (unsigned char)*b;
}

/* --- COM1 ------------------------------------------------------------------ */

/* Bounded: a missing UART must not hang the probe (each poll is a VM exit). */
#define UART_POLLS 200000

void uart_init(void)
{
	outb(COM1 + UART_LCR, 0x03); /* 8N1, DLAB=0: RBR/THR/IER at +0/+1 */
	outb(COM1 + UART_IER, 0x00);
}

void uart_wait_thre(void)
{
	for (int i = 0; i < UART_POLLS; i++)
		if (inb(COM1 + UART_LSR) & LSR_THRE)
			return;
}

void uart_flush(void)
{
	for (int i = 0; i < UART_POLLS; i++)
		if (inb(COM1 + UART_LSR) & LSR_TEMT)
			return;
}

void uart_putc(char c)
{
	if (c == '\n')
		uart_putc('\r');
	uart_wait_thre();
	outb(COM1 + UART_THR, (uint8_t)c);
}

int uart_getc(void)
{
	while (!(inb(COM1 + UART_LSR) & LSR_DR))
		cpu_relax();
	return inb(COM1 + UART_RBR);
}

void kputs(const char *s)
{
	while (*s)
		uart_putc(*s++);
	uart_putc('\n');
}

/* --- formatting: %s %c %d %u %x %p with l/ll/z and a zero-pad width ------- */

struct sink {
	char *buf; /* NULL: the console */
	size_t size;
	size_t len;
};

static void emit(struct sink *s, char c)
{
	if (!s->buf) {
		uart_putc(c);
		return;
	}
	if (s->len + 1 < s->size)
		s->buf[s->len++] = c;
}

static void emit_num(struct sink *s, uint64_t v, unsigned base, int width, char pad)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (width-- > n)
		emit(s, pad);
	while (n)
		emit(s, tmp[--n]);
}

static void vformat(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(s, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;

		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *str = va_arg(ap, const char *);

			if (!str)
				str = "(null)";
			while (*str)
				emit(s, *str++);
			break;
		}
		case 'c':
			emit(s, (char)va_arg(ap, int));
			break;
		case 'd': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);

			if (v < 0) {
				emit(s, '-');
				emit_num(s, -(uint64_t)v, 10, width, pad);
			} else {
				emit_num(s, (uint64_t)v, 10, width, pad);
			}
			break;
		}
		case 'u':
			emit_num(s, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			emit_num(s, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case 'p':
			emit(s, '0');
			emit(s, 'x');
			emit_num(s, (uintptr_t)va_arg(ap, void *), 16, width, pad);
			break;
		case '%':
			emit(s, '%');
			break;
		case '\0':
			return;
		default:
			emit(s, '%');
			emit(s, *fmt);
		}
	}
}

void kprintf(const char *fmt, ...)
{
	struct sink s = { 0 };
	va_list ap;

	va_start(ap, fmt);
	vformat(&s, fmt, ap);
	va_end(ap);
}

void kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = { .buf = buf, .size = size };

	vformat(&s, fmt, ap);
	if (size)
		buf[s.len] = '\0';
}

void ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvsnprintf(buf, size, fmt, ap);
	va_end(ap);
}

/* --- time ------------------------------------------------------------------- */

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/*
 * TSC frequency: the KVM/VMware timing leaf, else CPUID 0x15, else 0x16,
 * else a measurement against the PIT, else a guess. On the PVM host CPUID
 * in CPL3 is not intercepted (AMD has no CPUID faulting): the probe sees the
 * host's own CPUID, without the VMM's timing leaf, so the PIT it is. Time
 * budgets shrug off errors; the throughput programs print times from it,
 * so tsc_khz_source() says where it came from (`tsc` program).
 */
static const char *khz_source = "guess";

#define PIT_HZ 1193182
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_CALIBRATION_TICKS (PIT_HZ / 20) /* 50 ms */

static uint16_t pit_read(void)
{
	outb(PIT_CMD, 0x00); /* latch channel 0 */
	uint8_t lo = inb(PIT_CH0);

	return (uint16_t)(lo | inb(PIT_CH0) << 8);
}

/*
 * Channel 0 as a free-running rate generator (mode 2, reload 65535; IRQ 0
 * is masked at both 8259s and the IOAPIC). Each TSC read comes right before
 * a counter latch, so the exit latency cancels out. 0 if the counter does
 * not move (no PIT).
 */
static uint64_t pit_calibrate(void)
{
	uint64_t ticks = 0, t0, t1;
	uint16_t prev, now;
	int stuck = 0;

	outb(PIT_CMD, 0x34); /* channel 0, lo/hi byte, mode 2, binary */
	outb(PIT_CH0, 0xFF);
	outb(PIT_CH0, 0xFF);
	t0 = rdtsc();
	prev = pit_read();
	do {
		t1 = rdtsc();
		now = pit_read();
		if (now == prev && ++stuck > 1000)
			return 0;
		ticks += now <= prev ? prev - now : prev + 0xFFFF - now;
		prev = now;
	} while (ticks < PIT_CALIBRATION_TICKS);
	outb(PIT_CMD, 0x30); /* back to mode 0: one interrupt, then quiet */
	outb(PIT_CH0, 0xFF);
	outb(PIT_CH0, 0xFF);
	return (t1 - t0) * PIT_HZ / ticks / 1000;
}

uint64_t tsc_khz(void)
{
	static uint64_t khz;
	uint32_t a, b, c, d;

	if (khz)
		return khz;
	khz = 3000000;
	cpuid(0x40000000, &a, &b, &c, &d);
	if (a >= 0x40000010 && a < 0x41000000) {
		cpuid(0x40000010, &a, &b, &c, &d);
		if (a >= 100000 && a < 20000000) {
			khz = a;
			khz_source = "cpuid 0x40000010";
			return khz;
		}
	}
	cpuid(0, &a, &b, &c, &d);
	uint32_t max = a;

	if (max >= 0x15) {
		cpuid(0x15, &a, &b, &c, &d);
		if (a && b && c) {
			khz = (uint64_t)c * b / a / 1000;
			khz_source = "cpuid 0x15";
			return khz;
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, &a, &b, &c, &d);
		if (a >= 100 && a < 20000) {
			khz = (uint64_t)a * 1000;
			khz_source = "cpuid 0x16";
			return khz;
		}
	}
	uint64_t measured = pit_calibrate();

	if (measured >= 100000 && measured < 20000000) {
		khz = measured;
		khz_source = "pit";
	}
	return khz;
}

const char *tsc_khz_source(void)
{
	tsc_khz();
	return khz_source;
}

uint64_t tsc_to_us(uint64_t cycles)
{
	return cycles / tsc_khz() * 1000 + cycles % tsc_khz() * 1000 / tsc_khz();
}

uint64_t deadline_us(uint64_t us)
{
	return rdtsc() + us * tsc_khz() / 1000;
}

bool expired(uint64_t deadline)
{
	return (int64_t)(rdtsc() - deadline) >= 0;
}

void delay_us(uint64_t us)
{
	uint64_t end = deadline_us(us);

	while (!expired(end))
		cpu_relax();
}

/* --- APICs ---------------------------------------------------------------- */

void lapic_enable(void)
{
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
}

uint32_t lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

void ioapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

uint32_t ioapic_read(uint32_t reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}
