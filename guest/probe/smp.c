/*
 * smp.c - the `cpus` program: count CPUs from the platform tables, start
 * every AP with INIT-SIPI-SIPI and check that each one reaches long mode.
 *
 * The BSP side runs in CPL3 (it drives the LAPIC ICR through the
 * user-accessible MMIO mapping). The AP side is the trampoline in entry.S:
 * real mode -> long mode -> record the LAPIC id, count, park in cli/hlt.
 */
#include "probe.h"

#define ICR_INIT 0x00004500 /* INIT, level assert, physical destination */
#define ICR_STARTUP 0x00004600 /* start-up IPI, vector in bits 7:0 */
#define ICR_PENDING (1u << 12) /* delivery status */
#define ONLINE_BUDGET_US 5000000 /* emulated real mode is slow: be generous */

static int send_ipi(uint32_t apic_id, uint32_t icr)
{
	uint64_t end = deadline_us(100000);

	lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
	lapic_write(LAPIC_ICR_LOW, icr);
	while (lapic_read(LAPIC_ICR_LOW) & ICR_PENDING)
		if (expired(end))
			return fail("cpus: IPI 0x%x to APIC %u stuck pending", icr, apic_id);
	return 0;
}

static bool ap_online(uint32_t apic_id)
{
	uint32_t n = ap_slot;

	for (uint32_t i = 0; i < n && i < MAX_CPUS; i++)
		if (ap_ids[i] == apic_id)
			return true;
	return false;
}

/* "0 1 2 3": the APIC ids as one line. */
static void format_ids(char *line, size_t size, const uint32_t *ids, int n)
{
	size_t len = 0;

	line[0] = '\0';
	for (int i = 0; i < n; i++) {
		ksnprintf(line + len, size - len, i ? " %u" : "%u", ids[i]);
		len = strlen(line);
	}
}

/* What each table says, so the VMM's ACPI MADT and MP table can be checked
 * one by one (cpus uses the first one found). */
int prog_tables(uint64_t arg)
{
	uint32_t ids[MAX_CPUS];
	char line[16 + MAX_CPUS * 11];
	int acpi = acpi_cpus(ids, MAX_CPUS);

	(void)arg;
	format_ids(line, sizeof(line), ids, acpi);
	kprintf("tables: acpi %d: %s\n", acpi, line);
	int mp = mptable_cpus(ids, MAX_CPUS);

	format_ids(line, sizeof(line), ids, mp);
	kprintf("tables: mptable %d: %s\n", mp, line);
	if (acpi == 0 && mp == 0)
		return fail("tables: no ACPI MADT or MP table found");
	return 0;
}

int prog_cpus(uint64_t arg)
{
	uint32_t ids[MAX_CPUS];
	const char *source;
	char line[16 + MAX_CPUS * 11];
	int n = platform_cpus(ids, MAX_CPUS, &source);

	(void)arg;
	if (n == 0)
		return fail("cpus: no ACPI MADT or MP table found");
	kprintf("cpus: %d\n", n);
	format_ids(line, sizeof(line), ids, n);
	kprintf("apic ids: %s\n", line);

	lapic_enable();
	uint32_t bsp = lapic_id();
	bool bsp_listed = false;

	for (int i = 0; i < n; i++)
		bsp_listed |= ids[i] == bsp;
	if (!bsp_listed)
		return fail("cpus: BSP APIC id %u is not in the %s table", bsp, source);

	/* Fresh state for the trampoline; the copy is in low RAM below 1 MiB. */
	memcpy((void *)AP_TRAMPOLINE_ADDR, ap_tramp_start, ap_tramp_end - ap_tramp_start);
	ap_slot = 0;
	ap_count = 0;
	for (int i = 0; i < MAX_CPUS; i++)
		ap_ids[i] = 0xFFFFFFFF;
	__asm__ volatile("mfence" ::: "memory");

	int aps = 0;

	for (int i = 0; i < n; i++) {
		if (ids[i] == bsp)
			continue;
		if (ids[i] > 0xFE)
			return fail("cpus: APIC id %u needs x2APIC mode", ids[i]);
		if (send_ipi(ids[i], ICR_INIT))
			return -1;
		aps++;
	}
	if (aps) {
		delay_us(10000); /* INIT to SIPI: 10 ms (MP spec) */
		for (int round = 0; round < 2; round++) {
			for (int i = 0; i < n; i++) {
				if (ids[i] == bsp || ap_online(ids[i]))
					continue;
				if (send_ipi(ids[i], ICR_STARTUP | AP_SIPI_VECTOR))
					return -1;
			}
			delay_us(200);
		}
	}
	uint64_t end = deadline_us(ONLINE_BUDGET_US);

	while (ap_count < (uint32_t)aps && !expired(end))
		cpu_relax();
	int online = 1 + (int)ap_count;

	kprintf("cpus online: %d\n", online);
	if (online < n)
		return fail("cpus: only %d of %d cpus came online", online, n);
	for (int i = 0; i < n; i++)
		if (ids[i] != bsp && !ap_online(ids[i]))
			return fail("cpus: APIC id %u did not report in", ids[i]);
	return 0;
}
