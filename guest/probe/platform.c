/*
 * platform.c - find the CPUs: ACPI MADT first, else the Intel MP table.
 *
 * Runs in CPL3 (native speed). Every table is checksummed and every pointer
 * bounds-checked against the 4 GiB identity map, so a broken table from the
 * VMM makes the probe fail with a message instead of faulting.
 */
#include "probe.h"

#define MAP_LIMIT 0x100000000ULL /* the probe maps the first 4 GiB */
#define MAX_TABLE 0x100000 /* sanity cap on any table length */

static bool mapped(uint64_t addr, uint64_t len)
{
	return addr != 0 && len < MAP_LIMIT && addr < MAP_LIMIT - len;
}

static bool checksum_ok(const void *p, size_t len)
{
	const uint8_t *b = p;
	uint8_t sum = 0;

	while (len--)
		sum += *b++;
	return sum == 0;
}

static uint16_t rd16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p)
{
	return rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static int add_id(uint32_t *ids, int n, int max, uint32_t id)
{
	for (int i = 0; i < n; i++)
		if (ids[i] == id)
			return n;
	if (n < max)
		ids[n++] = id;
	return n;
}

/* --- ACPI ------------------------------------------------------------------ */

static const uint8_t *rsdp_at(uint64_t addr)
{
	const uint8_t *p = (const uint8_t *)addr;

	if (!mapped(addr, 36) || memcmp(p, "RSD PTR ", 8) || !checksum_ok(p, 20))
		return NULL;
	if (p[15] >= 2 && !checksum_ok(p, 36))
		return NULL;
	return p;
}

static const uint8_t *find_rsdp(void)
{
	const struct hvm_start_info *si = start_info();
	const uint8_t *p;

	if (si && si->rsdp_paddr && (p = rsdp_at(si->rsdp_paddr)))
		return p;
	for (uint64_t a = 0x9FC00; a < 0xA0000; a += 16)
		if ((p = rsdp_at(a)))
			return p;
	for (uint64_t a = 0xE0000; a < 0x100000; a += 16)
		if ((p = rsdp_at(a)))
			return p;
	return NULL;
}

/* A system description table with a valid header and checksum, or NULL. */
static const uint8_t *sdt_at(uint64_t addr)
{
	if (!mapped(addr, 36))
		return NULL;
	const uint8_t *p = (const uint8_t *)addr;
	uint32_t len = rd32(p + 4);

	if (len < 36 || len > MAX_TABLE || !mapped(addr, len) || !checksum_ok(p, len))
		return NULL;
	return p;
}

const uint8_t *acpi_table(const char *sig)
{
	const uint8_t *rsdp = find_rsdp();
	const uint8_t *root = NULL;
	unsigned width = 4;

	if (!rsdp)
		return NULL;
	if (rsdp[15] >= 2 && rd64(rsdp + 24))
		root = sdt_at(rd64(rsdp + 24));
	if (root && !memcmp(root, "XSDT", 4)) {
		width = 8;
	} else {
		root = sdt_at(rd32(rsdp + 16));
		if (!root || memcmp(root, "RSDT", 4))
			return NULL;
	}
	uint32_t len = rd32(root + 4);

	for (uint32_t off = 36; off + width <= len; off += width) {
		uint64_t a = width == 8 ? rd64(root + off) : rd32(root + off);
		const uint8_t *t = sdt_at(a);

		if (t && !memcmp(t, sig, 4))
			return t;
	}
	return NULL;
}

/* The DSDT: the FADT's X_DSDT (offset 140) if set, else its 32-bit DSDT (40). */
const uint8_t *acpi_dsdt(void)
{
	const uint8_t *fadt = acpi_table("FACP");
	const uint8_t *dsdt = NULL;

	if (!fadt)
		return NULL;
	if (rd32(fadt + 4) >= 148 && rd64(fadt + 140))
		dsdt = sdt_at(rd64(fadt + 140));
	else
		dsdt = sdt_at(rd32(fadt + 40));
	return dsdt && !memcmp(dsdt, "DSDT", 4) ? dsdt : NULL;
}

static int madt_cpus(const uint8_t *madt, uint32_t *ids, int max)
{
	uint32_t len = rd32(madt + 4);
	int n = 0;

	for (uint32_t off = 44; off + 2 <= len;) {
		const uint8_t *e = madt + off;
		uint8_t type = e[0], elen = e[1];

		if (elen < 2 || off + elen > len)
			break;
		if (type == 0 && elen >= 8 && (rd32(e + 4) & 1)) /* processor local APIC */
			n = add_id(ids, n, max, e[3]);
		else if (type == 9 && elen >= 16 && (rd32(e + 8) & 1)) /* local x2APIC */
			n = add_id(ids, n, max, rd32(e + 4));
		off += elen;
	}
	return n;
}

/* --- MP table ---------------------------------------------------------------- */

static const uint8_t *mpfp_at(uint64_t addr)
{
	const uint8_t *p = (const uint8_t *)addr;

	if (memcmp(p, "_MP_", 4) || p[8] == 0 || !checksum_ok(p, (size_t)p[8] * 16))
		return NULL;
	return p;
}

static const uint8_t *find_mp_config(void)
{
	const uint8_t *fp = NULL;

	for (uint64_t a = 0x9FC00; !fp && a < 0xA0000; a += 16)
		fp = mpfp_at(a);
	for (uint64_t a = 0xF0000; !fp && a < 0x100000; a += 16)
		fp = mpfp_at(a);
	if (!fp)
		return NULL;
	uint64_t cfg = rd32(fp + 4);

	if (!mapped(cfg, 44))
		return NULL; /* 0 means a "default configuration": not supported */
	const uint8_t *p = (const uint8_t *)cfg;
	uint16_t len = rd16(p + 4);

	if (memcmp(p, "PCMP", 4) || len < 44 || !mapped(cfg, len) || !checksum_ok(p, len))
		return NULL;
	return p;
}

/*
 * Walks the entries by the base table length, not the entry count: QEMU's
 * qboot (microvm, acpi=off) writes an entry count of 0. Linux does the same.
 */
static int mp_cpus(const uint8_t *cfg, uint32_t *ids, int max)
{
	uint16_t len = rd16(cfg + 4);
	uint32_t off = 44;
	int n = 0;

	while (off < len) {
		const uint8_t *e = cfg + off;

		if (e[0] == 0) { /* processor: 20 bytes */
			if (off + 20 > len)
				break;
			if (e[3] & 1) /* CPU flags: EN */
				n = add_id(ids, n, max, e[1]);
			off += 20;
		} else if (e[0] <= 4) { /* bus, IOAPIC, interrupt assignments: 8 bytes */
			off += 8;
		} else {
			break;
		}
	}
	return n;
}

int acpi_cpus(uint32_t *ids, int max)
{
	const uint8_t *t = acpi_table("APIC");

	return t ? madt_cpus(t, ids, max) : 0;
}

int mptable_cpus(uint32_t *ids, int max)
{
	const uint8_t *t = find_mp_config();

	return t ? mp_cpus(t, ids, max) : 0;
}

int platform_cpus(uint32_t *ids, int max, const char **source)
{
	int n;

	if ((n = acpi_cpus(ids, max)) > 0) {
		*source = "acpi";
		return n;
	}
	if ((n = mptable_cpus(ids, max)) > 0) {
		*source = "mptable";
		return n;
	}
	*source = "none";
	return 0;
}
