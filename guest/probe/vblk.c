/*
 * vblk.c - virtio-blk programs: blkread, blkwrite, blkrand (throughput with
 * `qd` requests in flight, data verified) and blkcheck (device behaviour).
 *
 * Image pattern the host writes for the read programs: every 4 KiB block b
 * starts with b and ends with ~b (u64, little-endian). blkwrite writes b ^
 * BLK_WRITE_MAGIC and its complement in the same places of each block, so
 * the host can check the image afterwards.
 *
 * Requests: slot s of the `qd` slots owns descriptors 3s (header), 3s + 1
 * (data) and 3s + 2 (status byte), so a used id names its slot.
 */
#include "virtio.h"

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define STATUS_UNSET 0xFF /* what a status byte holds until the device writes it */

#define SECTOR 512
#define BLOCK 4096
#define SEQ_REQUEST 65536
#define BLK_MAX_QD 32
#define BLK_WRITE_MAGIC 0x5752495445000000ULL /* "WRITE" in the top bytes */

struct blk_header {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct blk {
	struct vdev dev;
	struct virtq q;
	uint64_t capacity; /* 512-byte sectors */
	unsigned slots;
	uint32_t buf_size;
	struct blk_header *hdr;
	volatile uint8_t *status;
	uint8_t *data;
	uint64_t tag[BLK_MAX_QD]; /* first 4 KiB block of each slot's request */
};

static const char *status_name(int status)
{
	switch (status) {
	case VIRTIO_BLK_S_OK:
		return "OK";
	case VIRTIO_BLK_S_IOERR:
		return "IOERR";
	case VIRTIO_BLK_S_UNSUPP:
		return "UNSUPP";
	case STATUS_UNSET:
		return "unset";
	default:
		return "bad";
	}
}

static uint8_t *slot_data(struct blk *b, unsigned slot)
{
	return b->data + (uint64_t)slot * b->buf_size;
}

static int blk_open(struct blk *b, unsigned slots, uint32_t buf_size)
{
	if (vdev_open(&b->dev, VIRTIO_ID_BLOCK,
		      1ULL << VIRTIO_BLK_F_RO | 1ULL << VIRTIO_BLK_F_FLUSH) ||
	    vq_setup(&b->q, &b->dev, 0, VQ_MAX_SIZE))
		return -1;
	if (b->q.size < 3 * slots)
		return fail("virtio-blk: queue of %u entries is too small for qd %u", b->q.size,
			    slots);
	b->slots = slots;
	b->buf_size = buf_size;
	b->capacity = vdev_config64(&b->dev, 0);
	b->hdr = dma_alloc(sizeof(struct blk_header) * slots, 64);
	b->status = dma_alloc(slots, 64);
	b->data = dma_alloc((uint64_t)slots * buf_size, 4096);
	if (!b->hdr || !b->status || !b->data)
		return -1;
	for (unsigned s = 0; s < slots; s++) {
		struct virtq_desc *d = &b->q.desc[3 * s];

		d[0].addr = (uintptr_t)&b->hdr[s];
		d[0].len = sizeof(struct blk_header);
		d[0].flags = VIRTQ_DESC_F_NEXT;
		d[0].next = (uint16_t)(3 * s + 1);
		d[1].addr = (uintptr_t)slot_data(b, s);
		d[1].next = (uint16_t)(3 * s + 2);
		d[2].addr = (uintptr_t)&b->status[s];
		d[2].len = 1;
		d[2].flags = VIRTQ_DESC_F_WRITE;
	}
	return vdev_start(&b->dev);
}

/* Posts a request in `slot` (not yet published: vq_kick does that). */
static void blk_post(struct blk *b, unsigned slot, uint32_t type, uint64_t sector, uint32_t len)
{
	struct virtq_desc *d = &b->q.desc[3 * slot];
	bool device_writes = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;

	b->hdr[slot].type = type;
	b->hdr[slot].reserved = 0;
	b->hdr[slot].sector = sector;
	b->status[slot] = STATUS_UNSET;
	d[0].next = (uint16_t)(len ? 3 * slot + 1 : 3 * slot + 2);
	d[1].len = len;
	d[1].flags = VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0);
	vq_post(&b->q, (uint16_t)(3 * slot));
}

/* The slot of a used element, or -1 (after fail()) if the id names none. */
static int used_slot(struct blk *b, uint32_t id)
{
	if (id % 3 || id / 3 >= b->slots)
		return fail("virtio-blk: used id %u is not a request head", id);
	return (int)(id / 3);
}

/* One request in slot 0, waited for; returns its status byte, or -1. */
static int blk_sync(struct blk *b, uint32_t type, uint64_t sector, uint32_t len)
{
	uint32_t id, used_len;

	blk_post(b, 0, type, sector, len);
	vq_kick(&b->q);
	if (vq_wait_used(&b->q, &id, &used_len) || used_slot(b, id) < 0)
		return -1;
	return b->status[0];
}

/* --- data patterns -------------------------------------------------------------- */

static void put_pattern(uint8_t *buf, uint64_t first_block, unsigned blocks, uint64_t magic)
{
	for (unsigned i = 0; i < blocks; i++) {
		uint64_t *w = (uint64_t *)(buf + (uint64_t)i * BLOCK);
		uint64_t v = (first_block + i) ^ magic;

		w[0] = v;
		w[BLOCK / 8 - 1] = ~v;
	}
}

static int check_pattern(const char *who, const uint8_t *buf, uint64_t first_block,
			 unsigned blocks)
{
	for (unsigned i = 0; i < blocks; i++) {
		const uint64_t *w = (const uint64_t *)(buf + (uint64_t)i * BLOCK);
		uint64_t want = first_block + i;

		if (w[0] != want || w[BLOCK / 8 - 1] != ~want)
			return fail("%s: block %lu holds 0x%lx/0x%lx, want 0x%lx/0x%lx", who, want,
				    w[0], w[BLOCK / 8 - 1], want, ~want);
	}
	return 0;
}

/* --- throughput ---------------------------------------------------------------- */

struct run {
	const char *who;
	uint32_t type;
	uint32_t len; /* bytes per request */
	uint64_t requests;
	uint64_t blocks; /* of the device, in 4 KiB blocks (random) or requests (seq) */
	bool random;
	uint64_t rng;
};

static uint64_t next_random(uint64_t *state)
{
	uint64_t x = *state; /* xorshift64* */

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

/* The 4 KiB block request number `i` starts at. */
static uint64_t request_block(struct run *r, uint64_t i)
{
	if (r->random)
		return next_random(&r->rng) % r->blocks;
	return i % r->blocks * (r->len / BLOCK);
}

static void post_request(struct blk *b, struct run *r, unsigned slot, uint64_t i)
{
	uint64_t block = request_block(r, i);

	b->tag[slot] = block;
	if (r->type == VIRTIO_BLK_T_OUT)
		put_pattern(slot_data(b, slot), block, r->len / BLOCK, BLK_WRITE_MAGIC);
	blk_post(b, slot, r->type, block * (BLOCK / SECTOR), r->len);
}

/* Keeps opt_qd requests in flight until r->requests are done; every read
 * is checked against the image pattern. Returns the elapsed TSC cycles. */
static int run_requests(struct blk *b, struct run *r, uint64_t *cycles)
{
	uint64_t issued = 0, done = 0, start = rdtsc();

	while (issued < r->requests && issued < b->slots) {
		post_request(b, r, (unsigned)issued, issued);
		issued++;
	}
	vq_kick(&b->q);
	while (done < r->requests) {
		uint32_t id, len;
		bool posted = false;

		if (vq_wait_used(&b->q, &id, &len))
			return -1;
		do {
			int slot = used_slot(b, id);

			if (slot < 0)
				return -1;
			if (b->status[slot] != VIRTIO_BLK_S_OK)
				return fail("%s: request at block %lu: status %s (%u)", r->who,
					    b->tag[slot], status_name(b->status[slot]),
					    b->status[slot]);
			if (r->type == VIRTIO_BLK_T_IN &&
			    check_pattern(r->who, slot_data(b, (unsigned)slot), b->tag[slot],
					  r->len / BLOCK))
				return -1;
			done++;
			if (issued < r->requests) {
				post_request(b, r, (unsigned)slot, issued);
				issued++;
				posted = true;
			}
		} while (vq_get_used(&b->q, &id, &len));
		if (posted)
			vq_kick(&b->q);
	}
	*cycles = rdtsc() - start;
	return 0;
}

static void report(const char *who, struct blk *b, uint64_t requests, uint64_t bytes, uint64_t us,
		   const char *extra)
{
	char mibs[32], iops[32];

	fmt_rate(mibs, sizeof(mibs), bytes, 1 << 20, us);
	fmt_rate(iops, sizeof(iops), requests, 1, us);
	kprintf("%s: %lu requests, %lu bytes, qd %u, %lu us%s, %s MiB/s, %s IOPS, %lu kicks\n", who,
		requests, bytes, b->slots, us, extra, mibs, iops, b->q.kicks);
}

static int sequential(const char *who, uint32_t type, uint64_t mib)
{
	struct blk b;
	struct run r = { .who = who, .type = type, .len = SEQ_REQUEST };
	uint64_t cycles, flush_cycles = 0;
	char extra[48] = "";

	if (blk_open(&b, opt_qd, SEQ_REQUEST))
		return -1;
	if (type == VIRTIO_BLK_T_OUT && vdev_has(&b.dev, VIRTIO_BLK_F_RO))
		return fail("%s: the drive is read-only", who);
	r.blocks = b.capacity / (SEQ_REQUEST / SECTOR);
	if (r.blocks == 0)
		return fail("%s: the drive (%lu sectors) is smaller than one request", who,
			    b.capacity);
	r.requests = mib * ((1 << 20) / SEQ_REQUEST);
	if (run_requests(&b, &r, &cycles))
		return -1;
	if (type == VIRTIO_BLK_T_OUT && vdev_has(&b.dev, VIRTIO_BLK_F_FLUSH)) {
		uint64_t t = rdtsc();
		int status = blk_sync(&b, VIRTIO_BLK_T_FLUSH, 0, 0);

		if (status < 0)
			return -1;
		if (status != VIRTIO_BLK_S_OK)
			return fail("%s: flush: status %s", who, status_name(status));
		flush_cycles = rdtsc() - t;
		cycles += flush_cycles;
		ksnprintf(extra, sizeof(extra), " (flush %lu us)", tsc_to_us(flush_cycles));
	}
	vdev_reset(&b.dev);
	report(who, &b, r.requests, r.requests * SEQ_REQUEST, tsc_to_us(cycles), extra);
	return 0;
}

int prog_blkread(uint64_t mib)
{
	return sequential("blkread", VIRTIO_BLK_T_IN, mib);
}

int prog_blkwrite(uint64_t mib)
{
	return sequential("blkwrite", VIRTIO_BLK_T_OUT, mib);
}

int prog_blkrand(uint64_t n)
{
	struct blk b;
	struct run r = { .who = "blkrand", .type = VIRTIO_BLK_T_IN, .len = BLOCK, .random = true };
	uint64_t cycles;

	if (blk_open(&b, opt_qd, BLOCK))
		return -1;
	r.blocks = b.capacity / (BLOCK / SECTOR);
	if (r.blocks == 0)
		return fail("blkrand: the drive (%lu sectors) is smaller than 4 KiB", b.capacity);
	r.requests = n;
	r.rng = 0x9E3779B97F4A7C15ULL ^ n;
	if (run_requests(&b, &r, &cycles))
		return -1;
	vdev_reset(&b.dev);
	report("blkrand", &b, n, n * BLOCK, tsc_to_us(cycles), "");
	return 0;
}

/* --- blkcheck --------------------------------------------------------------------- */

static int expect(const char *what, int status, int want)
{
	if (status < 0)
		return -1;
	if (status != want)
		return fail("blkcheck: %s: status %s (%d), want %s", what, status_name(status),
			    status, status_name(want));
	kprintf("blkcheck: %s: %s\n", what, status_name(status));
	return 0;
}

static int check_get_id(struct blk *b)
{
	char serial[21];
	uint8_t *data = slot_data(b, 0);
	int i;

	memset(data, 0, 20);
	if (expect("get-id", blk_sync(b, VIRTIO_BLK_T_GET_ID, 0, 20), VIRTIO_BLK_S_OK))
		return -1;
	for (i = 0; i < 20 && data[i]; i++)
		serial[i] = data[i] >= 0x20 && data[i] < 0x7F ? (char)data[i] : '?';
	serial[i] = '\0';
	kprintf("blkcheck: serial '%s'\n", serial);
	return 0;
}

/* Write the last 4 KiB block, read it back, then restore it. */
static int check_write(struct blk *b, uint8_t *saved)
{
	uint64_t sector = (b->capacity / 8 - 1) * 8;
	uint8_t *data = slot_data(b, 0);

	if (expect("read last block", blk_sync(b, VIRTIO_BLK_T_IN, sector, BLOCK),
		   VIRTIO_BLK_S_OK))
		return -1;
	memcpy(saved, data, BLOCK);
	for (int i = 0; i < BLOCK; i++)
		data[i] = (uint8_t)(i * 7 + 1);
	if (expect("write last block", blk_sync(b, VIRTIO_BLK_T_OUT, sector, BLOCK),
		   VIRTIO_BLK_S_OK))
		return -1;
	memset(data, 0, BLOCK);
	if (expect("read it back", blk_sync(b, VIRTIO_BLK_T_IN, sector, BLOCK), VIRTIO_BLK_S_OK))
		return -1;
	for (int i = 0; i < BLOCK; i++)
		if (data[i] != (uint8_t)(i * 7 + 1))
			return fail("blkcheck: byte %d of the written block reads back 0x%x", i,
				    data[i]);
	memcpy(data, saved, BLOCK);
	if (expect("restore it", blk_sync(b, VIRTIO_BLK_T_OUT, sector, BLOCK), VIRTIO_BLK_S_OK))
		return -1;
	kputs("blkcheck: write and read back ok");
	return 0;
}

/* A write must fail, and block 0 must read back as before. */
static int check_read_only(struct blk *b, uint8_t *saved)
{
	uint8_t *data = slot_data(b, 0);

	if (expect("read block 0", blk_sync(b, VIRTIO_BLK_T_IN, 0, BLOCK), VIRTIO_BLK_S_OK))
		return -1;
	memcpy(saved, data, BLOCK);
	for (int i = 0; i < BLOCK; i++)
		data[i] = (uint8_t)~saved[i];
	if (expect("write to read-only drive", blk_sync(b, VIRTIO_BLK_T_OUT, 0, BLOCK),
		   VIRTIO_BLK_S_IOERR))
		return -1;
	if (expect("read block 0 again", blk_sync(b, VIRTIO_BLK_T_IN, 0, BLOCK), VIRTIO_BLK_S_OK))
		return -1;
	if (memcmp(data, saved, BLOCK))
		return fail("blkcheck: block 0 changed after a refused write");
	kputs("blkcheck: read-only ok");
	return 0;
}

int prog_blkcheck(uint64_t arg)
{
	struct blk b;
	uint8_t *saved;
	bool ro;

	(void)arg;
	if (blk_open(&b, 1, BLOCK))
		return -1;
	saved = dma_alloc(BLOCK, 4096);
	if (!saved)
		return -1;
	ro = vdev_has(&b.dev, VIRTIO_BLK_F_RO);
	kprintf("blkcheck: 0x%lx, capacity %lu sectors, features 0x%lx, %s\n", b.dev.base,
		b.capacity, b.dev.features, ro ? "read-only" : "read-write");
	if (b.capacity < 8)
		return fail("blkcheck: the drive (%lu sectors) is smaller than 4 KiB", b.capacity);
	if (check_get_id(&b))
		return -1;
	if (expect("read beyond capacity", blk_sync(&b, VIRTIO_BLK_T_IN, b.capacity, SECTOR),
		   VIRTIO_BLK_S_IOERR) ||
	    expect("read across the end", blk_sync(&b, VIRTIO_BLK_T_IN, b.capacity - 1, BLOCK),
		   VIRTIO_BLK_S_IOERR) ||
	    expect("unknown request type", blk_sync(&b, 0xFF, 0, 0), VIRTIO_BLK_S_UNSUPP))
		return -1;
	if (ro ? check_read_only(&b, saved) : check_write(&b, saved))
		return -1;
	if (vdev_has(&b.dev, VIRTIO_BLK_F_FLUSH)) {
		if (expect("flush", blk_sync(&b, VIRTIO_BLK_T_FLUSH, 0, 0), VIRTIO_BLK_S_OK))
			return -1;
	} else {
		kputs("blkcheck: flush: not offered");
	}
	vdev_reset(&b.dev);
	kputs("blkcheck: ok");
	return 0;
}
