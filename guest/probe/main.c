/*
 * main.c - CPL3 entry of the probe: read the PVH command line, run the
 * programs it names, print the result line and end the VM.
 */
#include "probe.h"

#define CMDLINE_MAX 2048
#define MAX_WORDS 64

static char cmdline[CMDLINE_MAX];
static char raw_cmdline[CMDLINE_MAX];
static char fail_reason[200];

unsigned opt_qd = 1;
unsigned opt_len = 1514;

struct program {
	const char *name;
	bool needs_arg; /* name=N (true) or plain name (false) */
	int (*run)(uint64_t arg);
	uint64_t min_arg, max_arg; /* checked at parse time when max_arg != 0 */
};

static int set_qd(uint64_t arg)
{
	opt_qd = (unsigned)arg;
	return 0;
}

static int set_len(uint64_t arg)
{
	opt_len = (unsigned)arg;
	return 0;
}

static const struct program programs[] = {
	{ "hello", false, prog_hello, 0, 0 },
	{ "echo", false, prog_echo, 0, 0 },
	{ "cpus", false, prog_cpus, 0, 0 },
	{ "tables", false, prog_tables, 0, 0 },
	{ "irq", false, prog_irq, 0, 0 },
	{ "boottimer", false, prog_boottimer, 0, 0 },
	{ "pioloop", true, prog_pioloop, 0, 0 },
	{ "mmioloop", true, prog_mmioloop, 0, 0 },
	{ "spin0", true, prog_spin0, 0, 0 },
	{ "spin3", true, prog_spin3, 0, 0 },
	{ "fault", false, prog_fault, 0, 0 },
	{ "counter", false, prog_counter, 0, 0 },
	{ "idle", false, prog_idle, 0, 0 },
	{ "tsc", false, prog_tsc, 0, 0 },
	{ "virtio", false, prog_virtio, 0, 0 },
	{ "qd", true, set_qd, 1, 32 },
	{ "len", true, set_len, 60, 1514 },
	{ "blkread", true, prog_blkread, 1, 1 << 20 },
	{ "blkwrite", true, prog_blkwrite, 1, 1 << 20 },
	{ "blkrand", true, prog_blkrand, 1, 1 << 30 },
	{ "blkcheck", false, prog_blkcheck, 0, 0 },
	{ "nettx", true, prog_nettx, 1, 1 << 30 },
	{ "netrx", true, prog_netrx, 1, 1 << 30 },
	{ "rngread", true, prog_rngread, 1, 1 << 30 },
	{ "vsockecho", true, prog_vsockecho, 1, 0xFFFFFFFFu },
	{ "balloon", true, prog_balloon, 1, 4096 },
	{ "vmgenid", true, prog_vmgenid, 0, 1000 },
	{ "selftest", false, prog_selftest, 0, 0 }, /* last: the default */
};

static const struct program *find_program(const char *name)
{
	for (size_t i = 0; i < ARRAY_SIZE(programs); i++)
		if (!strcmp(programs[i].name, name))
			return &programs[i];
	return NULL;
}

const char *probe_cmdline(void)
{
	return raw_cmdline;
}

struct step {
	const struct program *prog;
	uint64_t arg;
};

const struct hvm_start_info *start_info(void)
{
	const struct hvm_start_info *si = (const void *)(uintptr_t)pvh_start_info;

	if (!si || si->magic != HVM_START_MAGIC)
		return NULL;
	return si;
}

int fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvsnprintf(fail_reason, sizeof(fail_reason), fmt, ap);
	va_end(ap);
	return -1;
}

static unsigned current_cpl(void)
{
	uint16_t cs;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

/*
 * CPL3 goes through the VEC_FAULT gate. CPL0 (after an exception) does the
 * same inline: the PVM host's CPL0 emulator cannot emulate `int n`.
 */
NORETURN void triple_fault(void)
{
	static const struct __attribute__((packed)) {
		uint16_t limit;
		uint64_t base;
	} empty_idt = { 0, 0 };

	for (;;) {
		if (current_cpl() == 0)
			__asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt) : "memory");
		__asm__ volatile("int %0" : : "i"(VEC_FAULT) : "memory");
	}
}

/* The exit sequence documented in README.md: pyvmm stops at the i8042
 * reset, QEMU at isa-debug-exit (when present), anything else at the
 * triple fault. */
NORETURN void probe_finish(bool pass, const char *reason)
{
	if (pass)
		kputs("PROBE RESULT: PASS");
	else
		kprintf("PROBE RESULT: FAIL %s\n", reason && *reason ? reason : "unknown");
	uart_flush();
	outb(0x64, 0xFE);
	outb(0xF4, pass ? 0x31 : 0x33);
	triple_fault();
}

/* Runs in CPL0, entered from exc_common in entry.S. */
NORETURN void probe_exception(uint64_t vec, uint64_t err, uint64_t rip, uint64_t cr2,
			      uint64_t cs, uint64_t rflags)
{
	char reason[64];

	kprintf("probe: exception %lu at 0x%lx\n", vec, rip);
	kprintf("probe: error code 0x%lx, cr2 0x%lx, cs 0x%lx, rflags 0x%lx\n", err, cr2, cs,
		rflags);
	ksnprintf(reason, sizeof(reason), "exception %lu at 0x%lx", vec, rip);
	probe_finish(false, reason);
}

static bool parse_number(const char *s, uint64_t *out)
{
	unsigned base = 10;
	uint64_t v = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return false;
	for (; *s; s++) {
		unsigned d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return false;
		if (v > (UINT64_MAX - d) / base)
			return false;
		v = v * base + d;
	}
	*out = v;
	return true;
}

/* "module.param" words are meant for a kernel's modules (a VMM announces
 * virtio-mmio devices that way); like Linux, the probe leaves them alone. */
static bool is_kernel_parameter(const char *word)
{
	for (; *word; word++)
		if (*word == '.')
			return true;
	return false;
}

/* Plain words a Linux command line carries that name no probe program:
 * clients that boot "a kernel" send them, and the probe skips them. */
static const char *const kernel_words[] = {
	"quiet", "ro", "rw", "debug", "single", "splash", "nosmp", "noapic", "nolapic",
	"noacpi", "nomodeset", "nokaslr", "nosplash", "earlyprintk", "ignore_loglevel",
};

static bool is_kernel_word(const char *word)
{
	for (size_t i = 0; i < ARRAY_SIZE(kernel_words); i++)
		if (!strcmp(kernel_words[i], word))
			return true;
	return false;
}

static unsigned kernel_args_skipped;

/* Splits the command line in place into steps; checks every word before
 * anything runs, so a typo fails fast. Kernel parameters (key=value with
 * a key no program has, module.param, and the words above) are counted in
 * kernel_args_skipped and skipped. Returns the number of steps, -1. */

static int parse(char *s, struct step *steps, int max)
{
	int n = 0;

	for (;;) {
		while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
			s++;
		if (!*s)
			return n;
		char *word = s, *arg = NULL;

		while (*s && *s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') {
			if (*s == '=' && !arg) {
				*s = '\0';
				arg = s + 1;
			}
			s++;
		}
		if (*s)
			*s++ = '\0';
		if (is_kernel_parameter(word)) {
			kernel_args_skipped++;
			continue;
		}
		const struct program *p = NULL;

		for (size_t i = 0; i < ARRAY_SIZE(programs); i++)
			if (!strcmp(programs[i].name, word))
				p = &programs[i];
		if (!p && (arg || is_kernel_word(word))) {
			kernel_args_skipped++; /* console=ttyS0, panic=1, quiet... */
			continue;
		}
		if (!p)
			return fail("unknown program '%s'", word);
		if (n == max)
			return fail("too many programs (max %d)", max);
		steps[n].prog = p;
		steps[n].arg = 0;
		if (p->needs_arg && !arg)
			return fail("%s needs an argument: %s=N", word, word);
		if (!p->needs_arg && arg)
			return fail("%s takes no argument", word);
		if (arg && !parse_number(arg, &steps[n].arg))
			return fail("%s: bad number '%s'", word, arg);
		if (p->max_arg && (steps[n].arg < p->min_arg || steps[n].arg > p->max_arg))
			return fail("%s=%s: out of range %lu..%lu", word, arg, p->min_arg, p->max_arg);
		n++;
	}
}

NORETURN void probe_main(void)
{
	const struct hvm_start_info *si;
	struct step steps[MAX_WORDS];
	int n;

	uart_init();
	kputs("probe: start");
	si = start_info();
	if (si && si->cmdline_paddr && si->cmdline_paddr < 0x100000000ULL) {
		const char *src = (const char *)(uintptr_t)si->cmdline_paddr;
		size_t i;

		for (i = 0; i + 1 < sizeof(cmdline) && src[i]; i++)
			cmdline[i] = src[i];
		cmdline[i] = '\0';
		memcpy(raw_cmdline, cmdline, i + 1);
	}
	kprintf("probe: cmdline '%s'\n", cmdline);
	if (!si) {
		fail("no hvm_start_info (bad magic at %%ebx=0x%x)", pvh_start_info);
		probe_finish(false, fail_reason);
	}

	n = parse(cmdline, steps, MAX_WORDS);
	if (n < 0)
		probe_finish(false, fail_reason);
	if (kernel_args_skipped)
		kprintf("probe: skipped %u kernel parameters\n", kernel_args_skipped);
	if (n == 0 && kernel_args_skipped) {
		/* Booted as a Linux kernel by a client that knows nothing of the probe:
		 * say hello, then stay up as a kernel would, until the VMM stops it. */
		steps[0].prog = find_program("hello");
		steps[1].prog = find_program("idle");
		steps[0].arg = steps[1].arg = 0;
		n = 2;
	}
	if (n == 0) {
		steps[0].prog = &programs[ARRAY_SIZE(programs) - 1]; /* selftest */
		steps[0].arg = 0;
		n = 1;
	}
	for (int i = 0; i < n; i++) {
		if (steps[i].prog->run(steps[i].arg)) {
			if (!fail_reason[0])
				fail("%s failed", steps[i].prog->name);
			probe_finish(false, fail_reason);
		}
	}
	probe_finish(true, NULL);
}
