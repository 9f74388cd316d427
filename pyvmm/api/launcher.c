/*
 * launcher.c - pyvmm's "firecracker" launcher: the API socket in a millisecond.
 *
 * Why: a Firecracker client may send its first request about 20 ms after
 * spawning the binary, and never retry (pyrecracker does). A Python process
 * needs longer than that just to start. This program binds and listens on
 * the API socket first (the kernel then queues the client's connection),
 * and only then execs the Python VMM, handing it the listening socket as
 * fd 3 (PYVMM_API_SOCK_FD=3). Everything else - flags, errors, the VM - is
 * pyvmm-firecracker's; this file only wins the race.
 *
 * Built by pyvmm.api.launcher.build_launcher() with PYTHON defined as the
 * interpreter to exec. Binding is best effort: a live socket at the path,
 * a file that is not a socket, or any error leaves binding to the Python
 * side, which reports the problem in its own one-line error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef PYTHON
#error "build with -DPYTHON=\"/path/to/python3\""
#endif

#define HANDED_FD 3
#define BACKLOG 32

static const char *const no_socket_flags[] = {
	"--no-api", "--version", "-h", "--help", "--snapshot-version", "--describe-snapshot",
};

static const char *socket_path(int argc, char **argv)
{
	const char *path = "/run/firecracker.socket";

	for (int i = 1; i < argc; i++) {
		for (size_t j = 0; j < sizeof(no_socket_flags) / sizeof(no_socket_flags[0]); j++)
			if (!strcmp(argv[i], no_socket_flags[j]) ||
			    !strncmp(argv[i], "--describe-snapshot=", 20))
				return NULL;
		if (!strcmp(argv[i], "--api-sock") && i + 1 < argc)
			path = argv[i + 1];
		else if (!strncmp(argv[i], "--api-sock=", 11))
			path = argv[i] + 11;
	}
	return path;
}

/* 0: the path is free (a stale socket nobody listens on was removed); -1: leave it. */
static int make_room(const char *path, const struct sockaddr_un *addr)
{
	struct stat st;
	int probe, refused;

	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : -1;
	if (!S_ISSOCK(st.st_mode))
		return -1;
	probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (probe < 0)
		return -1;
	refused = connect(probe, (const struct sockaddr *)addr, sizeof(*addr)) < 0 &&
		  errno == ECONNREFUSED;
	close(probe);
	if (!refused)
		return -1; /* somebody listens: the Python side refuses, in one line */
	if (unlink(path) < 0)
		return -1;
	fprintf(stderr, "pyvmm: removed the stale socket %s (nobody listened on it)\n", path);
	return 0;
}

static int bind_socket(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(addr.sun_path))
		return -1;
	strcpy(addr.sun_path, path);
	if (make_room(path, &addr) < 0)
		return -1;
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	if (fchmod(fd, 0600) < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		close(fd);
		return -1;
	}
	if (chmod(path, 0600) < 0 || listen(fd, BACKLOG) < 0) {
		close(fd);
		unlink(path);
		return -1;
	}
	if (fd != HANDED_FD) {
		if (dup2(fd, HANDED_FD) < 0) {
			close(fd);
			unlink(path);
			return -1;
		}
		close(fd);
	}
	return HANDED_FD;
}

int main(int argc, char **argv)
{
	const char *path = socket_path(argc, argv);
	char **args = calloc((size_t)argc + 4, sizeof(*args));

	if (!args)
		return 1;
	if (path && bind_socket(path) == HANDED_FD)
		setenv("PYVMM_API_SOCK_FD", "3", 1);
	else
		unsetenv("PYVMM_API_SOCK_FD");
	args[0] = (char *)PYTHON;
	args[1] = "-m";
	args[2] = "pyvmm.firecracker_cli";
	for (int i = 1; i < argc; i++)
		args[i + 2] = argv[i];
	execv(PYTHON, args);
	fprintf(stderr, "pyvmm: error: cannot run %s: %s\n", PYTHON, strerror(errno));
	return 1;
}
