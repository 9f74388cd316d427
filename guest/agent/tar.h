/*
 * The tar dialect of PUT and GET (PROTOCOL.md, "Tar streams"): ustar headers
 * with GNU magic, GNU long names ('L') and long link targets ('K'), numbers
 * in octal or GNU base-256; members are regular files, directories and
 * symlinks only.
 */
#ifndef PYVMM_AGENT_TAR_H
#define PYVMM_AGENT_TAR_H

#include <limits.h>
#include <stdint.h>
#include <sys/types.h>

#define TAR_BLOCK 512

/* --- writing (GET) --- */

/* Where the writer's bytes go: returns 0, or -1 to stop. */
typedef int (*tar_sink)(void *ctx, const void *data, size_t len);

int tar_write_header(tar_sink sink, void *ctx, const char *name, char type, mode_t mode,
		     uint64_t size, int64_t mtime, const char *link);
int tar_write_padding(tar_sink sink, void *ctx, uint64_t size);
int tar_write_end(tar_sink sink, void *ctx);

/* --- reading (PUT) --- */

struct tar_member {
	char type; /* '0' file, '5' directory, '2' symlink */
	const char *name;
	const char *link;
	mode_t mode;
	uint64_t size;
	int64_t mtime;
};

struct tar_reader;

/* Called for each member (then data() for a file's bytes, then end()); non-zero stops. */
struct tar_callbacks {
	int (*member)(void *ctx, const struct tar_member *m);
	int (*data)(void *ctx, const unsigned char *p, size_t n);
	int (*end)(void *ctx);
};

struct tar_reader *tar_reader_new(const struct tar_callbacks *cb, void *ctx);
/* 0, or -1 with a reason in tar_reader_error() (a callback's -1 leaves it empty). */
int tar_reader_feed(struct tar_reader *r, const unsigned char *p, size_t n);
/* 0 if the stream ended with its end-of-archive block, else -1 with a reason. */
int tar_reader_finish(struct tar_reader *r);
const char *tar_reader_error(const struct tar_reader *r);
void tar_reader_free(struct tar_reader *r);

#endif
