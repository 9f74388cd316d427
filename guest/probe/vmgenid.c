/*
 * vmgenid.c - the `vmgenid=N` program: find the VM generation id the way an
 * OS does (the DSDT's VGEN device: ADDR; the Generic Event Device's _CRS:
 * its interrupt), print it, then print it again after each of N GED
 * interrupts (the VMM's "new generation" notification).
 *
 * The DSDT is searched, not interpreted: VGEN's ADDR must be a Method that
 * returns, or a Name of, a Package of two integer constants, and the GED's
 * first Extended Interrupt descriptor follows its "ACPI0013" _HID. Both are
 * how pyvmm (and Firecracker) encode them. Every read stays inside the
 * checksummed table, so a broken DSDT fails the run with a message.
 */
#include "probe.h"

#define GUID_SIZE 16
#define IOAPIC_MASKED (1u << 16)
#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1
#define IOAPIC_PINS 24
#define SEARCH_WINDOW 96 /* bytes after a name in which its value must start */

struct cursor {
	const uint8_t *p, *end;
};

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The first occurrence of needle in [from, end), or NULL. */
static const uint8_t *find(const uint8_t *from, const uint8_t *end, const void *needle, size_t n)
{
	for (const uint8_t *p = from; p + n <= end; p++)
		if (!memcmp(p, needle, n))
			return p;
	return NULL;
}

/* An AML integer constant (ACPI 6.x 20.2.3): Zero, One, Ones, Byte..QWord. */
static bool aml_integer(struct cursor *c, uint64_t *out)
{
	static const uint8_t sizes[] = { [0x0A] = 1, [0x0B] = 2, [0x0C] = 4, [0x0E] = 8 };
	uint8_t op;
	unsigned size;

	if (c->p >= c->end)
		return false;
	op = *c->p++;
	if (op == 0x00 || op == 0x01 || op == 0xFF) {
		*out = op == 0xFF ? ~0ULL : op;
		return true;
	}
	size = op < sizeof(sizes) ? sizes[op] : 0;
	if (!size || c->p + size > c->end)
		return false;
	*out = 0;
	for (unsigned i = 0; i < size; i++)
		*out |= (uint64_t)c->p[i] << (8 * i);
	c->p += size;
	return true;
}

/* Skips a PkgLength (20.2.4): the lead byte's bits 7-6 count the bytes after it. */
static bool skip_pkg_length(struct cursor *c)
{
	unsigned follow;

	if (c->p >= c->end)
		return false;
	follow = *c->p >> 6;
	c->p += 1 + follow;
	return c->p <= c->end;
}

/* VGEN's ADDR: Package (2) {low, high} a few bytes after the name "ADDR". */
static int vgen_address(const uint8_t *dsdt, uint32_t len, uint64_t *addr)
{
	const uint8_t *end = dsdt + len;
	const uint8_t *vgen = find(dsdt + 36, end, "VGEN", 4);
	const uint8_t *name = vgen ? find(vgen, end, "ADDR", 4) : NULL;
	const uint8_t *pkg;
	struct cursor c;
	uint64_t low, high;

	if (!vgen || !find(dsdt + 36, end, "VM_Gen_Counter", 14))
		return fail("vmgenid: no VGEN device with _CID VM_Gen_Counter in the DSDT");
	if (!name)
		return fail("vmgenid: VGEN has no ADDR");
	pkg = find(name + 4, name + 4 + SEARCH_WINDOW < end ? name + 4 + SEARCH_WINDOW : end,
		   "\x12", 1);
	if (!pkg)
		return fail("vmgenid: ADDR is not a Package");
	c.p = pkg + 1;
	c.end = end;
	if (!skip_pkg_length(&c) || c.p >= end || *c.p++ != 2)
		return fail("vmgenid: ADDR's Package does not have 2 elements");
	if (!aml_integer(&c, &low) || !aml_integer(&c, &high) || low >> 32 || high >> 32)
		return fail("vmgenid: ADDR's elements are not two 32-bit integers");
	*addr = low | high << 32;
	if (*addr == 0 || *addr % 8 || *addr + GUID_SIZE > 0x100000000ULL)
		return fail("vmgenid: ADDR 0x%lx is not an aligned address below 4 GiB", *addr);
	return 0;
}

/* The GED's interrupt: the first Extended Interrupt descriptor after "ACPI0013". */
static int ged_gsi(const uint8_t *dsdt, uint32_t len, uint32_t *gsi)
{
	const uint8_t *end = dsdt + len;
	const uint8_t *hid = find(dsdt + 36, end, "ACPI0013", 8);
	const uint8_t *limit, *irq;

	if (!hid)
		return fail("vmgenid: no Generic Event Device (ACPI0013) in the DSDT");
	limit = hid + SEARCH_WINDOW < end ? hid + SEARCH_WINDOW : end;
	irq = find(hid, limit, "\x89", 1);
	if (!irq || irq + 9 > end || irq[4] < 1)
		return fail("vmgenid: the GED has no Extended Interrupt descriptor");
	*gsi = le32(irq + 5);
	if (*gsi >= IOAPIC_PINS)
		return fail("vmgenid: GED GSI %u is not an IOAPIC pin", *gsi);
	return 0;
}

static void print_guid(const char *what, uint64_t addr)
{
	const volatile uint8_t *guid = (const volatile uint8_t *)addr;
	char hex[2 * GUID_SIZE + 1];

	for (int i = 0; i < GUID_SIZE; i++)
		ksnprintf(hex + 2 * i, 3, "%02x", guid[i]);
	kprintf("vmgenid: %s guid %s\n", what, hex);
}

static void route(uint32_t pin, uint32_t low, uint32_t dest)
{
	ioapic_write(0x10 + 2 * pin + 1, dest << 24);
	ioapic_write(0x10 + 2 * pin, low);
}

int prog_vmgenid(uint64_t n)
{
	const uint8_t *dsdt = acpi_dsdt();
	uint64_t addr = 0;
	uint32_t gsi = 0, bsp, seen;
	char what[32];

	if (!dsdt)
		return fail("vmgenid: no DSDT");
	if (vgen_address(dsdt, le32(dsdt + 4), &addr) || ged_gsi(dsdt, le32(dsdt + 4), &gsi))
		return -1;
	kprintf("vmgenid: addr 0x%lx gsi %u\n", addr, gsi);
	print_guid("boot", addr);
	if (!n)
		return 0;
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);
	lapic_enable();
	bsp = lapic_id();
	seen = ged_irq_count;
	/* fixed delivery, physical destination, edge, active high, unmasked */
	route(gsi, VEC_GED, bsp);
	set_interrupts(true);
	kputs("vmgenid: waiting");
	for (uint64_t i = 1; i <= n; i++) {
		while (ged_irq_count == seen)
			cpu_relax();
		seen++;
		barrier();
		ksnprintf(what, sizeof(what), "notified %lu", i);
		print_guid(what, addr);
	}
	set_interrupts(false);
	route(gsi, VEC_GED | IOAPIC_MASKED, bsp);
	return 0;
}
