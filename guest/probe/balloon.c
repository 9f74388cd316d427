/*
 * balloon.c - balloon=N: a polling virtio-balloon driver, so a test can see
 * the host get memory back (virtio 1.2, 5.5) without a Linux guest.
 *
 * It touches N MiB of guest RAM from 64 MiB up (one write per 4 KiB page:
 * the host now backs them), prints `balloon: touched N MiB`, then polls the
 * device's num_pages target (the host changes it with PATCH /balloon) and
 * inflates towards it, at most N MiB, from those pages: page frame numbers,
 * 256 per buffer, on the inflate queue. Each time it reaches the target it
 * writes `actual` and prints `balloon: inflated P pages`. It never ends on
 * its own (the VMM stops it). The VM needs 64 + N MiB of RAM.
 */
#include "virtio.h"

#define VIRTIO_ID_BALLOON 5
#define BALLOON_BASE 0x4000000UL /* 64 MiB: above the probe and its DMA region */
#define PFNS_PER_BUF 256
#define PAGE_4K 4096UL

int prog_balloon(uint64_t mib)
{
	struct vdev dev;
	struct virtq inflate, deflate;
	uint32_t *pfns;
	uint64_t pages = mib * 256, given = 0;

	if (vdev_open(&dev, VIRTIO_ID_BALLOON, 0) || vq_setup(&inflate, &dev, 0, 8) ||
	    vq_setup(&deflate, &dev, 1, 8))
		return -1;
	pfns = dma_alloc(PFNS_PER_BUF * sizeof(uint32_t), 4096);
	if (!pfns || vdev_start(&dev))
		return -1;
	inflate.desc[0].addr = (uintptr_t)pfns;
	for (uint64_t p = 0; p < pages; p++)
		*(volatile uint8_t *)(BALLOON_BASE + p * PAGE_4K) = (uint8_t)(p | 1);
	kprintf("balloon: touched %lu MiB\n", mib);
	uart_flush();
	for (;;) {
		uint64_t target = vdev_config32(&dev, 0);
		uint32_t id, len;
		unsigned n = 0;

		if (target > pages)
			target = pages;
		if (given >= target) {
			for (int i = 0; i < 100000; i++)
				cpu_relax();
			continue;
		}
		while (given < target && n < PFNS_PER_BUF)
			pfns[n++] = (uint32_t)((BALLOON_BASE >> 12) + given++);
		inflate.desc[0].len = n * sizeof(uint32_t);
		inflate.desc[0].flags = 0;
		vq_post(&inflate, 0);
		vq_kick(&inflate);
		if (vq_wait_used(&inflate, &id, &len))
			return -1;
		if (given == target) {
			vdev_write(&dev, VMMIO_CONFIG + 4, (uint32_t)given); /* actual */
			kprintf("balloon: inflated %lu pages\n", given);
			uart_flush();
		}
	}
}
