/*
 * vnet.c - virtio-net programs: nettx (guest -> host) and netrx (host ->
 * guest), frames counted and timed in the guest.
 *
 * Probe frames: a zeroed 12-byte virtio_net_hdr_v1, then Ethernet with
 * EtherType 0x88B5 (IEEE "local experimental"), then the payload "PRBE",
 * u32 sequence number (little-endian), filler bytes. Sequence 0xFFFFFFFF
 * is the end marker a host sender uses to stop netrx early.
 *
 * Every buffer is one descriptor of 2 KiB (no MRG_RXBUF: a full 1514-byte
 * frame plus the header fits), so a used id is the buffer's index.
 *
 * netrx waits for a console line before it posts its buffers: the host
 * queues its frames on the TAP meanwhile (raise txqueuelen for many), so
 * the time measured is the VMM draining them, with no sender competing for
 * host CPU.
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define NET_HDR 12
#define ETH_HDR 14
#define ETHERTYPE_PROBE 0x88B5
#define SEQ_END 0xFFFFFFFFu
#define NET_BUF 2048
#define RX_QUEUE 0
#define TX_QUEUE 1

struct net {
	struct vdev dev;
	struct virtq rx, tx;
	uint8_t mac[6];
	uint8_t *rx_bufs, *tx_bufs;
};

static uint8_t *buf_at(uint8_t *bufs, uint32_t i)
{
	return bufs + (uint64_t)i * NET_BUF;
}

static int net_open(struct net *n)
{
	static const uint8_t fallback[6] = { 0x02, 0, 0, 0, 0, 0x01 };

	if (vdev_open(&n->dev, VIRTIO_ID_NET, 1ULL << VIRTIO_NET_F_MAC) ||
	    vq_setup(&n->rx, &n->dev, RX_QUEUE, VQ_MAX_SIZE) ||
	    vq_setup(&n->tx, &n->dev, TX_QUEUE, VQ_MAX_SIZE))
		return -1;
	for (int i = 0; i < 6; i++)
		n->mac[i] = vdev_has(&n->dev, VIRTIO_NET_F_MAC) ? vdev_config8(&n->dev, i) :
								     fallback[i];
	n->rx_bufs = dma_alloc((uint64_t)n->rx.size * NET_BUF, 4096);
	n->tx_bufs = dma_alloc((uint64_t)n->tx.size * NET_BUF, 4096);
	if (!n->rx_bufs || !n->tx_bufs)
		return -1;
	for (unsigned i = 0; i < n->rx.size; i++) {
		n->rx.desc[i].addr = (uintptr_t)buf_at(n->rx_bufs, i);
		n->rx.desc[i].len = NET_BUF;
		n->rx.desc[i].flags = VIRTQ_DESC_F_WRITE;
	}
	for (unsigned i = 0; i < n->tx.size; i++)
		n->tx.desc[i].addr = (uintptr_t)buf_at(n->tx_bufs, i);
	if (vdev_start(&n->dev))
		return -1;
	kprintf("net: 0x%lx, mac %02x:%02x:%02x:%02x:%02x:%02x, queues %u/%u\n", n->dev.base,
		n->mac[0], n->mac[1], n->mac[2], n->mac[3], n->mac[4], n->mac[5], n->rx.size,
		n->tx.size);
	return 0;
}

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void report(const char *line_start, uint64_t frames, uint64_t bytes, uint64_t us,
		   const char *extra, uint64_t kicks)
{
	char pps[32], mibs[32];

	fmt_rate(pps, sizeof(pps), frames, 1, us);
	fmt_rate(mibs, sizeof(mibs), bytes, 1 << 20, us);
	kprintf("%s, %lu bytes, %lu us, %s pps, %s MiB/s%s, %lu kicks\n", line_start, bytes, us,
		pps, mibs, extra, kicks);
}

/* --- nettx ------------------------------------------------------------------------ */

int prog_nettx(uint64_t count)
{
	struct net n;
	uint16_t free_list[VQ_MAX_SIZE];
	unsigned nfree = 0, len = opt_len;
	uint64_t sent = 0, done = 0, start, end;
	char line[64];

	if (net_open(&n))
		return -1;
	for (unsigned i = 0; i < n.tx.size; i++) {
		uint8_t *f = buf_at(n.tx_bufs, i) + NET_HDR;

		memset(f - NET_HDR, 0, NET_HDR);
		memset(f, 0xFF, 6); /* broadcast */
		memcpy(f + 6, n.mac, 6);
		f[12] = ETHERTYPE_PROBE >> 8;
		f[13] = ETHERTYPE_PROBE & 0xFF;
		memcpy(f + ETH_HDR, "PRBE", 4);
		for (unsigned j = ETH_HDR + 8; j < len; j++)
			f[j] = (uint8_t)(i + j);
		n.tx.desc[i].len = NET_HDR + len;
		n.tx.desc[i].flags = 0;
		free_list[nfree++] = (uint16_t)(n.tx.size - 1 - i);
	}
	start = rdtsc();
	end = deadline_us(VQ_TIMEOUT_US);
	while (done < count) {
		uint32_t id, used_len;
		bool posted = false, progress = false;

		while (vq_get_used(&n.tx, &id, &used_len)) {
			if (id >= n.tx.size || nfree >= n.tx.size)
				return fail("nettx: bad used id %u (%u free, %lu sent, %lu done, used "
					    "idx %u)",
					    id, nfree, sent, done, n.tx.used->idx);
			free_list[nfree++] = (uint16_t)id;
			done++;
			progress = true;
		}
		while (nfree && sent < count) {
			uint16_t d = free_list[--nfree];

			put_u32(buf_at(n.tx_bufs, d) + NET_HDR + ETH_HDR + 4, (uint32_t)sent);
			vq_post(&n.tx, d);
			sent++;
			posted = true;
		}
		if (posted)
			vq_kick(&n.tx);
		if (progress || posted) {
			end = deadline_us(VQ_TIMEOUT_US);
		} else {
			cpu_relax();
			if (expired(end))
				return fail("nettx: no frame completed within %u s (%lu of %lu done)",
					    VQ_TIMEOUT_US / 1000000, done, count);
		}
	}
	uint64_t us = tsc_to_us(rdtsc() - start);

	vdev_reset(&n.dev);
	ksnprintf(line, sizeof(line), "nettx: %lu frames of %u", count, len);
	report(line, count, count * len, us, "", n.tx.kicks);
	return 0;
}

/* --- netrx ------------------------------------------------------------------------ */

int prog_netrx(uint64_t count)
{
	struct net n;
	uint64_t got = 0, bytes = 0, other = 0, lost = 0, start, last = 0, end;
	uint32_t expect_seq = 0;
	bool stop = false;
	char line[64], extra[64];

	if (net_open(&n))
		return -1;
	/* The host queues its frames on the TAP meanwhile: none can arrive
	 * before the buffers are posted, so the time below is the VMM's alone. */
	kputs("netrx: ready");
	while (uart_getc() != '\n')
		;
	for (unsigned i = 0; i < n.rx.size; i++)
		vq_post(&n.rx, (uint16_t)i);
	start = rdtsc();
	vq_kick(&n.rx);
	end = deadline_us(VQ_TIMEOUT_US);
	while (!stop) {
		uint32_t id, len;
		bool posted = false;

		while (!stop && vq_get_used(&n.rx, &id, &len)) {
			if (id >= n.rx.size || len > NET_BUF)
				return fail("netrx: bad used element id %u len %u", id, len);
			const uint8_t *f = buf_at(n.rx_bufs, id) + NET_HDR;
			uint32_t flen = len >= NET_HDR ? len - NET_HDR : 0;

			if (flen >= ETH_HDR + 8 && f[12] == ETHERTYPE_PROBE >> 8 &&
			    f[13] == (ETHERTYPE_PROBE & 0xFF) && !memcmp(f + ETH_HDR, "PRBE", 4)) {
				uint32_t seq = get_u32(f + ETH_HDR + 4);

				if (seq == SEQ_END) {
					stop = true;
				} else {
					last = rdtsc();
					got++;
					bytes += flen;
					if (seq > expect_seq)
						lost += seq - expect_seq;
					expect_seq = seq + 1;
					stop = got == count;
				}
			} else {
				other++;
			}
			vq_post(&n.rx, (uint16_t)id);
			posted = true;
		}
		if (posted) {
			vq_kick(&n.rx);
			end = deadline_us(VQ_TIMEOUT_US);
		} else {
			cpu_relax();
			if (expired(end))
				return fail("netrx: no frame for %u s (%lu of %lu received)",
					    VQ_TIMEOUT_US / 1000000, got, count);
		}
	}
	uint64_t us = got ? tsc_to_us(last - start) : 0;

	vdev_reset(&n.dev);
	ksnprintf(line, sizeof(line), "netrx: %lu of %lu frames", got, count);
	ksnprintf(extra, sizeof(extra), ", lost %lu, other %lu", lost, other);
	report(line, got, bytes, us, extra, n.rx.kicks);
	return 0;
}
