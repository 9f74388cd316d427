/*
 * virtio.c - the probe's virtio-mmio transport and split virtqueues (see
 * virtio.h), device discovery, and the `virtio`, `tsc` and `rngread`
 * programs.
 *
 * Discovery: `virtio_mmio.device=SIZE@ADDR:IRQ[:ID]` words on the command
 * line (pyvmm always adds them; QEMU microvm with acpi=off does), else a scan
 * of the windows pyvmm (0xd0001000 + n * 4 KiB) and QEMU microvm
 * (0xfeb00000 + n * 512) use, for magic "virt", version 2 and a nonzero
 * device id.
 */
#include "virtio.h"

/* --- DMA memory -------------------------------------------------------------- */

static uint64_t dma_next = DMA_BASE;

void dma_reset(void)
{
	dma_next = DMA_BASE;
}

/* True if the PVH memory map (when the VMM gave one) has RAM over the DMA
 * region; a VM with too little memory fails with this reason, not a fault. */
static bool dma_region_is_ram(void)
{
	struct memmap_entry {
		uint64_t addr;
		uint64_t size;
		uint32_t type;
		uint32_t reserved;
	};
	const struct hvm_start_info *si = start_info();

	if (!si || si->version < 1 || !si->memmap_entries || !si->memmap_paddr)
		return true;
	const struct memmap_entry *e = (const void *)(uintptr_t)si->memmap_paddr;

	for (uint32_t i = 0; i < si->memmap_entries && i < 128; i++)
		if (e[i].type == 1 && e[i].addr <= DMA_BASE &&
		    e[i].addr + e[i].size >= DMA_BASE + DMA_SIZE)
			return true;
	return false;
}

void *dma_alloc(uint64_t size, uint64_t align)
{
	static int ram_ok = -1;
	uint64_t addr = (dma_next + align - 1) & ~(align - 1);

	if (ram_ok < 0)
		ram_ok = dma_region_is_ram();
	if (!ram_ok) {
		fail("guest RAM does not cover the DMA region 0x%lx-0x%lx: give the VM >= %lu MiB",
		     DMA_BASE, DMA_BASE + DMA_SIZE, (DMA_BASE + DMA_SIZE) >> 20);
		return NULL;
	}
	if (size > DMA_SIZE || addr + size > DMA_BASE + DMA_SIZE) {
		fail("DMA region exhausted (%lu bytes wanted)", size);
		return NULL;
	}
	dma_next = addr + size;
	memset((void *)(uintptr_t)addr, 0, size);
	return (void *)(uintptr_t)addr;
}

/* --- discovery ------------------------------------------------------------------ */

#define PYVMM_MMIO_BASE 0xD0001000ULL
#define PYVMM_MMIO_STRIDE 0x1000
#define PYVMM_MMIO_COUNT 16
#define QEMU_MMIO_BASE 0xFEB00000ULL
#define QEMU_MMIO_STRIDE 0x200
#define QEMU_MMIO_COUNT 32
#define MAX_FOUND 48

struct found {
	uint64_t base;
	uint32_t irq;
	uint32_t version;
	uint32_t device_id;
};

static bool starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return false;
	return true;
}

/* A number at *s (decimal or 0x hex); advances *s. False if there is none. */
static bool take_number(const char **s, uint64_t *out)
{
	const char *p = *s;
	unsigned base = 10;
	uint64_t v = 0;
	int digits = 0;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	for (;; p++, digits++) {
		unsigned d;

		if (*p >= '0' && *p <= '9')
			d = *p - '0';
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = *p - 'a' + 10;
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = *p - 'A' + 10;
		else
			break;
		if (v > (UINT64_MAX - d) / base)
			return false;
		v = v * base + d;
	}
	*s = p;
	*out = v;
	return digits > 0;
}

/* `SIZE[KMG]@ADDR:IRQ[:ID]` (Linux's virtio_mmio.device syntax). */
static bool parse_device_word(const char *s, uint64_t *base, uint32_t *irq)
{
	uint64_t size, addr, n;

	if (!take_number(&s, &size))
		return false;
	if (*s == 'K' || *s == 'k')
		size <<= 10, s++;
	else if (*s == 'M' || *s == 'm')
		size <<= 20, s++;
	else if (*s == 'G' || *s == 'g')
		size <<= 30, s++;
	if (*s++ != '@' || !take_number(&s, &addr) || *s++ != ':' || !take_number(&s, &n))
		return false;
	if (*s == ':') {
		uint64_t id;

		s++;
		if (!take_number(&s, &id))
			return false;
	}
	if (*s && *s != ' ' && *s != '\t')
		return false;
	/* The registers and the start of config space must be mapped (< 4 GiB). */
	if (size < VMMIO_CONFIG + 0x40 || addr >= 0x100000000ULL || addr + size > 0x100000000ULL ||
	    addr % 4)
		return false;
	*base = addr;
	*irq = (uint32_t)n;
	return true;
}

static void probe_window(uint64_t base, uint32_t irq, struct found *f)
{
	f->base = base;
	f->irq = irq;
	f->version = 0;
	f->device_id = 0;
	if (mmio_read32(base + VMMIO_MAGIC) != VIRTIO_MMIO_MAGIC)
		return;
	f->version = mmio_read32(base + VMMIO_VERSION);
	f->device_id = mmio_read32(base + VMMIO_DEVICE_ID);
}

/* Fills found[] with every virtio-mmio window that answers with the magic;
 * returns how many; *from_cmdline tells where they came from. Bad
 * virtio_mmio.device words are reported and skipped. */
static int discover(struct found *found, int max, bool *from_cmdline)
{
	static const char key[] = "virtio_mmio.device=";
	const char *s = probe_cmdline();
	int n = 0, words = 0;

	while (*s) {
		while (*s == ' ' || *s == '\t')
			s++;
		if (starts_with(s, key)) {
			uint64_t base;
			uint32_t irq;

			words++;
			if (!parse_device_word(s + sizeof(key) - 1, &base, &irq))
				kprintf("virtio: ignoring malformed word at '%s'\n", s);
			else if (n < max) {
				probe_window(base, irq, &found[n]);
				if (found[n].version)
					n++;
			}
		}
		while (*s && *s != ' ' && *s != '\t')
			s++;
	}
	*from_cmdline = words > 0;
	if (words)
		return n;
	for (int i = 0; i < PYVMM_MMIO_COUNT && n < max; i++) {
		probe_window(PYVMM_MMIO_BASE + (uint64_t)i * PYVMM_MMIO_STRIDE, 0, &found[n]);
		if (found[n].version)
			n++;
	}
	for (int i = 0; i < QEMU_MMIO_COUNT && n < max; i++) {
		probe_window(QEMU_MMIO_BASE + (uint64_t)i * QEMU_MMIO_STRIDE, 0, &found[n]);
		if (found[n].version)
			n++;
	}
	return n;
}

static const char *device_name(uint32_t id)
{
	switch (id) {
	case VIRTIO_ID_NET:
		return "virtio-net";
	case VIRTIO_ID_BLOCK:
		return "virtio-blk";
	case VIRTIO_ID_RNG:
		return "virtio-rng";
	case 0:
		return "empty";
	default:
		return "other";
	}
}

int prog_virtio(uint64_t arg)
{
	struct found found[MAX_FOUND];
	bool from_cmdline;
	int n = discover(found, MAX_FOUND, &from_cmdline);

	(void)arg;
	for (int i = 0; i < n; i++)
		kprintf("virtio: 0x%lx irq %u version %u device %u (%s)\n", found[i].base,
			found[i].irq, found[i].version, found[i].device_id,
			device_name(found[i].device_id));
	kprintf("virtio: %d windows (%s)\n", n, from_cmdline ? "command line" : "scan");
	return 0;
}

/* --- transport ------------------------------------------------------------------- */

static void set_status(struct vdev *dev, uint32_t bits)
{
	vdev_write(dev, VMMIO_STATUS, vdev_read(dev, VMMIO_STATUS) | bits);
}

void vdev_reset(struct vdev *dev)
{
	vdev_write(dev, VMMIO_STATUS, 0);
}

int vdev_open(struct vdev *dev, uint32_t device_id, uint64_t wanted)
{
	struct found found[MAX_FOUND];
	bool from_cmdline;
	int n = discover(found, MAX_FOUND, &from_cmdline);
	const char *name = device_name(device_id);
	int legacy = -1;

	tsc_khz(); /* may calibrate for 50 ms: not inside anyone's timed loop */
	dma_reset();
	for (int i = 0; i < n; i++) {
		if (found[i].device_id != device_id)
			continue;
		if (found[i].version != 2) {
			legacy = i;
			continue;
		}
		dev->base = found[i].base;
		dev->irq = found[i].irq;
		dev->device_id = device_id;
		dev->name = name;
		goto have_device;
	}
	if (legacy >= 0)
		return fail("%s at 0x%lx is virtio-mmio version %u, not 2 (QEMU: -global "
			    "virtio-mmio.force-legacy=false)",
			    name, found[legacy].base, found[legacy].version);
	return fail("no %s device (%d virtio-mmio windows found by %s)", name, n,
		    from_cmdline ? "the command line" : "scanning");

have_device:
	vdev_reset(dev);
	if (vdev_read(dev, VMMIO_STATUS) != 0)
		return fail("%s at 0x%lx: status 0x%x after reset", name, dev->base,
			    vdev_read(dev, VMMIO_STATUS));
	set_status(dev, VSTATUS_ACKNOWLEDGE);
	set_status(dev, VSTATUS_DRIVER);
	vdev_write(dev, VMMIO_DEVICE_FEATURES_SEL, 0);
	dev->offered = vdev_read(dev, VMMIO_DEVICE_FEATURES);
	vdev_write(dev, VMMIO_DEVICE_FEATURES_SEL, 1);
	dev->offered |= (uint64_t)vdev_read(dev, VMMIO_DEVICE_FEATURES) << 32;
	if (!(dev->offered >> VIRTIO_F_VERSION_1 & 1))
		return fail("%s at 0x%lx does not offer VIRTIO_F_VERSION_1 (features 0x%lx)", name,
			    dev->base, dev->offered);
	dev->features = dev->offered & (wanted | 1ULL << VIRTIO_F_VERSION_1);
	vdev_write(dev, VMMIO_DRIVER_FEATURES_SEL, 0);
	vdev_write(dev, VMMIO_DRIVER_FEATURES, (uint32_t)dev->features);
	vdev_write(dev, VMMIO_DRIVER_FEATURES_SEL, 1);
	vdev_write(dev, VMMIO_DRIVER_FEATURES, (uint32_t)(dev->features >> 32));
	set_status(dev, VSTATUS_FEATURES_OK);
	if (!(vdev_read(dev, VMMIO_STATUS) & VSTATUS_FEATURES_OK))
		return fail("%s at 0x%lx refused features 0x%lx", name, dev->base, dev->features);
	return 0;
}

int vq_setup(struct virtq *q, struct vdev *dev, unsigned index, unsigned max_size)
{
	unsigned size = 1;

	vdev_write(dev, VMMIO_QUEUE_SEL, index);
	if (vdev_read(dev, VMMIO_QUEUE_READY))
		return fail("%s: queue %u is ready before setup", dev->name, index);
	uint32_t max = vdev_read(dev, VMMIO_QUEUE_NUM_MAX);

	if (max == 0)
		return fail("%s: queue %u is not available", dev->name, index);
	if (max_size > VQ_MAX_SIZE)
		max_size = VQ_MAX_SIZE;
	while (size * 2 <= max && size * 2 <= max_size)
		size *= 2;
	q->dev = dev;
	q->index = (uint16_t)index;
	q->size = (uint16_t)size;
	q->next_avail = 0;
	q->last_used = 0;
	q->kicks = 0;
	q->kicks_saved = 0;
	q->desc = dma_alloc(sizeof(struct virtq_desc) * size, 4096);
	q->avail = dma_alloc(sizeof(struct virtq_avail) + 2 * size + 2, 4096);
	q->used = dma_alloc(sizeof(struct virtq_used) + sizeof(struct virtq_used_elem) * size + 2,
			    4096);
	if (!q->desc || !q->avail || !q->used)
		return -1;
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT; /* we poll */
	vdev_write(dev, VMMIO_QUEUE_NUM, size);
	vdev_write(dev, VMMIO_QUEUE_DESC_LOW, (uint32_t)(uintptr_t)q->desc);
	vdev_write(dev, VMMIO_QUEUE_DESC_HIGH, 0);
	vdev_write(dev, VMMIO_QUEUE_DRIVER_LOW, (uint32_t)(uintptr_t)q->avail);
	vdev_write(dev, VMMIO_QUEUE_DRIVER_HIGH, 0);
	vdev_write(dev, VMMIO_QUEUE_DEVICE_LOW, (uint32_t)(uintptr_t)q->used);
	vdev_write(dev, VMMIO_QUEUE_DEVICE_HIGH, 0);
	vdev_write(dev, VMMIO_QUEUE_READY, 1);
	if (vdev_read(dev, VMMIO_QUEUE_READY) != 1)
		return fail("%s: queue %u did not become ready", dev->name, index);
	return 0;
}

int vdev_start(struct vdev *dev)
{
	set_status(dev, VSTATUS_DRIVER_OK);
	uint32_t status = vdev_read(dev, VMMIO_STATUS);

	if (!(status & VSTATUS_DRIVER_OK) || status & VSTATUS_NEEDS_RESET)
		return fail("%s at 0x%lx: status 0x%x after DRIVER_OK", dev->name, dev->base, status);
	return 0;
}

uint8_t vdev_config8(const struct vdev *dev, uint32_t off)
{
	return mmio_read8(dev->base + VMMIO_CONFIG + off);
}

uint32_t vdev_config32(const struct vdev *dev, uint32_t off)
{
	return mmio_read32(dev->base + VMMIO_CONFIG + off);
}

/* Two 32-bit reads, repeated while the config generation changes. */
uint64_t vdev_config64(const struct vdev *dev, uint32_t off)
{
	uint32_t gen, lo, hi;

	do {
		gen = vdev_read(dev, VMMIO_CONFIG_GENERATION);
		lo = vdev_config32(dev, off);
		hi = vdev_config32(dev, off + 4);
	} while (gen != vdev_read(dev, VMMIO_CONFIG_GENERATION));
	return (uint64_t)hi << 32 | lo;
}

/* --- virtqueues -------------------------------------------------------------------- */

void vq_kick(struct virtq *q)
{
	barrier(); /* ring entries and descriptors before the index */
	q->avail->idx = q->next_avail;
	mb(); /* publish the index before reading the device's NO_NOTIFY flag */
	if (q->used->flags & VIRTQ_USED_F_NO_NOTIFY) {
		q->kicks_saved++;
		return;
	}
	vdev_write(q->dev, VMMIO_QUEUE_NOTIFY, q->index);
	q->kicks++;
}

int vq_wait_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
	uint64_t end = deadline_us(VQ_TIMEOUT_US);

	for (;;) {
		for (int i = 0; i < 1000; i++) {
			if (vq_get_used(q, id, len))
				return 0;
			cpu_relax();
		}
		if (expired(end))
			return fail("%s: queue %u: no used buffer within %u s (avail %u, used %u, "
				    "device status 0x%x)",
				    q->dev->name, q->index, VQ_TIMEOUT_US / 1000000, q->next_avail,
				    q->used->idx, vdev_read(q->dev, VMMIO_STATUS));
	}
}

void fmt_rate(char *buf, size_t size, uint64_t amount, uint64_t unit, uint64_t us)
{
	uint64_t tenths = us ? amount * 10000000ULL / unit / us : 0;

	ksnprintf(buf, size, "%lu.%lu", tenths / 10, tenths % 10);
}

/* --- tsc ------------------------------------------------------------------------------ */

int prog_tsc(uint64_t arg)
{
	uint64_t t0, t1;

	(void)arg;
	t0 = rdtsc();
	for (int i = 0; i < 1000; i++)
		(void)rdtsc();
	t1 = rdtsc();
	kprintf("tsc: %lu kHz (%s), rdtsc %lu cycles\n", tsc_khz(), tsc_khz_source(),
		(t1 - t0) / 1001);
	return 0;
}

/* --- rngread ---------------------------------------------------------------------------- */

#define RNG_BUF 4096
#define RNG_QUEUE 64

int prog_rngread(uint64_t n)
{
	struct vdev dev;
	struct virtq q;
	uint32_t seen[256] = { 0 };
	uint64_t got = 0, requests = 0, posted_bytes = 0, start;
	uint8_t *bufs;
	unsigned distinct = 0;

	if (vdev_open(&dev, VIRTIO_ID_RNG, 0) || vq_setup(&q, &dev, 0, RNG_QUEUE))
		return -1;
	bufs = dma_alloc((uint64_t)q.size * RNG_BUF, 4096);
	if (!bufs || vdev_start(&dev))
		return -1;
	for (unsigned i = 0; i < q.size; i++) {
		q.desc[i].addr = (uintptr_t)(bufs + (uint64_t)i * RNG_BUF);
		q.desc[i].len = RNG_BUF;
		q.desc[i].flags = VIRTQ_DESC_F_WRITE;
	}
	start = rdtsc();
	for (unsigned i = 0; i < q.size && posted_bytes < n; i++, posted_bytes += RNG_BUF)
		vq_post(&q, (uint16_t)i);
	vq_kick(&q);
	while (got < n) {
		uint32_t id, len;

		if (vq_wait_used(&q, &id, &len))
			return -1;
		do {
			if (id >= q.size || len > RNG_BUF)
				return fail("rngread: bad used element id %u len %u", id, len);
			const uint8_t *b = bufs + (uint64_t)id * RNG_BUF;

			for (uint32_t i = 0; i < len && got + i < n; i++)
				seen[b[i]]++;
			got += len;
			requests++;
			vq_post(&q, (uint16_t)id); /* harmless if more than needed */
		} while (got < n && vq_get_used(&q, &id, &len));
		if (got < n)
			vq_kick(&q);
	}
	uint64_t us = tsc_to_us(rdtsc() - start);

	vdev_reset(&dev);
	for (int i = 0; i < 256; i++)
		distinct += seen[i] != 0;
	kprintf("rngread: %lu bytes in %lu requests, %lu us, %u distinct byte values\n",
		n, requests, us, distinct);
	/* Uniform random bytes: ~256 * (1 - e^(-n/256)) distinct values. */
	if (n >= 2 && distinct < 2)
		return fail("rngread: all %lu bytes are equal", n);
	if (n >= 4096 && distinct < 250)
		return fail("rngread: only %u distinct byte values in %lu bytes", distinct, n);
	return 0;
}
