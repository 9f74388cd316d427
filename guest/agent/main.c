/*
 * pyvmm-agent: runs commands and moves files for the host, over AF_VSOCK.
 *
 *   pyvmm-agent [--port PORT]   listen on vsock PORT (default 28793)
 *   pyvmm-agent --unix PATH     listen on a Unix socket instead (tests, debugging)
 *   pyvmm-agent --version
 *   pyvmm-agent --identity ...  a restored clone's new identity (identity.c)
 *
 * Prints "PYVMM-AGENT-READY vsock:PORT" (or "unix:PATH") on stdout once it
 * listens. Each connection is served by its own process, so several
 * commands can run at once; the protocol is in PROTOCOL.md. The agent trusts
 * the host and treats itself as expendable: a session that meets a protocol
 * error says so in an ERROR frame and ends.
 *
 * Built statically by pyvmm.guestkit.agent_tool (gcc -static -O2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"

static int usage(void)
{
	fputs("usage: " AGENT_NAME " [--port PORT]\n"
	      "       " AGENT_NAME " --unix PATH\n"
	      "       " AGENT_NAME " --version\n"
	      "       " AGENT_NAME " --identity [--hostname NAME] [--time S.NS] [--mac OLD=NEW]...\n",
	      stderr);
	return 2;
}

static void send_hello(struct conn *c)
{
	unsigned char hello[12 + 64];
	int n;
	uint32_t caps = CAP_EXEC | CAP_PUT | CAP_GET | CAP_SIGNAL;

	if (geteuid() == 0)
		caps |= CAP_SET_UID;
	put_u16(hello, PROTOCOL_VERSION_MIN);
	put_u16(hello + 2, PROTOCOL_VERSION_MAX);
	put_u32(hello + 4, caps);
	put_u32(hello + 8, MAX_REQUEST_PAYLOAD);
	n = snprintf((char *)hello + 12, 64, AGENT_NAME " pid %ld", (long)getpid());
	conn_queue(c, A_HELLO, hello, 12 + (size_t)(n < 64 ? n : 63));
}

/* The host's HELLO: 0 if it chose a version we speak. */
static int receive_hello(struct conn *c)
{
	struct frame f;
	int r = conn_wait_frame(c, &f);
	unsigned version;

	if (r <= 0)
		return -1;
	if (f.type != H_HELLO || f.len != 2) {
		conn_queue_error(c, E_BAD_REQUEST, EPROTO, "the first frame must be HELLO");
		return -1;
	}
	version = get_u16(f.payload);
	conn_consume(c);
	if (version < PROTOCOL_VERSION_MIN || version > PROTOCOL_VERSION_MAX) {
		conn_queue_error(c, E_BAD_REQUEST, EPROTO, "protocol version %u is not %d..%d",
				 version, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX);
		return -1;
	}
	return 0;
}

/* Serve one connection until the host closes it. */
static int session(int fd)
{
	struct conn c;
	struct frame f;

	exec_setup();
	conn_init(&c, fd);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	send_hello(&c);
	if (receive_hello(&c)) {
		conn_flush(&c);
		return 0;
	}
	for (;;) {
		int r = conn_wait_frame(&c, &f), rc = 0;

		if (r == 0)
			return 0; /* the host closed the connection */
		if (r < 0) {
			conn_queue_error(&c, E_BAD_REQUEST, EPROTO,
					 "bad frame header (reserved bytes set, or over %u bytes)",
					 MAX_REQUEST_PAYLOAD);
			break;
		}
		switch (f.type) {
		case H_PING:
			if (f.len > MAX_PING) {
				conn_queue_error(&c, E_BAD_REQUEST, EPROTO, "PING over %d bytes", MAX_PING);
				rc = -1;
				break;
			}
			conn_queue(&c, A_PONG, f.payload, f.len);
			conn_consume(&c);
			break;
		case H_EXEC:
			rc = handle_exec(&c, &f);
			break;
		case H_PUT:
			rc = handle_put(&c, &f);
			break;
		case H_GET:
			rc = handle_get(&c, &f);
			break;
		case H_STDIN:
		case H_SIGNAL:
			conn_consume(&c); /* late input for a command that has ended */
			break;
		default:
			conn_queue_error(&c, E_BAD_REQUEST, EPROTO, "unexpected frame type 0x%02x",
					 f.type);
			rc = -1;
		}
		if (rc)
			break;
	}
	conn_flush(&c);
	return 0;
}

static int listen_on(const char *unix_path, unsigned port, char *where, size_t where_len)
{
	int fd;

	if (unix_path) {
		struct sockaddr_un addr = {.sun_family = AF_UNIX};

		if (strlen(unix_path) >= sizeof(addr.sun_path))
			die("Unix socket path too long: %s", unix_path);
		strcpy(addr.sun_path, unix_path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)))
			die("cannot listen on %s: %s", unix_path, strerror(errno));
		snprintf(where, where_len, "unix:%s", unix_path);
	} else {
		struct sockaddr_vm addr;

		memset(&addr, 0, sizeof(addr));
		addr.svm_family = AF_VSOCK;
		addr.svm_cid = VMADDR_CID_ANY;
		addr.svm_port = port;
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			die("socket(AF_VSOCK): %s (is the vsock transport module loaded?)",
			    strerror(errno));
		if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)))
			die("cannot listen on vsock port %u: %s", port, strerror(errno));
		snprintf(where, where_len, "vsock:%u", port);
	}
	if (listen(fd, 64))
		die("listen: %s", strerror(errno));
	return fd;
}

static int parse_port(const char *text, unsigned *port)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(text, &end, 10);
	if (errno || end == text || *end || text[0] == '-' || v > UINT_MAX)
		return -1;
	*port = (unsigned)v;
	return 0;
}

/* Commands inherit 0, 1 and 2 through dup2: they must not be pipe ends we open. */
static void ensure_std_fds(void)
{
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
			die("cannot open /dev/null: %s", strerror(errno));
}

int main(int argc, char **argv)
{
	const char *unix_path = NULL;
	unsigned port = DEFAULT_PORT;
	char where[PATH_MAX + 16];
	int fd;

	if (argc >= 2 && !strcmp(argv[1], "--identity"))
		return identity_main(argc - 1, argv + 1);
	if (argc == 2 && !strcmp(argv[1], "--version")) {
		printf(AGENT_NAME " protocol %d..%d\n", PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX);
		return 0;
	}
	for (int i = 1; i < argc; i += 2) {
		if (i + 1 >= argc)
			return usage();
		if (!strcmp(argv[i], "--port") && !parse_port(argv[i + 1], &port))
			continue;
		if (!strcmp(argv[i], "--unix") && argv[i + 1][0])
			unix_path = argv[i + 1];
		else
			return usage();
	}
	ensure_std_fds();
	signal(SIGPIPE, SIG_IGN);
	/* Processes a command leaves behind are re-parented here and reaped at once. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	signal(SIGCHLD, SIG_IGN);
	fd = listen_on(unix_path, port, where, sizeof(where));
	printf("PYVMM-AGENT-READY %s\n", where);
	fflush(stdout);
	for (;;) {
		int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
		pid_t pid;

		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE ||
			    errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
				continue;
			die("accept: %s", strerror(errno));
		}
		pid = fork();
		if (pid == 0) {
			close(fd);
			signal(SIGCHLD, SIG_DFL);
			_exit(session(conn));
		}
		close(conn); /* in the parent; if fork failed, the host sees the connection close */
	}
}
