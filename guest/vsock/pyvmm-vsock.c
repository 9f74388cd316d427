/*
 * pyvmm-vsock: the smallest AF_VSOCK tool a test guest needs (busybox has none).
 *
 *   pyvmm-vsock listen PORT      accept connections forever; echo each one back
 *                                until its EOF (one child process per connection).
 *                                Prints "LISTENING PORT" on stdout once ready.
 *   pyvmm-vsock connect CID PORT copy stdin to the socket and the socket to stdout
 *                                until both directions are done (SHUT_WR after
 *                                stdin's EOF); exit 0 on success, 1 with a message
 *                                on stderr otherwise.
 *
 * Built statically by pyvmm.guestkit.vsock_tool (gcc -static -O2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE (64 * 1024)

static char buf[BUF_SIZE];

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("pyvmm-vsock: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static int usage(void)
{
	fputs("usage: pyvmm-vsock listen PORT\n"
	      "       pyvmm-vsock connect CID PORT\n",
	      stderr);
	return 2;
}

static int parse_u32(const char *text, unsigned int *out)
{
	char *end;
	unsigned long value;

	errno = 0;
	value = strtoul(text, &end, 10);
	if (errno || end == text || *end || value > UINT_MAX || text[0] == '-')
		return -1;
	*out = (unsigned int)value;
	return 0;
}

/* Write all of data[0..len) to fd; -1 on error. */
static int write_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t n = write(fd, data, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

static void echo(int fd)
{
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (write_all(fd, buf, (size_t)n))
			break;
	}
	close(fd);
}

static int do_listen(unsigned int port)
{
	struct sockaddr_vm addr;
	int fd;

	fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket(AF_VSOCK): %s", strerror(errno));
	memset(&addr, 0, sizeof(addr));
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = VMADDR_CID_ANY;
	addr.svm_port = port;
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)))
		die("bind to port %u: %s", port, strerror(errno));
	if (listen(fd, 64))
		die("listen on port %u: %s", port, strerror(errno));
	signal(SIGCHLD, SIG_IGN); /* children are reaped automatically */
	printf("LISTENING %u\n", port);
	fflush(stdout);
	for (;;) {
		int conn = accept(fd, NULL, NULL);
		pid_t pid;

		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept on port %u: %s", port, strerror(errno));
		}
		pid = fork();
		if (pid == 0) {
			close(fd);
			echo(conn);
			_exit(0);
		}
		if (pid < 0)
			echo(conn); /* no process to spare: serve it ourselves */
		else
			close(conn);
	}
}

static int do_connect(unsigned int cid, unsigned int port)
{
	static char out[BUF_SIZE]; /* stdin bytes not yet taken by the socket */
	size_t out_len = 0, out_off = 0;
	struct sockaddr_vm addr;
	struct pollfd fds[2];
	int fd, in_open = 1, sock_open = 1, shut = 0;

	fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket(AF_VSOCK): %s", strerror(errno));
	memset(&addr, 0, sizeof(addr));
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = cid;
	addr.svm_port = port;
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)))
		die("connect to %u:%u: %s", cid, port, strerror(errno));
	/* Never block writing while the peer waits for us to read (an echo would deadlock). */
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK))
		die("fcntl: %s", strerror(errno));
	while (sock_open || !shut) {
		int nfds = 0, sock_slot, in_slot = -1;

		fds[nfds].fd = fd;
		fds[nfds].events = (short)((sock_open ? POLLIN : 0) | (out_len ? POLLOUT : 0));
		sock_slot = nfds++;
		if (in_open && !out_len) {
			fds[nfds].fd = STDIN_FILENO;
			fds[nfds].events = POLLIN;
			in_slot = nfds++;
		}
		if (!in_open && !out_len && !shut) {
			if (shutdown(fd, SHUT_WR))
				die("shutdown: %s", strerror(errno));
			shut = 1;
			continue;
		}
		if (poll(fds, (nfds_t)nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		if (fds[sock_slot].revents & (POLLIN | POLLHUP | POLLERR) && sock_open) {
			ssize_t n = read(fd, buf, sizeof(buf));

			if (n < 0 && errno != EINTR && errno != EAGAIN)
				die("read from %u:%u: %s", cid, port, strerror(errno));
			if (n == 0)
				sock_open = 0;
			if (n > 0 && write_all(STDOUT_FILENO, buf, (size_t)n))
				die("write to stdout: %s", strerror(errno));
		}
		if (out_len && fds[sock_slot].revents & (POLLOUT | POLLERR)) {
			ssize_t n = write(fd, out + out_off, out_len);

			if (n < 0 && errno != EINTR && errno != EAGAIN)
				die("write to %u:%u: %s", cid, port, strerror(errno));
			if (n > 0) {
				out_off += (size_t)n;
				out_len -= (size_t)n;
			}
		}
		if (in_slot >= 0 && fds[in_slot].revents) {
			ssize_t n = read(STDIN_FILENO, out, sizeof(out));

			if (n < 0 && errno != EINTR && errno != EAGAIN)
				die("read from stdin: %s", strerror(errno));
			if (n == 0)
				in_open = 0;
			if (n > 0) {
				out_off = 0;
				out_len = (size_t)n;
			}
		}
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	unsigned int cid, port;

	signal(SIGPIPE, SIG_IGN); /* a closed peer is an error message, not a silent death */
	if (argc == 3 && strcmp(argv[1], "listen") == 0) {
		if (parse_u32(argv[2], &port))
			return usage();
		return do_listen(port);
	}
	if (argc == 4 && strcmp(argv[1], "connect") == 0) {
		if (parse_u32(argv[2], &cid) || parse_u32(argv[3], &port))
			return usage();
		return do_connect(cid, port);
	}
	return usage();
}
