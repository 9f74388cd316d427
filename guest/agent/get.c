/*
 * GET: send a guest file or directory tree as a tar stream (PROTOCOL.md, "GET").
 *
 * The requested path itself is stat()ed (a symlink there is followed, as
 * cp does with its argument); inside a directory nothing is followed:
 * symlinks are sent as symlinks. Sockets, FIFOs and device nodes are
 * skipped and counted in DONE. The stream goes out in DATA frames of up to
 * MAX_CHUNK bytes, never more than OUT_HIGH_WATER ahead of the host.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "tar.h"

struct get {
	struct conn *c;
	unsigned char chunk[MAX_CHUNK]; /* the DATA frame being filled */
	size_t chunk_len;
	unsigned char buf[MAX_CHUNK]; /* file reads (here, not on the stack of a deep walk) */
	uint64_t bytes, entries, skipped;
	int err;
	char why[MAX_ERROR_TEXT];
};

static int get_fail(struct get *g, int err, const char *what, const char *path)
{
	g->err = err;
	snprintf(g->why, sizeof(g->why), "%s %s: %s", what, path, strerror(err));
	return -1;
}

static int ship(struct get *g)
{
	if (!g->chunk_len)
		return 0;
	conn_queue(g->c, A_DATA, g->chunk, g->chunk_len);
	g->chunk_len = 0;
	if (g->c->out_len > OUT_HIGH_WATER && conn_flush(g->c))
		return get_fail(g, EPIPE, "send", "to the host");
	return 0;
}

static int sink(void *ctx, const void *data, size_t len)
{
	struct get *g = ctx;
	const unsigned char *p = data;

	while (len) {
		size_t take = sizeof(g->chunk) - g->chunk_len;

		if (take > len)
			take = len;
		memcpy(g->chunk + g->chunk_len, p, take);
		g->chunk_len += take;
		p += take;
		len -= take;
		if (g->chunk_len == sizeof(g->chunk) && ship(g))
			return -1;
	}
	return 0;
}

static int send_file(struct get *g, const char *path, const char *name, int follow)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
	struct stat st;
	uint64_t left;
	int rc = 0;

	if (fd < 0)
		return get_fail(g, errno, "open", path);
	if (fstat(fd, &st)) {
		int err = errno;

		close(fd);
		return get_fail(g, err, "fstat", path);
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return get_fail(g, EINVAL, "not a regular file:", path);
	}
	if (tar_write_header(sink, g, name, '0', st.st_mode, (uint64_t)st.st_size, st.st_mtime,
			     NULL)) {
		close(fd);
		return -1;
	}
	for (left = (uint64_t)st.st_size; left && !rc;) {
		ssize_t n = read(fd, g->buf, left < sizeof(g->buf) ? (size_t)left : sizeof(g->buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			rc = get_fail(g, errno, "read", path);
		else if (n == 0)
			rc = get_fail(g, EIO, "file shrank while being read:", path);
		else
			rc = sink(g, g->buf, (size_t)n);
		if (n > 0)
			left -= (uint64_t)n;
	}
	close(fd);
	if (rc)
		return -1;
	g->bytes += (uint64_t)st.st_size;
	g->entries++;
	return tar_write_padding(sink, g, (uint64_t)st.st_size);
}

static int send_tree(struct get *g, const char *path, const char *name, const struct stat *st);

/* Its own function so that the target buffer is not on every level of a deep walk. */
static __attribute__((noinline)) int send_symlink(struct get *g, const char *path,
						  const char *name, const struct stat *st)
{
	char target[PATH_MAX + 1];
	ssize_t n = readlink(path, target, PATH_MAX);

	if (n < 0)
		return get_fail(g, errno, "readlink", path);
	target[n] = '\0';
	g->entries++;
	return tar_write_header(sink, g, name, '2', st->st_mode, 0, st->st_mtime, target);
}

static int send_entry(struct get *g, const char *path, const char *name)
{
	struct stat st;

	if (lstat(path, &st))
		return get_fail(g, errno, "lstat", path);
	if (S_ISDIR(st.st_mode))
		return send_tree(g, path, name, &st);
	if (S_ISREG(st.st_mode))
		return send_file(g, path, name, 0);
	if (S_ISLNK(st.st_mode))
		return send_symlink(g, path, name, &st);
	g->skipped++; /* socket, FIFO or device node: not something a tar stream should carry */
	return 0;
}

static int send_tree(struct get *g, const char *path, const char *name, const struct stat *st)
{
	struct dirent **list;
	int n, rc = 0;

	if (tar_write_header(sink, g, name, '5', st->st_mode, 0, st->st_mtime, NULL))
		return -1;
	g->entries++;
	n = scandir(path, &list, NULL, alphasort);
	if (n < 0)
		return get_fail(g, errno, "scandir", path);
	for (int i = 0; i < n; i++) {
		const char *e = list[i]->d_name;

		if (!rc && strcmp(e, ".") && strcmp(e, "..")) {
			char *child = join_path(path, e), *child_name = join_path(name, e);

			if (strlen(child) >= PATH_MAX)
				rc = get_fail(g, ENAMETOOLONG, "path", child);
			else
				rc = send_entry(g, child, child_name);
			free(child);
			free(child_name);
		}
		free(list[i]);
	}
	free(list);
	return rc;
}

static int parse_get(const struct frame *f, char **path)
{
	struct fields it = {f->payload, f->len};
	const unsigned char *v;
	unsigned tag;
	uint32_t len;
	char *raw = NULL;
	int r;

	while ((r = field_next(&it, &tag, &v, &len)) == 1)
		if (tag != F_PATH || raw || field_string(v, len, &raw)) {
			r = -1;
			break;
		}
	if (r < 0 || !raw || normalize_guest_path(raw, path)) {
		free(raw);
		return -1;
	}
	free(raw);
	return 0;
}

int handle_get(struct conn *c, const struct frame *f)
{
	struct get *g;
	struct stat st;
	char *path;
	const char *top;
	int rc;

	if (parse_get(f, &path)) {
		conn_consume(c);
		conn_queue_error(c, E_BAD_REQUEST, EINVAL,
				 "GET needs exactly one absolute PATH field with no \"..\"");
		return 0;
	}
	conn_consume(c);
	if (stat(path, &st)) {
		int err = errno;

		conn_queue_error(c, err == ENOENT || err == ENOTDIR ? E_NOT_FOUND : E_FAILED, err,
				 "stat %s: %s", path, strerror(err));
		free(path);
		return 0;
	}
	g = xmalloc(sizeof(*g));
	memset(g, 0, sizeof(*g));
	g->c = c;
	top = strcmp(path, "/") ? strrchr(path, '/') + 1 : "root";
	if (S_ISDIR(st.st_mode))
		rc = send_tree(g, path, top, &st);
	else if (S_ISREG(st.st_mode))
		rc = send_file(g, path, top, 1);
	else
		rc = get_fail(g, EINVAL, "not a regular file or directory:", path);
	if (!rc)
		rc = tar_write_end(sink, g);
	if (!rc)
		rc = ship(g);
	if (rc) {
		if (g->err == EPIPE) {
			free(g);
			free(path);
			return -1;
		}
		conn_queue_error(c, g->err == ENOENT ? E_NOT_FOUND : E_FAILED, g->err, "%s", g->why);
	} else {
		unsigned char done[16];

		put_u64(done, g->bytes);
		put_u32(done + 8, (uint32_t)g->entries);
		put_u32(done + 12, (uint32_t)g->skipped);
		conn_queue(c, A_DONE, done, sizeof(done));
	}
	free(g);
	free(path);
	return 0;
}
