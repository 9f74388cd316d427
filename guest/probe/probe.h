/*
 * probe.h - declarations shared by the C files of the probe guest.
 *
 * All C code runs in CPL3 with IOPL=3 (native speed on the PVM host), except
 * probe_exception() and what it calls, which run in CPL0 after a fault.
 */
#ifndef PROBE_H
#define PROBE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "defs.h"

#define NORETURN __attribute__((noreturn))
#define PRINTF(f, a) __attribute__((format(printf, f, a)))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* --- state shared with entry.S ------------------------------------------ */
extern volatile uint32_t pvh_start_info;
extern volatile uint32_t int80_count;
extern volatile uint32_t uart_irq_count;
extern volatile uint32_t ged_irq_count;
extern volatile uint32_t ap_slot;
extern volatile uint32_t ap_count;
extern volatile uint32_t ap_ids[MAX_CPUS];
extern const char ap_tramp_start[], ap_tramp_end[];

/* struct hvm_start_info (Xen PVH ABI, version 0/1). */
struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};
#define HVM_START_MAGIC 0x336ec578

/* The start info, or NULL when %ebx did not point at a valid one. */
const struct hvm_start_info *start_info(void);

/* --- port and memory-mapped I/O ----------------------------------------- */
static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
	return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uint64_t addr, uint32_t v)
{
	*(volatile uint32_t *)addr = v;
}

static inline void mmio_write8(uint64_t addr, uint8_t v)
{
	*(volatile uint8_t *)addr = v;
}

static inline uint8_t mmio_read8(uint64_t addr)
{
	return *(volatile uint8_t *)addr;
}

/* Orders the compiler only: enough between loads (or between stores) on x86. */
static inline void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* A full barrier: orders a store before a later load (x86 may reorder those). */
static inline void mb(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* Set or clear IF of the calling CPL3 context (through a CPL0 gate, so it
 * does not depend on how the hypervisor treats CPL3 sti/cli). */
static inline void set_interrupts(bool on)
{
	__asm__ volatile("int %[v]" : : [v] "i"(VEC_IFCTL), "D"((uint64_t)on) : "memory");
}

/* --- time (TSC) ---------------------------------------------------------- */
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

uint64_t tsc_khz(void);
const char *tsc_khz_source(void); /* where tsc_khz() came from: CPUID, PIT, guess */
uint64_t tsc_to_us(uint64_t cycles);
uint64_t deadline_us(uint64_t us); /* TSC value `us` microseconds from now */
bool expired(uint64_t deadline);
void delay_us(uint64_t us);

/* --- local APIC and IOAPIC ------------------------------------------------ */
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310

static inline uint32_t lapic_read(uint32_t reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

static inline void lapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

void lapic_enable(void);
uint32_t lapic_id(void);
void ioapic_write(uint32_t reg, uint32_t v);
uint32_t ioapic_read(uint32_t reg);

/* --- console (COM1) ------------------------------------------------------ */
#define COM1 0x3F8
#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_SCR 7
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

void uart_init(void);
void uart_putc(char c);
int uart_getc(void); /* blocks */
void uart_wait_thre(void);
void uart_flush(void);
void kputs(const char *s); /* s plus a newline */
void kprintf(const char *fmt, ...) PRINTF(1, 2);
void kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
void ksnprintf(char *buf, size_t size, const char *fmt, ...) PRINTF(3, 4);

/* --- strings (gcc may also emit calls to the mem* functions) ------------ */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* --- results -------------------------------------------------------------- */
/* Record why the run fails; returns -1 so programs can `return fail(...)`. */
int fail(const char *fmt, ...) PRINTF(1, 2);
NORETURN void probe_finish(bool pass, const char *reason);
NORETURN void probe_main(void);
NORETURN void probe_exception(uint64_t vec, uint64_t err, uint64_t rip, uint64_t cr2,
			      uint64_t cs, uint64_t rflags);
NORETURN void triple_fault(void);

/* --- platform tables (platform.c) ---------------------------------------- */
/* Fills ids[] with the APIC ids of the enabled CPUs (ACPI MADT first, else
 * the MP table); returns their number, 0 if no table was found, and names
 * the table used in *source. */
int platform_cpus(uint32_t *ids, int max, const char **source);
/* The same from one table only (0 if that table is absent). */
int acpi_cpus(uint32_t *ids, int max);
int mptable_cpus(uint32_t *ids, int max);
/* The checksummed ACPI table with signature sig (through the XSDT, else the
 * RSDT), and the DSDT (through the FADT); NULL if absent or broken. */
const uint8_t *acpi_table(const char *sig);
const uint8_t *acpi_dsdt(void);

/* --- the command line ----------------------------------------------------- */
/* The command line as the VMM passed it (unsplit, NUL-terminated). */
const char *probe_cmdline(void);

/* --- options: words that set a value for the programs after them ---------- */
extern unsigned opt_qd; /* qd=N: virtio-blk queue depth, 1..32 (default 1) */
extern unsigned opt_len; /* len=N: Ethernet frame length for nettx, 60..1514 (default 1514) */

/* --- programs ------------------------------------------------------------- */
int prog_hello(uint64_t arg);
int prog_echo(uint64_t arg);
int prog_cpus(uint64_t arg);
int prog_tables(uint64_t arg);
int prog_irq(uint64_t arg);
int prog_boottimer(uint64_t arg);
int prog_pioloop(uint64_t arg);
int prog_mmioloop(uint64_t arg);
int prog_spin0(uint64_t arg);
int prog_spin3(uint64_t arg);
int prog_fault(uint64_t arg);
int prog_counter(uint64_t arg);
int prog_idle(uint64_t arg);
int prog_vsockecho(uint64_t port);
int prog_balloon(uint64_t mib);
int prog_selftest(uint64_t arg);
int prog_tsc(uint64_t arg);
int prog_virtio(uint64_t arg);
int prog_blkread(uint64_t arg);
int prog_blkwrite(uint64_t arg);
int prog_blkrand(uint64_t arg);
int prog_blkcheck(uint64_t arg);
int prog_nettx(uint64_t arg);
int prog_netrx(uint64_t arg);
int prog_rngread(uint64_t arg);
int prog_vmgenid(uint64_t arg);

#endif
