/*
 * Frames on the host connection: reading, queueing, writing (PROTOCOL.md,
 * "Frames"), plus the small helpers every handler needs.
 *
 * The socket is non-blocking throughout, because while a command runs the
 * agent must read the host's stdin frames, read the command's pipes and write
 * its output in one poll loop; the blocking helpers (conn_flush,
 * conn_wait_frame) poll for that one socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define READ_SIZE (128u << 10)

void die(const char *fmt, ...)
{
	va_list ap;

	fputs(AGENT_NAME ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p)
		die("out of memory (%zu bytes)", n);
	return p;
}

void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p)
		die("out of memory (%zu bytes)", n);
	return p;
}

char *xstrndup(const unsigned char *p, size_t n)
{
	char *s = xmalloc(n + 1);

	memcpy(s, p, n);
	s[n] = '\0';
	return s;
}

void put_u16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
}

void put_u32(unsigned char *p, uint32_t v)
{
	put_u16(p, (uint16_t)(v >> 16));
	put_u16(p + 2, (uint16_t)v);
}

void put_u64(unsigned char *p, uint64_t v)
{
	put_u32(p, (uint32_t)(v >> 32));
	put_u32(p + 4, (uint32_t)v);
}

uint16_t get_u16(const unsigned char *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

uint32_t get_u32(const unsigned char *p)
{
	return ((uint32_t)get_u16(p) << 16) | get_u16(p + 2);
}

uint64_t get_u64(const unsigned char *p)
{
	return ((uint64_t)get_u32(p) << 32) | get_u32(p + 4);
}

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void conn_init(struct conn *c, int fd)
{
	memset(c, 0, sizeof(*c));
	c->fd = fd;
}

/* One read() into the input buffer: >0 bytes read, 0 end of stream, -1 nothing yet. */
int conn_read(struct conn *c)
{
	ssize_t n;

	if (c->eof)
		return 0;
	if (c->in_cap - c->in_len < READ_SIZE) {
		c->in_cap = c->in_len + READ_SIZE;
		c->in = xrealloc(c->in, c->in_cap);
	}
	n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
	if (n > 0) {
		c->in_len += (size_t)n;
		return (int)n;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return -1;
	c->eof = 1; /* EOF, or a reset connection: the host is gone either way */
	return 0;
}

/* 1 and *f if a whole frame is buffered, 0 if not yet, -1 if the header is invalid. */
int conn_peek(struct conn *c, struct frame *f)
{
	uint32_t len;

	if (c->in_len < FRAME_HEADER)
		return 0;
	len = get_u32(c->in);
	if (len > MAX_REQUEST_PAYLOAD || c->in[5] || c->in[6] || c->in[7])
		return -1;
	if (c->in_len - FRAME_HEADER < len)
		return 0;
	f->type = c->in[4];
	f->payload = c->in + FRAME_HEADER;
	f->len = len;
	return 1;
}

/* Drop the frame at the head of the input buffer (the one conn_peek returned). */
void conn_consume(struct conn *c)
{
	size_t used = FRAME_HEADER + get_u32(c->in);

	memmove(c->in, c->in + used, c->in_len - used);
	c->in_len -= used;
	if (c->in_cap > (8u << 20) && c->in_len < READ_SIZE) { /* shrink after a huge EXEC */
		c->in_cap = READ_SIZE * 2;
		c->in = xrealloc(c->in, c->in_cap);
	}
}

void conn_queue(struct conn *c, unsigned type, const void *payload, size_t len)
{
	unsigned char *p;

	if (c->out_off && c->out_off + c->out_len + FRAME_HEADER + len > c->out_cap) {
		memmove(c->out, c->out + c->out_off, c->out_len);
		c->out_off = 0;
	}
	if (c->out_off + c->out_len + FRAME_HEADER + len > c->out_cap) {
		c->out_cap = c->out_len + FRAME_HEADER + len + 4096;
		c->out = xrealloc(c->out, c->out_cap);
	}
	p = c->out + c->out_off + c->out_len;
	put_u32(p, (uint32_t)len);
	p[4] = (unsigned char)type;
	p[5] = p[6] = p[7] = 0;
	if (len)
		memcpy(p + FRAME_HEADER, payload, len);
	c->out_len += FRAME_HEADER + len;
}

void conn_queue_error(struct conn *c, int kind, int err, const char *fmt, ...)
{
	unsigned char msg[8 + MAX_ERROR_TEXT + 1];
	va_list ap;
	int n;

	msg[0] = (unsigned char)kind;
	msg[1] = msg[2] = msg[3] = 0;
	put_u32(msg + 4, (uint32_t)err);
	va_start(ap, fmt);
	n = vsnprintf((char *)msg + 8, MAX_ERROR_TEXT + 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > MAX_ERROR_TEXT)
		n = MAX_ERROR_TEXT;
	conn_queue(c, A_ERROR, msg, 8 + (size_t)n);
}

/* Write what the socket takes now: 0 (maybe partially), -1 if the host is gone. */
int conn_write(struct conn *c)
{
	while (c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_off, c->out_len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 0;
			c->eof = 1;
			return -1;
		}
		c->out_off += (size_t)n;
		c->out_len -= (size_t)n;
	}
	c->out_off = 0;
	return 0;
}

/* Write everything queued, waiting as needed; -1 if the host is gone. */
int conn_flush(struct conn *c)
{
	struct pollfd p = {.fd = c->fd, .events = POLLOUT};

	for (;;) {
		if (conn_write(c))
			return -1;
		if (!c->out_len)
			return 0;
		if (poll(&p, 1, -1) < 0 && errno != EINTR)
			return -1;
	}
}

/* Flush, then wait for a whole frame: 1 and *f, 0 when the host closed, -1 on a bad header. */
int conn_wait_frame(struct conn *c, struct frame *f)
{
	struct pollfd p = {.fd = c->fd, .events = POLLIN};

	if (conn_flush(c))
		return 0;
	for (;;) {
		int r = conn_peek(c, f);

		if (r)
			return r;
		r = conn_read(c);
		if (r == 0)
			return 0;
		if (r < 0 && poll(&p, 1, -1) < 0 && errno != EINTR)
			return 0;
	}
}

/* The next field of a request: 1 and its tag/value, 0 at the end, -1 if truncated. */
int field_next(struct fields *it, unsigned *tag, const unsigned char **value, uint32_t *len)
{
	if (!it->left)
		return 0;
	if (it->left < 5)
		return -1;
	*tag = it->p[0];
	*len = get_u32(it->p + 1);
	if (*len > it->left - 5)
		return -1;
	*value = it->p + 5;
	it->p += 5 + *len;
	it->left -= 5 + (size_t)*len;
	return 1;
}

/* A field's bytes as a C string; -1 if they hold a NUL (which would cut the string). */
int field_string(const unsigned char *value, uint32_t len, char **out)
{
	if (memchr(value, '\0', len))
		return -1;
	*out = xstrndup(value, len);
	return 0;
}
