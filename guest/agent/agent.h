/*
 * pyvmm-agent: shared declarations. The protocol is specified in PROTOCOL.md
 * (beside this file); the constants here are its numbers, and the Python side
 * (pyvmm/sandbox/protocol.py) carries the same ones.
 */
#ifndef PYVMM_AGENT_H
#define PYVMM_AGENT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define AGENT_NAME "pyvmm-agent"
#define PROTOCOL_VERSION_MIN 1
#define PROTOCOL_VERSION_MAX 1
#define DEFAULT_PORT 28793 /* "py" in ASCII */

#define FRAME_HEADER 8
/* The largest frame payload the agent accepts (an EXEC with a long argv/env). */
#define MAX_REQUEST_PAYLOAD (4u << 20)
/* The largest STDOUT/STDERR/DATA payload the agent sends. */
#define MAX_CHUNK 65536
/* Stop producing output once this much waits for the host to read it. */
#define OUT_HIGH_WATER (256u << 10)
#define MAX_PING 64
#define MAX_ERROR_TEXT 1024

/* Capabilities announced in HELLO. */
#define CAP_EXEC 0x1u
#define CAP_PUT 0x2u
#define CAP_GET 0x4u
#define CAP_SIGNAL 0x8u
#define CAP_SET_UID 0x10u /* the agent runs as root and can run commands as another uid */

enum agent_message {
	A_HELLO = 0x01,
	A_PONG = 0x02,
	A_STARTED = 0x03,
	A_STDOUT = 0x04,
	A_STDERR = 0x05,
	A_EXIT = 0x06,
	A_ERROR = 0x07,
	A_DATA = 0x08,
	A_DONE = 0x09,
};

enum host_message {
	H_HELLO = 0x41,
	H_PING = 0x42,
	H_EXEC = 0x43,
	H_STDIN = 0x44,
	H_SIGNAL = 0x45,
	H_PUT = 0x46,
	H_DATA = 0x47,
	H_GET = 0x48,
};

enum field_tag {
	F_ARG = 1,
	F_ENV = 2,
	F_CWD = 3,
	F_UID = 4,
	F_GID = 5,
	F_TIMEOUT_MS = 6,
	F_STDIN = 7,
	F_PATH = 8,
	F_MKDIRS = 9,
};

enum error_kind {
	E_NOT_FOUND = 1,
	E_CANNOT_RUN = 2,
	E_BAD_REQUEST = 3,
	E_FAILED = 4,
};

/* One connection to the host: a non-blocking socket and its two buffers. */
struct conn {
	int fd;
	unsigned char *in;
	size_t in_len, in_cap;
	unsigned char *out;
	size_t out_off, out_len, out_cap; /* unsent bytes: out[out_off .. out_off+out_len) */
	int eof;                          /* the host closed its side (or the socket failed) */
};

/* A complete frame at the head of conn.in; valid until conn_consume or conn_read. */
struct frame {
	unsigned type;
	const unsigned char *payload;
	uint32_t len;
};

/* wire.c */
void conn_init(struct conn *c, int fd);
int conn_read(struct conn *c);
int conn_peek(struct conn *c, struct frame *f);
void conn_consume(struct conn *c);
void conn_queue(struct conn *c, unsigned type, const void *payload, size_t len);
void conn_queue_error(struct conn *c, int kind, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
int conn_write(struct conn *c);
int conn_flush(struct conn *c);
int conn_wait_frame(struct conn *c, struct frame *f);
void put_u16(unsigned char *p, uint16_t v);
void put_u32(unsigned char *p, uint32_t v);
void put_u64(unsigned char *p, uint64_t v);
uint16_t get_u16(const unsigned char *p);
uint32_t get_u32(const unsigned char *p);
uint64_t get_u64(const unsigned char *p);
uint64_t now_ns(void);
void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);
char *xstrndup(const unsigned char *p, size_t n);
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Fields (tag, length, value) of EXEC, PUT and GET. */
struct fields {
	const unsigned char *p;
	size_t left;
};
int field_next(struct fields *it, unsigned *tag, const unsigned char **value, uint32_t *len);
int field_string(const unsigned char *value, uint32_t len, char **out);

/* exec.c, put.c, get.c: each returns 0 to go on serving, -1 to end the session. */
int identity_main(int argc, char **argv);
void exec_setup(void);
int handle_exec(struct conn *c, const struct frame *f);
int handle_put(struct conn *c, const struct frame *f);
int handle_get(struct conn *c, const struct frame *f);

/* paths.c */
int normalize_guest_path(const char *in, char **out);
int mkdirs(const char *path, mode_t mode);
void remove_tree(const char *path);
char *join_path(const char *dir, const char *name);

#endif
