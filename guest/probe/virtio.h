/*
 * virtio.h - the probe's polling virtio driver: virtio-mmio v2 transport,
 * split virtqueues in a fixed DMA region, and the device programs built on
 * them (vblk.c, vnet.c, the rng program in virtio.c).
 *
 * Everything runs in CPL3. No interrupts: each queue's avail ring carries
 * VIRTQ_AVAIL_F_NO_INTERRUPT and the driver polls the used ring. Kicks
 * (QueueNotify writes, one VM exit each) are batched: post many buffers,
 * publish the avail index once, notify once, and only if the device did not
 * set VIRTQ_USED_F_NO_NOTIFY.
 */
#ifndef PROBE_VIRTIO_H
#define PROBE_VIRTIO_H

#include "probe.h"

/* --- guest RAM the devices may read and write ----------------------------- */
/* From 16 MiB, well above the probe image (which ends below 8 MiB); every
 * program starts allocating from the bottom again (dma_reset). */
#define DMA_BASE 0x1000000UL
#define DMA_SIZE 0x1000000UL /* 16 MiB: the guest needs >= 32 MiB of RAM */

void dma_reset(void);
/* Zeroed memory aligned to `align` (a power of two), or NULL (after fail()). */
void *dma_alloc(uint64_t size, uint64_t align);

/* --- virtio-mmio registers (virtio 1.2, 4.2.2) ---------------------------- */
#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_VENDOR_ID 0x00C
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0A0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0A4
#define VMMIO_CONFIG_GENERATION 0x0FC
#define VMMIO_CONFIG 0x100

#define VSTATUS_ACKNOWLEDGE 0x01
#define VSTATUS_DRIVER 0x02
#define VSTATUS_DRIVER_OK 0x04
#define VSTATUS_FEATURES_OK 0x08
#define VSTATUS_NEEDS_RESET 0x40
#define VSTATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 32

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4

/* --- split virtqueue (virtio 1.2, 2.7) --------------------------------------- */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[];
};

#define VQ_MAX_SIZE 256 /* we never ask for more */
#define VQ_TIMEOUT_US 10000000 /* a completion later than this is a device bug */

struct vdev {
	uint64_t base; /* virtio-mmio window */
	uint32_t irq; /* from the command line, 0 when found by scanning */
	uint32_t device_id;
	uint64_t offered; /* device features */
	uint64_t features; /* negotiated */
	const char *name; /* for messages: "virtio-blk" ... */
};

struct virtq {
	struct vdev *dev;
	uint16_t index;
	uint16_t size;
	struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t next_avail; /* shadow of avail->idx: entries posted, maybe not published */
	uint16_t last_used; /* next used entry to consume */
	uint64_t kicks; /* QueueNotify writes */
	uint64_t kicks_saved; /* notifications skipped thanks to NO_NOTIFY */
};

/* Finds the first device of `device_id` (command line first, then a scan of
 * the pyvmm and QEMU microvm windows), resets it and negotiates features:
 * VERSION_1 plus those of `wanted` the device offers. 0, or fail(). */
int vdev_open(struct vdev *dev, uint32_t device_id, uint64_t wanted);
/* Sets up queue `index` with min(QueueNumMax, max_size) entries (a power of
 * two) in DMA memory. 0, or fail(). */
int vq_setup(struct virtq *q, struct vdev *dev, unsigned index, unsigned max_size);
/* DRIVER_OK; checks the device took it. 0, or fail(). */
int vdev_start(struct vdev *dev);
/* Writes 0 to Status: the device lets go of the rings and buffers. */
void vdev_reset(struct vdev *dev);

static inline uint32_t vdev_read(const struct vdev *dev, uint32_t reg)
{
	return mmio_read32(dev->base + reg);
}

static inline void vdev_write(const struct vdev *dev, uint32_t reg, uint32_t v)
{
	mmio_write32(dev->base + reg, v);
}

static inline bool vdev_has(const struct vdev *dev, unsigned feature)
{
	return dev->features >> feature & 1;
}

uint8_t vdev_config8(const struct vdev *dev, uint32_t off);
uint32_t vdev_config32(const struct vdev *dev, uint32_t off);
uint64_t vdev_config64(const struct vdev *dev, uint32_t off);

/* Puts the chain at `head` in the avail ring, unpublished. */
static inline void vq_post(struct virtq *q, uint16_t head)
{
	q->avail->ring[q->next_avail & (q->size - 1)] = head;
	q->next_avail++;
}

/* Publishes what vq_post() added and notifies the device if it wants that. */
void vq_kick(struct virtq *q);

/* Takes the next used element; false when there is none. */
static inline bool vq_get_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
	if (q->used->idx == q->last_used)
		return false;
	barrier(); /* the element after the index (loads stay in order on x86) */
	volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];

	*id = e->id;
	*len = e->len;
	q->last_used++;
	return true;
}

/* Waits up to VQ_TIMEOUT_US for a used element; 0, or fail(). */
int vq_wait_used(struct virtq *q, uint32_t *id, uint32_t *len);

/* "X.Y": `amount` / `unit` per second, given it took `us` microseconds
 * (amount < 2^40). */
void fmt_rate(char *buf, size_t size, uint64_t amount, uint64_t unit, uint64_t us);

#endif
