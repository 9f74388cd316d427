/*
 * vsock.c - vsockecho=PORT: a polling virtio-vsock stream listener that
 * echoes what it receives, so host programs can exercise the hybrid vsock
 * (a Unix socket plus "CONNECT <port>\n" / "OK <port>\n") end to end
 * without a Linux guest - Kata Containers' handshake with its agent, for
 * instance.
 *
 * Packets (virtio 1.2, 5.10.6): a 44-byte little-endian header, then the
 * payload. The guest accepts every connection request to PORT (OP_RESPONSE),
 * refuses others (OP_RST), echoes OP_RW payloads back, answers
 * OP_CREDIT_REQUEST, and answers OP_SHUTDOWN with OP_RST. It advertises a
 * 64 KiB receive buffer and counts what it consumed (fwd_cnt), so the
 * device's credit accounting stays right. It never ends on its own: the
 * VMM stops it (like `counter`). Each accepted connection and each echo is
 * reported: `vsock: connection from port S`, `vsock: echoed N bytes`.
 */
#include "virtio.h"

#define VIRTIO_ID_VSOCK 19
#define VSOCK_RX 0
#define VSOCK_TX 1
#define VSOCK_EVENT 2
#define VSOCK_BUF 4096
#define VSOCK_HDR 44
#define VSOCK_RX_BUFS 32
#define VSOCK_BUF_ALLOC (64 * 1024)

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1

struct vsock_hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct vsock {
	struct vdev dev;
	struct virtq rx, tx, event;
	uint8_t *rx_bufs, *tx_buf;
	uint64_t cid;
	uint32_t fwd_cnt;
};

static int vsock_open(struct vsock *v)
{
	if (vdev_open(&v->dev, VIRTIO_ID_VSOCK, 0) ||
	    vq_setup(&v->rx, &v->dev, VSOCK_RX, VSOCK_RX_BUFS) ||
	    vq_setup(&v->tx, &v->dev, VSOCK_TX, 8) ||
	    vq_setup(&v->event, &v->dev, VSOCK_EVENT, 8))
		return -1;
	v->cid = vdev_config64(&v->dev, 0);
	v->fwd_cnt = 0;
	v->rx_bufs = dma_alloc((uint64_t)v->rx.size * VSOCK_BUF, 4096);
	v->tx_buf = dma_alloc(VSOCK_BUF, 4096);
	if (!v->rx_bufs || !v->tx_buf)
		return -1;
	for (unsigned i = 0; i < v->rx.size; i++) {
		v->rx.desc[i].addr = (uintptr_t)(v->rx_bufs + (uint64_t)i * VSOCK_BUF);
		v->rx.desc[i].len = VSOCK_BUF;
		v->rx.desc[i].flags = VIRTQ_DESC_F_WRITE;
	}
	v->tx.desc[0].addr = (uintptr_t)v->tx_buf;
	if (vdev_start(&v->dev))
		return -1;
	for (unsigned i = 0; i < v->rx.size; i++)
		vq_post(&v->rx, (uint16_t)i);
	vq_kick(&v->rx);
	return 0;
}

/* Sends one packet answering `to` (ports swapped) and waits until the device took it. */
static int vsock_send(struct vsock *v, const struct vsock_hdr *to, uint16_t op,
		      const uint8_t *data, uint32_t len)
{
	struct vsock_hdr h = {
		.src_cid = v->cid, .dst_cid = to->src_cid,
		.src_port = to->dst_port, .dst_port = to->src_port,
		.len = len, .type = TYPE_STREAM, .op = op,
		.buf_alloc = VSOCK_BUF_ALLOC, .fwd_cnt = v->fwd_cnt,
	};
	uint32_t id, used;

	memcpy(v->tx_buf, &h, VSOCK_HDR);
	if (len)
		memcpy(v->tx_buf + VSOCK_HDR, data, len);
	v->tx.desc[0].len = VSOCK_HDR + len;
	v->tx.desc[0].flags = 0;
	vq_post(&v->tx, 0);
	vq_kick(&v->tx);
	return vq_wait_used(&v->tx, &id, &used);
}

static int vsock_handle(struct vsock *v, const uint8_t *buf, uint32_t port)
{
	struct vsock_hdr h;

	memcpy(&h, buf, VSOCK_HDR);
	switch (h.op) {
	case OP_REQUEST:
		if (h.dst_port != port)
			return vsock_send(v, &h, OP_RST, NULL, 0);
		kprintf("vsock: connection from port %u\n", h.src_port);
		return vsock_send(v, &h, OP_RESPONSE, NULL, 0);
	case OP_RW:
		if (h.len > VSOCK_BUF - VSOCK_HDR)
			return fail("vsockecho: a %u-byte packet in a %u-byte buffer", h.len,
				    VSOCK_BUF);
		v->fwd_cnt += h.len;
		kprintf("vsock: echoed %u bytes\n", h.len);
		return vsock_send(v, &h, OP_RW, buf + VSOCK_HDR, h.len);
	case OP_CREDIT_REQUEST:
		return vsock_send(v, &h, OP_CREDIT_UPDATE, NULL, 0);
	case OP_SHUTDOWN:
		kprintf("vsock: closed by port %u\n", h.src_port);
		return vsock_send(v, &h, OP_RST, NULL, 0);
	default: /* OP_RESPONSE, OP_RST, OP_CREDIT_UPDATE: nothing to answer */
		return 0;
	}
}

int prog_vsockecho(uint64_t port)
{
	struct vsock v;

	if (vsock_open(&v))
		return -1;
	kprintf("vsock: cid %lu, listening on port %lu\n", v.cid, port);
	uart_flush();
	for (;;) {
		uint32_t id, len;

		if (!vq_get_used(&v.rx, &id, &len)) {
			cpu_relax();
			continue;
		}
		if (id >= v.rx.size || len < VSOCK_HDR || len > VSOCK_BUF)
			return fail("vsockecho: bad used element id %u len %u", id, len);
		if (vsock_handle(&v, v.rx_bufs + (uint64_t)id * VSOCK_BUF, (uint32_t)port))
			return -1;
		vq_post(&v.rx, (uint16_t)id);
		vq_kick(&v.rx);
	}
}
