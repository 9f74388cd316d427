/*
 * A streaming tar writer and reader for the dialect in tar.h. Streaming,
 * because a GET or PUT can be larger than the guest's memory: the reader is
 * fed whatever a DATA frame carries and hands file bytes on as they come.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "tar.h"

#define NAME_FIELD 100
#define LONG_LINK_NAME "././@LongLink"

/* Header field offsets and widths (POSIX ustar). */
enum {
	OFF_NAME = 0,
	OFF_MODE = 100,
	OFF_UID = 108,
	OFF_GID = 116,
	OFF_SIZE = 124,
	OFF_MTIME = 136,
	OFF_CHKSUM = 148,
	OFF_TYPE = 156,
	OFF_LINK = 157,
	OFF_MAGIC = 257,
	OFF_PREFIX = 345,
};

/* --- writing --------------------------------------------------------------- */

/* Octal with a NUL when it fits in width-1 digits, else GNU base-256. */
static void put_number(unsigned char *field, size_t width, uint64_t value)
{
	if (width < 12 ? value < (1ull << (3 * (width - 1))) : value < (1ull << 33)) {
		snprintf((char *)field, width, "%0*llo", (int)width - 1, (unsigned long long)value);
		return;
	}
	memset(field, 0, width);
	field[0] = 0x80;
	for (size_t i = width - 1; i > 0 && value; i--, value >>= 8)
		field[i] = (unsigned char)value;
}

static void finish_header(unsigned char *h)
{
	unsigned sum = 0;

	memset(h + OFF_CHKSUM, ' ', 8);
	for (int i = 0; i < TAR_BLOCK; i++)
		sum += h[i];
	snprintf((char *)h + OFF_CHKSUM, 8, "%06o", sum);
	h[OFF_CHKSUM + 7] = ' ';
}

static int emit_header(tar_sink sink, void *ctx, const char *name, char type, mode_t mode,
		       uint64_t size, int64_t mtime, const char *link)
{
	unsigned char h[TAR_BLOCK];

	memset(h, 0, sizeof(h));
	memcpy(h + OFF_NAME, name, strnlen(name, NAME_FIELD));
	put_number(h + OFF_MODE, 8, mode & 07777);
	put_number(h + OFF_UID, 8, 0);
	put_number(h + OFF_GID, 8, 0);
	put_number(h + OFF_SIZE, 12, size);
	put_number(h + OFF_MTIME, 12, mtime < 0 ? 0 : (uint64_t)mtime);
	h[OFF_TYPE] = (unsigned char)type;
	if (link)
		memcpy(h + OFF_LINK, link, strnlen(link, NAME_FIELD));
	memcpy(h + OFF_MAGIC, "ustar  ", 8); /* GNU magic and version: "ustar  \0" */
	finish_header(h);
	return sink(ctx, h, sizeof(h));
}

int tar_write_padding(tar_sink sink, void *ctx, uint64_t size)
{
	static const unsigned char zeros[TAR_BLOCK];
	size_t pad = (size_t)((TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK);

	return pad ? sink(ctx, zeros, pad) : 0;
}

/* A GNU 'L' or 'K' member carrying a name too long for its 100-byte field. */
static int emit_long(tar_sink sink, void *ctx, char type, const char *text)
{
	size_t len = strlen(text) + 1; /* the NUL is part of the data, as GNU tar writes it */

	if (emit_header(sink, ctx, LONG_LINK_NAME, type, 0, len, 0, NULL) || sink(ctx, text, len))
		return -1;
	return tar_write_padding(sink, ctx, len);
}

int tar_write_header(tar_sink sink, void *ctx, const char *name, char type, mode_t mode,
		     uint64_t size, int64_t mtime, const char *link)
{
	if (strlen(name) > NAME_FIELD && emit_long(sink, ctx, 'L', name))
		return -1;
	if (link && strlen(link) > NAME_FIELD && emit_long(sink, ctx, 'K', link))
		return -1;
	return emit_header(sink, ctx, name, type, mode, size, mtime, link);
}

int tar_write_end(tar_sink sink, void *ctx)
{
	static const unsigned char zeros[2 * TAR_BLOCK];

	return sink(ctx, zeros, sizeof(zeros));
}

/* --- reading --------------------------------------------------------------- */

enum reader_state { R_HEADER, R_DATA, R_LONG, R_PAD, R_END };

struct tar_reader {
	struct tar_callbacks cb;
	void *ctx;
	enum reader_state state;
	unsigned char block[TAR_BLOCK];
	size_t have;    /* bytes in block (R_HEADER, R_END) */
	uint64_t size;  /* data size of the current member */
	uint64_t left;  /* its data bytes still to come (R_DATA, R_LONG) */
	uint64_t pad;   /* padding bytes still to come (R_PAD) */
	int is_file;    /* the data goes to cb.data (else it is skipped) */
	char long_type; /* 'L' or 'K' while reading one */
	char name[PATH_MAX + 1];
	char link[PATH_MAX + 1];
	size_t long_len;
	int have_name, have_link;
	char error[160];
};

struct tar_reader *tar_reader_new(const struct tar_callbacks *cb, void *ctx)
{
	struct tar_reader *r = xmalloc(sizeof(*r));

	memset(r, 0, sizeof(*r));
	r->cb = *cb;
	r->ctx = ctx;
	return r;
}

void tar_reader_free(struct tar_reader *r)
{
	free(r);
}

const char *tar_reader_error(const struct tar_reader *r)
{
	return r->error;
}

static int fail(struct tar_reader *r, const char *what)
{
	snprintf(r->error, sizeof(r->error), "%s", what);
	return -1;
}

/* An octal or positive base-256 number field; -1 if malformed. */
static int get_number(const unsigned char *field, size_t width, uint64_t *out)
{
	uint64_t v = 0;
	size_t i = 0;

	if (field[0] & 0x80) {
		if (field[0] != 0x80)
			return -1; /* negative (0xff...) or garbage */
		for (i = 1; i < width; i++) {
			if (v >> 56)
				return -1;
			v = (v << 8) | field[i];
		}
		*out = v;
		return 0;
	}
	while (i < width && field[i] == ' ')
		i++;
	for (; i < width && field[i] >= '0' && field[i] <= '7'; i++) {
		if (v >> 60)
			return -1;
		v = (v << 3) | (uint64_t)(field[i] - '0');
	}
	for (; i < width; i++)
		if (field[i] != ' ' && field[i] != '\0')
			return -1;
	*out = v;
	return 0;
}

static int checksum_ok(const unsigned char *h)
{
	uint64_t stored;
	unsigned sum = 0;

	if (get_number(h + OFF_CHKSUM, 8, &stored))
		return 0;
	for (int i = 0; i < TAR_BLOCK; i++)
		sum += (i >= OFF_CHKSUM && i < OFF_CHKSUM + 8) ? ' ' : h[i];
	return sum == stored;
}

static void field_text(char *dst, const unsigned char *src, size_t width)
{
	size_t n = strnlen((const char *)src, width);

	memcpy(dst, src, n);
	dst[n] = '\0';
}

static int is_zero_block(const unsigned char *h)
{
	for (int i = 0; i < TAR_BLOCK; i++)
		if (h[i])
			return 0;
	return 1;
}

/* After a member's data: its padding, then the next header. */
static void after_data(struct tar_reader *r)
{
	r->pad = (TAR_BLOCK - r->size % TAR_BLOCK) % TAR_BLOCK;
	r->state = r->pad ? R_PAD : R_HEADER;
}

/* The member's name: a GNU long name, or the header's name (with a POSIX prefix). */
static void member_name(struct tar_reader *r, const unsigned char *h)
{
	char prefix[156];

	if (r->have_name)
		return;
	field_text(r->name, h + OFF_NAME, NAME_FIELD);
	field_text(prefix, h + OFF_PREFIX, 155);
	if (prefix[0] && memcmp(h + OFF_MAGIC, "ustar\0", 6) == 0) {
		char joined[sizeof(prefix) + NAME_FIELD + 2];

		snprintf(joined, sizeof(joined), "%.155s/%.100s", prefix, r->name);
		memcpy(r->name, joined, strlen(joined) + 1);
	}
}

static int header(struct tar_reader *r)
{
	const unsigned char *h = r->block;
	struct tar_member m;
	uint64_t mode, size, mtime;
	char type = (char)h[OFF_TYPE];

	if (is_zero_block(h)) {
		r->state = R_END; /* end of archive: only zeros may follow */
		return 0;
	}
	if (!checksum_ok(h))
		return fail(r, "a tar header has a bad checksum");
	if (get_number(h + OFF_MODE, 8, &mode) || get_number(h + OFF_SIZE, 12, &size) ||
	    get_number(h + OFF_MTIME, 12, &mtime))
		return fail(r, "a tar header has a malformed number");
	r->size = size;
	if (type == 'L' || type == 'K') {
		if (size > PATH_MAX)
			return fail(r, "a tar long name is longer than PATH_MAX");
		r->long_type = type;
		r->long_len = 0;
		r->left = size;
		if (size)
			r->state = R_LONG;
		else
			after_data(r);
		return 0;
	}
	if (type == '\0')
		type = '0';
	if (type != '0' && type != '5' && type != '2')
		return fail(r, "a tar member is not a file, directory or symlink");
	member_name(r, h);
	if (!r->have_link)
		field_text(r->link, h + OFF_LINK, NAME_FIELD);
	r->have_name = r->have_link = 0;
	m.type = type;
	m.name = r->name;
	m.link = r->link;
	m.mode = (mode_t)(mode & 07777);
	m.size = type == '0' ? size : 0;
	m.mtime = mtime > INT64_MAX ? INT64_MAX : (int64_t)mtime;
	if (r->cb.member(r->ctx, &m))
		return -1;
	if (type == '2')
		r->size = size = 0; /* a symlink's size field carries nothing */
	r->is_file = type == '0';
	r->left = size;
	if (size) {
		r->state = R_DATA;
		return 0;
	}
	if (r->is_file && r->cb.end(r->ctx))
		return -1;
	r->state = R_HEADER;
	return 0;
}

int tar_reader_feed(struct tar_reader *r, const unsigned char *p, size_t n)
{
	while (n) {
		size_t take = n;

		switch (r->state) {
		case R_HEADER:
			if (take > TAR_BLOCK - r->have)
				take = TAR_BLOCK - r->have;
			memcpy(r->block + r->have, p, take);
			r->have += take;
			if (r->have == TAR_BLOCK) {
				r->have = 0;
				if (header(r))
					return -1;
			}
			break;
		case R_DATA:
			if (take > r->left)
				take = (size_t)r->left;
			if (r->is_file && r->cb.data(r->ctx, p, take))
				return -1;
			r->left -= take;
			if (!r->left) {
				if (r->is_file && r->cb.end(r->ctx))
					return -1;
				after_data(r);
			}
			break;
		case R_LONG:
			if (take > r->left)
				take = (size_t)r->left;
			memcpy((r->long_type == 'L' ? r->name : r->link) + r->long_len, p, take);
			r->long_len += take;
			r->left -= take;
			if (!r->left) {
				char *text = r->long_type == 'L' ? r->name : r->link;

				text[r->long_len] = '\0'; /* the stored NUL (if any) ends it earlier */
				if (r->long_type == 'L')
					r->have_name = 1;
				else
					r->have_link = 1;
				after_data(r);
			}
			break;
		case R_PAD:
			if (take > r->pad)
				take = (size_t)r->pad;
			r->pad -= take;
			if (!r->pad)
				r->state = R_HEADER;
			break;
		case R_END:
			for (size_t i = 0; i < n; i++)
				if (p[i])
					return fail(r, "data follows the tar end-of-archive block");
			break;
		}
		p += take;
		n -= take;
	}
	return 0;
}

/* The stream is complete only with its end-of-archive block: a host that
 * abandons a PUT ends the stream without one, and nothing is placed. */
int tar_reader_finish(struct tar_reader *r)
{
	if (r->state == R_END)
		return 0;
	return fail(r, "the tar stream ended before its end-of-archive blocks");
}
