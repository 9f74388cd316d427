/*
 * Path helpers for PUT and GET: normalizing the host's absolute paths,
 * creating parents, removing a staging tree (never following a symlink).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

/*
 * "/a//b/./c/" -> "/a/b/c". The path must be absolute and have no ".."
 * component (the host names guest paths exactly); "/" stays "/".
 * 0 and *out (malloc'ed), or -1 with errno EINVAL / ENAMETOOLONG.
 */
int normalize_guest_path(const char *in, char **out)
{
	size_t n = strlen(in), o = 0;
	char *buf;
	const char *p = in;

	if (in[0] != '/') {
		errno = EINVAL;
		return -1;
	}
	if (n >= PATH_MAX) {
		errno = ENAMETOOLONG;
		return -1;
	}
	buf = xmalloc(n + 2);
	while (*p) {
		const char *end;
		size_t len;

		while (*p == '/')
			p++;
		end = strchrnul(p, '/');
		len = (size_t)(end - p);
		if (len == 2 && p[0] == '.' && p[1] == '.') {
			free(buf);
			errno = EINVAL;
			return -1;
		}
		if (len && !(len == 1 && p[0] == '.')) {
			buf[o++] = '/';
			memcpy(buf + o, p, len);
			o += len;
		}
		p = end;
	}
	if (!o)
		buf[o++] = '/';
	buf[o] = '\0';
	*out = buf;
	return 0;
}

char *join_path(const char *dir, const char *name)
{
	size_t a = strlen(dir), b = strlen(name);
	char *s = xmalloc(a + b + 2);

	memcpy(s, dir, a);
	if (!a || s[a - 1] != '/')
		s[a++] = '/';
	memcpy(s + a, name, b + 1);
	return s;
}

/* mkdir -p: every missing directory of an absolute path; 0, or -1 and errno. */
int mkdirs(const char *path, mode_t mode)
{
	char *copy = xstrndup((const unsigned char *)path, strlen(path));
	char *p = copy;
	struct stat st;
	int rc = 0;

	while (rc == 0 && (p = strchr(p + 1, '/')) != NULL) {
		*p = '\0';
		if (mkdir(copy, mode) && errno != EEXIST)
			rc = -1;
		*p = '/';
	}
	if (rc == 0 && mkdir(copy, mode) && errno != EEXIST)
		rc = -1;
	if (rc == 0 && stat(copy, &st))
		rc = -1;
	else if (rc == 0 && !S_ISDIR(st.st_mode)) {
		errno = ENOTDIR;
		rc = -1;
	}
	free(copy);
	return rc;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)ftw;
	if (flag == FTW_DP)
		rmdir(path);
	else
		unlink(path);
	return 0;
}

/* rm -rf, depth first, symlinks removed rather than followed. */
void remove_tree(const char *path)
{
	nftw(path, remove_one, 32, FTW_DEPTH | FTW_PHYS);
	rmdir(path);
	unlink(path);
}
