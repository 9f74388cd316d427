/*
 * PUT: receive a tar stream and place it at a guest path (PROTOCOL.md, "PUT").
 *
 * The stream is extracted into a fresh ".pyvmm-put-XXXXXX" directory beside
 * the destination and its top entry renamed onto the destination at the end,
 * so a failed or interrupted PUT leaves nothing behind and a reader never
 * sees half a tree. The host is trusted, but names are still checked (no
 * absolute paths, no "..", one top entry): a bug on the host side must not
 * scatter files over the guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "tar.h"

struct put_dir {
	char *path;
	mode_t mode;
	int64_t mtime;
};

struct put {
	char *dest;     /* normalized absolute destination */
	char *staging;  /* the temporary directory beside it */
	char *top;      /* the first member's name: the one entry under staging */
	int has_uid, has_gid;
	uid_t uid;
	gid_t gid;
	int mkdirs;
	int fd;         /* the regular file being written, or -1 */
	char *fd_path;
	mode_t fd_mode;
	int64_t fd_mtime;
	struct put_dir *dirs;
	size_t ndirs, cap_dirs;
	uint64_t bytes, entries;
	int err;        /* errno of the failure, when there is one */
	char why[MAX_ERROR_TEXT];
};

static int put_fail(struct put *p, int err, const char *what, const char *path)
{
	p->err = err;
	snprintf(p->why, sizeof(p->why), "%s %s: %s", what, path, strerror(err));
	return -1;
}

/* "top/a/b" -> staging path, after checking the name stays under the one top entry. */
static char *member_path(struct put *p, const char *name)
{
	char *copy = xstrndup((const unsigned char *)name, strlen(name)), *save = NULL, *part;
	char *out = xstrndup((const unsigned char *)p->staging, strlen(p->staging));
	int first = 1;

	if (name[0] == '/')
		goto bad;
	for (part = strtok_r(copy, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
		char *next;

		if (!strcmp(part, "."))
			continue;
		if (!strcmp(part, ".."))
			goto bad;
		if (first) {
			if (!p->top)
				p->top = xstrndup((const unsigned char *)part, strlen(part));
			else if (strcmp(part, p->top))
				goto bad;
			first = 0;
		} else if (!p->entries) {
			goto bad; /* the first member must be the top entry itself */
		}
		next = join_path(out, part);
		free(out);
		out = next;
	}
	if (first)
		goto bad;
	free(copy);
	return out;
bad:
	free(copy);
	free(out);
	p->err = EINVAL;
	snprintf(p->why, sizeof(p->why), "tar member name %.200s is not under one top entry", name);
	return NULL;
}

static int set_owner(struct put *p, int fd, const char *path)
{
	uid_t uid = p->has_uid ? p->uid : (uid_t)-1;
	gid_t gid = p->has_gid ? p->gid : (gid_t)-1;
	int rc;

	if (!p->has_uid && !p->has_gid)
		return 0;
	rc = fd >= 0 ? fchown(fd, uid, gid) : lchown(path, uid, gid);
	return rc ? put_fail(p, errno, "chown", path) : 0;
}

static int on_member(void *ctx, const struct tar_member *m)
{
	struct put *p = ctx;
	char *path = member_path(p, m->name);
	struct timespec times[2];

	if (!path)
		return -1;
	p->entries++;
	times[0].tv_sec = times[1].tv_sec = m->mtime;
	times[0].tv_nsec = times[1].tv_nsec = 0;
	if (m->type == '5') {
		if (mkdir(path, 0700)) {
			put_fail(p, errno, "mkdir", path);
			free(path);
			return -1;
		}
		if (p->ndirs == p->cap_dirs) {
			p->cap_dirs = p->cap_dirs ? 2 * p->cap_dirs : 64;
			p->dirs = xrealloc(p->dirs, p->cap_dirs * sizeof(*p->dirs));
		}
		p->dirs[p->ndirs++] = (struct put_dir){path, m->mode, m->mtime};
		return 0; /* its mode and times are set at the end, after its children */
	}
	if (m->type == '2') {
		int rc = symlink(m->link, path) ? put_fail(p, errno, "symlink", path) : 0;

		if (!rc)
			rc = set_owner(p, -1, path);
		if (!rc && utimensat(AT_FDCWD, path, times, AT_SYMLINK_NOFOLLOW))
			rc = put_fail(p, errno, "utimensat", path);
		free(path);
		return rc;
	}
	p->fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (p->fd < 0) {
		put_fail(p, errno, "create", path);
		free(path);
		return -1;
	}
	p->fd_path = path;
	p->fd_mode = m->mode;
	p->fd_mtime = m->mtime;
	return 0;
}

static int on_data(void *ctx, const unsigned char *data, size_t n)
{
	struct put *p = ctx;

	while (n) {
		ssize_t w = write(p->fd, data, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return put_fail(p, errno, "write", p->fd_path);
		}
		data += w;
		n -= (size_t)w;
		p->bytes += (uint64_t)w;
	}
	return 0;
}

static void close_file(struct put *p)
{
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
	free(p->fd_path);
	p->fd_path = NULL;
}

static int on_end(void *ctx)
{
	struct put *p = ctx;
	struct timespec times[2] = {{p->fd_mtime, 0}, {p->fd_mtime, 0}};
	int rc = set_owner(p, p->fd, p->fd_path); /* before chmod: chown clears setuid bits */

	if (!rc && fchmod(p->fd, p->fd_mode))
		rc = put_fail(p, errno, "chmod", p->fd_path);
	if (!rc && futimens(p->fd, times))
		rc = put_fail(p, errno, "utimensat", p->fd_path);
	if (!rc && close(p->fd)) {
		p->fd = -1;
		rc = put_fail(p, errno, "close", p->fd_path);
	}
	p->fd = -1;
	close_file(p);
	return rc;
}

/* Directories last and deepest first: creating their children changed their mtimes. */
static int finish_dirs(struct put *p)
{
	for (size_t i = p->ndirs; i-- > 0;) {
		struct put_dir *d = &p->dirs[i];
		struct timespec times[2] = {{d->mtime, 0}, {d->mtime, 0}};

		if (set_owner(p, -1, d->path))
			return -1;
		if (chmod(d->path, d->mode))
			return put_fail(p, errno, "chmod", d->path);
		if (utimensat(AT_FDCWD, d->path, times, 0))
			return put_fail(p, errno, "utimensat", d->path);
	}
	return 0;
}

static int place(struct put *p)
{
	char *from;
	int rc = 0;

	if (!p->top) {
		p->err = EINVAL;
		snprintf(p->why, sizeof(p->why), "the tar stream holds no member");
		return -1;
	}
	if (finish_dirs(p))
		return -1;
	from = join_path(p->staging, p->top);
	if (rename(from, p->dest))
		rc = put_fail(p, errno, "rename onto", p->dest);
	free(from);
	return rc;
}

static void put_free(struct put *p)
{
	close_file(p);
	if (p->staging) {
		remove_tree(p->staging); /* after a successful rename: just the empty directory */
		free(p->staging);
	}
	for (size_t i = 0; i < p->ndirs; i++)
		free(p->dirs[i].path);
	free(p->dirs);
	free(p->dest);
	free(p->top);
}

static int parse_put(struct put *p, const struct frame *f, char **error)
{
	struct fields it = {f->payload, f->len};
	const unsigned char *v;
	unsigned tag;
	uint32_t len;
	char *raw = NULL;
	int r;

	while ((r = field_next(&it, &tag, &v, &len)) == 1) {
		if (tag == F_PATH && !raw && !field_string(v, len, &raw))
			continue;
		if (tag == F_UID && len == 4 && !p->has_uid) {
			p->has_uid = 1;
			p->uid = get_u32(v);
		} else if (tag == F_GID && len == 4 && !p->has_gid) {
			p->has_gid = 1;
			p->gid = get_u32(v);
		} else if (tag == F_MKDIRS && len == 1 && v[0] <= 1) {
			p->mkdirs = v[0];
		} else {
			r = -1;
			break;
		}
	}
	if (r < 0 || !raw) {
		*error = "PUT needs one PATH and only PATH, UID, GID, MKDIRS fields";
		free(raw);
		return -1;
	}
	if (normalize_guest_path(raw, &p->dest) || !strcmp(p->dest, "/")) {
		*error = "PUT's PATH must be absolute, not \"/\", with no \"..\"";
		free(raw);
		return -1;
	}
	free(raw);
	return 0;
}

/* Set up the staging directory; 0, or -1 with p->why. */
static int prepare(struct put *p)
{
	char *parent = xstrndup((const unsigned char *)p->dest, strlen(p->dest));
	char *dir = dirname(parent);
	char *tmpl;

	if (p->mkdirs && mkdirs(dir, 0755)) {
		put_fail(p, errno, "mkdir -p", dir);
		free(parent);
		return -1;
	}
	tmpl = join_path(dir, ".pyvmm-put-XXXXXX");
	free(parent);
	if (!mkdtemp(tmpl)) {
		put_fail(p, errno, "cannot create a staging directory in", dirname(tmpl));
		free(tmpl);
		return -1;
	}
	p->staging = tmpl;
	return 0;
}

static void queue_put_error(struct conn *c, struct put *p)
{
	int kind = (p->err == ENOENT || p->err == ENOTDIR) ? E_NOT_FOUND : E_FAILED;

	conn_queue_error(c, kind, p->err, "%s", p->why);
}

int handle_put(struct conn *c, const struct frame *f)
{
	static const struct tar_callbacks cb = {on_member, on_data, on_end};
	struct put p = {.fd = -1};
	struct tar_reader *reader = NULL;
	struct frame d;
	char *error = NULL;
	int failed = 0, rc = 0;

	if (parse_put(&p, f, &error)) {
		conn_queue_error(c, E_BAD_REQUEST, EINVAL, "%s", error);
		failed = 1;
	}
	conn_consume(c);
	if (!failed && prepare(&p)) {
		queue_put_error(c, &p);
		failed = 1;
	}
	if (!failed)
		reader = tar_reader_new(&cb, &p);
	/* DATA frames until the empty one; after a failure they are read and dropped. */
	for (;;) {
		int r = conn_wait_frame(c, &d);

		if (r <= 0) {
			rc = -1; /* the host left, or broke the framing */
			break;
		}
		if (d.type != H_DATA) {
			conn_queue_error(c, E_BAD_REQUEST, EPROTO, "only DATA frames may follow PUT");
			rc = -1;
			break;
		}
		if (!d.len) {
			conn_consume(c);
			break;
		}
		if (!failed && tar_reader_feed(reader, d.payload, d.len)) {
			if (!p.why[0]) {
				p.err = EINVAL;
				snprintf(p.why, sizeof(p.why), "%s", tar_reader_error(reader));
			}
			queue_put_error(c, &p);
			failed = 1;
		}
		conn_consume(c);
	}
	if (rc == 0 && !failed) {
		if (tar_reader_finish(reader)) {
			p.err = EINVAL;
			snprintf(p.why, sizeof(p.why), "%s", tar_reader_error(reader));
			queue_put_error(c, &p);
		} else if (place(&p)) {
			queue_put_error(c, &p);
		} else {
			unsigned char done[16];

			put_u64(done, p.bytes);
			put_u32(done + 8, (uint32_t)p.entries);
			put_u32(done + 12, 0);
			conn_queue(c, A_DONE, done, sizeof(done));
		}
	}
	if (reader)
		tar_reader_free(reader);
	put_free(&p);
	return rc;
}
