"""A C process for the client's long wait, so a waiting ``pyvmm run`` costs ~1 MiB, not ~8.

Once the server has replied the VM process's pid, all a client does is
forward SIGINT/SIGTERM/SIGHUP as signal frames and wait for the exit frame
(its stdio already belongs to the VM process). Measured here: a waiting
Python client has a PSS of ~7.5 MiB, most of a VM process's own cost. So
the client execs this small program with the connected socket as an fd
and the socket's path (for messages): it does exactly what
:func:`pyvmm.forkserver.client._wait_for_end` does, with the same lines and
exit statuses.

The server builds it with the host's C compiler when it starts (it has the
time; a client must not), into ``$XDG_CACHE_HOME/pyvmm`` (or
``~/.cache/pyvmm``) under a name holding a checksum of the source. A client
that finds no build (no compiler where the server ran, another cache
directory) waits in Python: the same behaviour, more memory. The client
executes the file only if it is a regular file owned by its own uid and
writable by nobody else.

The source is a string here rather than a ``.c`` file so that it ships in
every install of the package without package-data rules.
"""

from __future__ import annotations

import os
import stat
import zlib

SOURCE = r"""
/* pyvmm fork server client: wait for the VM process, forwarding signals. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_FRAME 256

static int sock = -1;
static unsigned char frames[3][32];
static size_t frame_len[3];
static const int forwarded[3] = { SIGINT, SIGTERM, SIGHUP };

static void put_frame(int i, int signum)
{
	int n = snprintf((char *)frames[i] + 4, sizeof(frames[i]) - 4, "{\"signal\":%d}", signum);
	frames[i][0] = frames[i][1] = frames[i][2] = 0;
	frames[i][3] = (unsigned char)n;
	frame_len[i] = 4 + (size_t)n;
}

static void forward(int signum)
{
	int saved = errno;
	for (int i = 0; i < 3; i++) {
		size_t done = 0;
		while (forwarded[i] == signum && done < frame_len[i]) {
			ssize_t n = write(sock, frames[i] + done, frame_len[i] - done);
			if (n <= 0 && errno != EINTR)
				break; /* the server is gone: the read loop says so */
			if (n > 0)
				done += (size_t)n;
		}
	}
	errno = saved;
}

static void say(const char *path, const char *what)
{
	dprintf(2, "pyvmm: error: fork server %s: %s\n", path, what);
}

static void die_by(int signum)
{
	sigset_t set;
	signal(signum, SIG_DFL);
	sigemptyset(&set);
	sigaddset(&set, signum);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	kill(getpid(), signum);
	_exit(128 + signum);
}

/* One reply frame; returns only for a reply that does not end the wait. */
static void handle(const char *path, char *body)
{
	int value;
	char *message;
	if (sscanf(body, "{\"exit\":%d}", &value) == 1)
		_exit(value);
	if (sscanf(body, "{\"killed\":%d}", &value) == 1)
		die_by(value);
	if (strncmp(body, "{\"error\":\"", 10) == 0 && strlen(body) >= 12) {
		message = body + 10;
		message[strlen(message) - 2] = '\0'; /* the closing quote and brace */
		say(path, message);
		_exit(2);
	}
	if (sscanf(body, "{\"pid\":%d}", &value) == 1)
		return;
	say(path, "a reply this client does not know");
	_exit(1);
}

int main(int argc, char **argv)
{
	unsigned char buffer[4 + MAX_FRAME + 1];
	size_t have = 0;
	struct sigaction action;
	sigset_t set;

	if (argc != 3)
		return 2;
	sock = atoi(argv[1]);
	memset(&action, 0, sizeof(action));
	action.sa_handler = forward;
	action.sa_flags = SA_RESTART;
	sigemptyset(&action.sa_mask);
	sigemptyset(&set);
	for (int i = 0; i < 3; i++) {
		put_frame(i, forwarded[i]);
		sigaction(forwarded[i], &action, NULL);
		sigaddset(&set, forwarded[i]);
	}
	sigprocmask(SIG_UNBLOCK, &set, NULL); /* the Python client blocked them across exec */
	for (;;) {
		ssize_t n = read(sock, buffer + have, sizeof(buffer) - 1 - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			char what[200];
			const char *why = n == 0 ? "the connection closed" : strerror(errno);
			snprintf(what, sizeof(what), "%s before the VM ended", why);
			say(argv[2], what);
			_exit(1);
		}
		have += (size_t)n;
		while (have >= 4) {
			size_t length = (size_t)buffer[0] << 24 | (size_t)buffer[1] << 16 |
					(size_t)buffer[2] << 8 | buffer[3];
			if (length > MAX_FRAME) {
				say(argv[2], "a frame over the limit of 256 bytes");
				_exit(1);
			}
			if (have < 4 + length)
				break;
			char body[MAX_FRAME + 1];
			memcpy(body, buffer + 4, length);
			body[length] = '\0';
			memmove(buffer, buffer + 4 + length, have - 4 - length);
			have -= 4 + length;
			handle(argv[2], body);
		}
	}
}
"""

#: Names the build: a changed source is a new file, never a stale one.
KEY = f"{zlib.crc32(SOURCE.encode()):08x}"


def waiter_path() -> str:
    """Where the build lives for this environment's cache directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pyvmm", f"pyvmm-forkserver-wait-{KEY}")


def usable_waiter() -> str | None:
    """The built waiter, if it is there and safe to run (see the module docstring)."""
    path = waiter_path()
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return path


def build_waiter() -> str:
    """Build the waiter unless it is built; its path. HostError without a working compiler.

    Built in a temporary directory next to the target and renamed into place,
    so a client never finds half a file.
    """
    import shutil
    import subprocess
    import tempfile

    from pyvmm.errors import HostError

    path = waiter_path()
    if usable_waiter() == path:
        return path
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise HostError("no C compiler (cc or gcc)")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as work:
        source, binary = os.path.join(work, "wait.c"), os.path.join(work, "wait")
        with open(source, "w") as out:
            out.write(SOURCE)
        result = subprocess.run(
            [compiler, "-O2", "-o", binary, source], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise HostError(f"{compiler} failed: {result.stderr.strip()[:300]}")
        os.chmod(binary, 0o755)
        os.replace(binary, path)
    return path
