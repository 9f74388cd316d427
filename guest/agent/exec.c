/*
 * EXEC: run one command and stream its output (PROTOCOL.md, "EXEC").
 *
 * The command runs in a new session (so one kill reaches everything it
 * started), with stdin from the host's STDIN frames or /dev/null and stdout
 * and stderr on two pipes. Whether it could be started is known before
 * STARTED is sent: the child reports a failed chdir, setuid or execvp through
 * a close-on-exec pipe, which the parent reads to EOF. Its process group is
 * killed when it exits (leftover background processes), when its timeout
 * passes, and when the host goes away.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

/* Bytes of STDIN frames held for a command that is not reading them yet. */
#define STDIN_CAP (1u << 20)
/* After the command exits, how long its pipes may stay open (held by a daemon it left). */
#define DRAIN_GRACE_NS 500000000ull
#define MAX_TIMEOUT_MS (365ull * 86400 * 1000)

extern char **environ;

static const char *const BASE_ENV[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	NULL,
};

/* SIGCHLD wakes the poll loop through this pipe. */
static int sigchld_pipe[2] = {-1, -1};

static void on_sigchld(int sig)
{
	int saved = errno;
	char b = 0;

	(void)sig;
	if (write(sigchld_pipe[1], &b, 1) < 0) {
		/* full pipe: a wake-up is already pending */
	}
	errno = saved;
}

void exec_setup(void)
{
	struct sigaction sa;

	if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK))
		die("pipe2: %s", strerror(errno));
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigchld;
	sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGCHLD, &sa, NULL))
		die("sigaction: %s", strerror(errno));
}

struct exec_req {
	char **argv;
	size_t argc;
	char **env;
	size_t envc;
	char *cwd;
	int has_uid, has_gid, stdin_piped;
	uid_t uid;
	gid_t gid;
	uint64_t timeout_ms;
};

static void push(char ***list, size_t *n, char *item)
{
	*list = xrealloc(*list, (*n + 2) * sizeof(**list));
	(*list)[(*n)++] = item;
	(*list)[*n] = NULL;
}

/* Set NAME=VALUE in env, replacing an earlier NAME. */
static void env_set(char ***env, size_t *n, char *entry)
{
	size_t name = strcspn(entry, "=");

	for (size_t i = 0; i < *n; i++)
		if (!strncmp((*env)[i], entry, name + 1)) {
			free((*env)[i]);
			(*env)[i] = entry;
			return;
		}
	push(env, n, entry);
}

static void req_free(struct exec_req *r)
{
	for (size_t i = 0; i < r->argc; i++)
		free(r->argv[i]);
	for (size_t i = 0; i < r->envc; i++)
		free(r->env[i]);
	free(r->argv);
	free(r->env);
	free(r->cwd);
}

static int has_name(char **env, size_t n, const char *name)
{
	size_t len = strlen(name);

	for (size_t i = 0; i < n; i++)
		if (!strncmp(env[i], name, len) && env[i][len] == '=')
			return 1;
	return 0;
}

/* NULL, or what is wrong with the request. */
static const char *parse_exec(const struct frame *f, struct exec_req *r)
{
	struct fields it = {f->payload, f->len};
	const unsigned char *v;
	unsigned tag;
	uint32_t len;
	int got;
	char *s;

	for (const char *const *e = BASE_ENV; *e; e++)
		push(&r->env, &r->envc, xstrndup((const unsigned char *)*e, strlen(*e)));
	while ((got = field_next(&it, &tag, &v, &len)) == 1) {
		switch (tag) {
		case F_ARG:
			if (field_string(v, len, &s))
				return "an ARG holds a NUL byte";
			push(&r->argv, &r->argc, s);
			break;
		case F_ENV:
			if (field_string(v, len, &s))
				return "an ENV holds a NUL byte";
			if (!strchr(s, '=') || s[0] == '=') {
				free(s);
				return "an ENV is not NAME=VALUE";
			}
			env_set(&r->env, &r->envc, s);
			break;
		case F_CWD:
			if (r->cwd || field_string(v, len, &r->cwd))
				return "CWD is repeated or holds a NUL byte";
			break;
		case F_UID:
			if (r->has_uid || len != 4)
				return "UID is repeated or not 4 bytes";
			r->has_uid = 1;
			r->uid = get_u32(v);
			break;
		case F_GID:
			if (r->has_gid || len != 4)
				return "GID is repeated or not 4 bytes";
			r->has_gid = 1;
			r->gid = get_u32(v);
			break;
		case F_TIMEOUT_MS:
			if (len != 8)
				return "TIMEOUT_MS is not 8 bytes";
			r->timeout_ms = get_u64(v);
			break;
		case F_STDIN:
			if (len != 1 || v[0] > 1)
				return "STDIN is not one byte 0 or 1";
			r->stdin_piped = v[0];
			break;
		default:
			return "EXEC has an unknown field";
		}
	}
	if (got < 0)
		return "EXEC's fields are truncated";
	if (!r->argc)
		return "EXEC has no ARG";
	if (r->has_uid && !r->has_gid) {
		r->has_gid = 1;
		r->gid = (gid_t)r->uid;
	}
	if (!has_name(r->env, r->envc, "HOME")) {
		const char *home = (!r->has_uid || r->uid == 0) ? "HOME=/root" : "HOME=/";

		push(&r->env, &r->envc, xstrndup((const unsigned char *)home, strlen(home)));
	}
	return NULL;
}

/* --- starting ------------------------------------------------------------------ */

enum stage { STAGE_SETUP = 1, STAGE_CWD, STAGE_IDS, STAGE_EXEC };

struct start_failure {
	int stage;
	int err;
};

static __attribute__((noreturn)) void child_fail(int fd, int stage)
{
	struct start_failure f = {stage, errno};

	if (write(fd, &f, sizeof(f)) < 0) {
		/* the parent sees EOF and reports a generic failure */
	}
	_exit(stage == STAGE_EXEC && (f.err == ENOENT || f.err == ENOTDIR) ? 127 : 126);
}

/* In the child: become the command. Never returns. */
static __attribute__((noreturn)) void child(const struct exec_req *r, int in, int out, int err,
					    int report)
{
	sigset_t all;

	setsid();
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and RT internals */
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
		child_fail(report, STAGE_SETUP);
	if (r->cwd && chdir(r->cwd))
		child_fail(report, STAGE_CWD);
	if (r->has_gid && (setgroups(0, NULL) || setgid(r->gid)))
		child_fail(report, STAGE_IDS);
	if (r->has_uid && setuid(r->uid))
		child_fail(report, STAGE_IDS);
	environ = r->env;
	execvp(r->argv[0], r->argv);
	child_fail(report, STAGE_EXEC);
}

static void queue_start_failure(struct conn *c, const struct exec_req *r,
				const struct start_failure *f)
{
	const char *msg = strerror(f->err);

	switch (f->stage) {
	case STAGE_EXEC:
		conn_queue_error(c, f->err == ENOENT || f->err == ENOTDIR ? E_NOT_FOUND : E_CANNOT_RUN,
				 f->err, "%.200s: %s", r->argv[0], msg);
		break;
	case STAGE_CWD:
		conn_queue_error(c, E_CANNOT_RUN, f->err, "cannot enter %.200s: %s", r->cwd, msg);
		break;
	case STAGE_IDS:
		conn_queue_error(c, E_CANNOT_RUN, f->err, "cannot switch to uid %u gid %u: %s",
				 (unsigned)r->uid, (unsigned)r->gid, msg);
		break;
	default:
		conn_queue_error(c, E_FAILED, f->err, "cannot set up the command: %s", msg);
	}
}

/* --- running ------------------------------------------------------------------- */

struct running {
	pid_t pid;
	int out, err; /* our ends of the command's stdout and stderr, or -1 once at EOF */
	int in;       /* our end of its stdin pipe, or -1 */
	unsigned char *stdin_buf;
	size_t stdin_len;
	int stdin_eof; /* the host sent the empty STDIN frame */
	int exited, timed_out, status;
	uint64_t started, ended, deadline, drain_until;
};

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* The command ended: kill what it left in its group, then reap it. */
static void reap(struct running *x)
{
	siginfo_t si;

	memset(&si, 0, sizeof(si));
	if (waitid(P_PID, (id_t)x->pid, &si, WEXITED | WNOHANG | WNOWAIT) || si.si_pid != x->pid)
		return;
	kill(-x->pid, SIGKILL); /* the zombie still holds the group id: it cannot be reused */
	while (waitpid(x->pid, &x->status, 0) < 0 && errno == EINTR)
		;
	x->exited = 1;
	x->ended = now_ns();
	x->drain_until = x->ended + DRAIN_GRACE_NS;
	close_fd(&x->in);
	x->stdin_len = 0;
}

/* The host is gone (or broke the protocol): end the command and the session. */
static int abandon(struct running *x)
{
	if (!x->exited) {
		kill(-x->pid, SIGKILL);
		while (waitpid(x->pid, &x->status, 0) < 0 && errno == EINTR)
			;
	}
	return -1;
}

static void read_pipe(struct conn *c, int *fd, unsigned type)
{
	unsigned char buf[MAX_CHUNK];
	ssize_t n = read(*fd, buf, sizeof(buf));

	if (n > 0)
		conn_queue(c, type, buf, (size_t)n);
	else if (n == 0 || (errno != EAGAIN && errno != EINTR))
		close_fd(fd);
}

static void write_stdin(struct running *x)
{
	ssize_t n = write(x->in, x->stdin_buf, x->stdin_len);

	if (n > 0) {
		memmove(x->stdin_buf, x->stdin_buf + n, x->stdin_len - (size_t)n);
		x->stdin_len -= (size_t)n;
	} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
		close_fd(&x->in); /* EPIPE: the command closed its stdin; drop the rest */
		x->stdin_len = 0;
	}
}

/* Frames the host sends while the command runs: 0, or -1 on a protocol violation. */
static int host_frames(struct conn *c, struct running *x)
{
	struct frame f;
	int r = 0;

	while (x->stdin_len < STDIN_CAP && (r = conn_peek(c, &f)) == 1) {
		if (f.type == H_STDIN) {
			if (!f.len)
				x->stdin_eof = 1;
			else if (x->in >= 0) {
				x->stdin_buf = xrealloc(x->stdin_buf, x->stdin_len + f.len);
				memcpy(x->stdin_buf + x->stdin_len, f.payload, f.len);
				x->stdin_len += f.len;
			}
		} else if (f.type == H_SIGNAL && f.len == 4) {
			uint32_t sig = get_u32(f.payload);

			if (!x->exited && sig > 0 && sig < (uint32_t)NSIG)
				kill(-x->pid, (int)sig);
		} else {
			conn_queue_error(c, E_BAD_REQUEST, EPROTO,
					 "only STDIN and SIGNAL frames may come while a command runs");
			return -1;
		}
		conn_consume(c);
	}
	return r < 0 ? -1 : 0;
}

static int poll_timeout(const struct running *x)
{
	uint64_t until = x->exited ? x->drain_until : x->deadline, now = now_ns();

	if (!until)
		return -1;
	return until <= now ? 0 : (int)((until - now) / 1000000u) + 1;
}

static void queue_exit(struct conn *c, const struct running *x)
{
	unsigned char e[16];

	memset(e, 0, sizeof(e));
	if (WIFSIGNALED(x->status)) {
		e[0] = 1;
		put_u32(e + 4, (uint32_t)WTERMSIG(x->status));
	} else {
		put_u32(e + 4, (uint32_t)WEXITSTATUS(x->status));
	}
	e[1] = (unsigned char)x->timed_out;
	put_u64(e + 8, x->ended - x->started);
	conn_queue(c, A_EXIT, e, sizeof(e));
}

/* The poll loop: until the command has exited and its pipes are drained. */
static int supervise(struct conn *c, struct running *x)
{
	while (!x->exited || x->out >= 0 || x->err >= 0) {
		struct pollfd p[5];
		int sock = 0, out = -1, err = -1, in = -1, sig, n = 1, produce;

		if (host_frames(c, x)) /* frames that came in with earlier reads */
			return abandon(x);
		if (x->stdin_eof && !x->stdin_len)
			close_fd(&x->in);
		produce = c->out_len < OUT_HIGH_WATER;
		p[0].fd = c->fd;
		p[0].events = (short)((x->stdin_len < STDIN_CAP ? POLLIN : 0) |
				      (c->out_len ? POLLOUT : 0));
		if (x->out >= 0 && produce)
			p[out = n++] = (struct pollfd){.fd = x->out, .events = POLLIN};
		if (x->err >= 0 && produce)
			p[err = n++] = (struct pollfd){.fd = x->err, .events = POLLIN};
		if (x->in >= 0 && x->stdin_len)
			p[in = n++] = (struct pollfd){.fd = x->in, .events = POLLOUT};
		p[sig = n++] = (struct pollfd){.fd = sigchld_pipe[0], .events = POLLIN};
		if (poll(p, (nfds_t)n, poll_timeout(x)) < 0 && errno != EINTR)
			return abandon(x);
		if (p[sig].revents) {
			char drain[64];

			while (read(sigchld_pipe[0], drain, sizeof(drain)) > 0)
				;
		}
		reap(x);
		if (!x->exited && x->deadline && now_ns() >= x->deadline && !x->timed_out) {
			x->timed_out = 1;
			kill(-x->pid, SIGKILL);
		}
		if (x->exited && !produce) /* the host is slow: the grace starts when it catches up */
			x->drain_until = now_ns() + DRAIN_GRACE_NS;
		else if (x->exited && now_ns() >= x->drain_until) {
			close_fd(&x->out); /* something outside the group holds them open */
			close_fd(&x->err);
		}
		if (out >= 0 && p[out].revents && x->out >= 0)
			read_pipe(c, &x->out, A_STDOUT);
		if (err >= 0 && p[err].revents && x->err >= 0)
			read_pipe(c, &x->err, A_STDERR);
		if (in >= 0 && p[in].revents && x->in >= 0)
			write_stdin(x);
		if (p[sock].revents & POLLOUT && conn_write(c))
			return abandon(x);
		if (p[sock].revents & (POLLIN | POLLHUP | POLLERR)) {
			if (conn_read(c) == 0)
				return abandon(x);
		}
	}
	queue_exit(c, x);
	return 0;
}

static int make_pipes(int fds[][2], int count)
{
	for (int i = 0; i < count; i++)
		if (pipe2(fds[i], O_CLOEXEC))
			return -1;
	return 0;
}

int handle_exec(struct conn *c, const struct frame *f)
{
	struct exec_req r;
	struct running x;
	struct start_failure failure;
	int pipes[4][2], in_child, rc;
	const char *bad;
	ssize_t got;

	memset(&r, 0, sizeof(r));
	memset(&x, 0, sizeof(x));
	memset(pipes, -1, sizeof(pipes));
	x.out = x.err = x.in = -1;
	bad = parse_exec(f, &r);
	conn_consume(c);
	if (bad) {
		conn_queue_error(c, E_BAD_REQUEST, EINVAL, "%s", bad);
		req_free(&r);
		return 0;
	}
	/* 0: stdout, 1: stderr, 2: start report, 3: stdin (when piped) */
	if (make_pipes(pipes, r.stdin_piped ? 4 : 3)) {
		conn_queue_error(c, E_FAILED, errno, "pipe2: %s", strerror(errno));
		rc = 0;
		goto out;
	}
	in_child = r.stdin_piped ? pipes[3][0] : open("/dev/null", O_RDONLY | O_CLOEXEC);
	x.started = now_ns();
	x.pid = fork();
	if (x.pid == 0)
		child(&r, in_child, pipes[0][1], pipes[1][1], pipes[2][1]);
	if (!r.stdin_piped && in_child >= 0)
		close(in_child);
	if (x.pid < 0) {
		conn_queue_error(c, E_FAILED, errno, "fork: %s", strerror(errno));
		rc = 0;
		goto out;
	}
	close_fd(&pipes[2][1]);
	while ((got = read(pipes[2][0], &failure, sizeof(failure))) < 0 && errno == EINTR)
		;
	if (got != 0) { /* the child reported a failure before exec, or the report broke */
		if (got != (ssize_t)sizeof(failure))
			failure = (struct start_failure){STAGE_SETUP, EIO};
		while (waitpid(x.pid, NULL, 0) < 0 && errno == EINTR)
			;
		queue_start_failure(c, &r, &failure);
		rc = 0;
		goto out;
	}
	{
		unsigned char pid[4];

		put_u32(pid, (uint32_t)x.pid);
		conn_queue(c, A_STARTED, pid, sizeof(pid));
	}
	x.out = pipes[0][0];
	x.err = pipes[1][0];
	pipes[0][0] = pipes[1][0] = -1;
	if (r.stdin_piped) {
		x.in = pipes[3][1];
		pipes[3][1] = -1;
		fcntl(x.in, F_SETFL, O_NONBLOCK);
	}
	fcntl(x.out, F_SETFL, O_NONBLOCK);
	fcntl(x.err, F_SETFL, O_NONBLOCK);
	if (r.timeout_ms) /* capped at a year: no overflow, and no command needs longer */
		x.deadline = x.started + (r.timeout_ms < MAX_TIMEOUT_MS ? r.timeout_ms : MAX_TIMEOUT_MS) *
						 1000000ull;
	for (int i = 0; i < 4; i++)
		close_fd(&pipes[i][1]);
	rc = supervise(c, &x);
out:
	for (int i = 0; i < 4; i++) {
		close_fd(&pipes[i][0]);
		close_fd(&pipes[i][1]);
	}
	close_fd(&x.out);
	close_fd(&x.err);
	close_fd(&x.in);
	free(x.stdin_buf);
	req_free(&r);
	return rc;
}
