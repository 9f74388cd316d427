/*
 * pyvmm-agent --identity: give a restored clone its own identity.
 *
 *   pyvmm-agent --identity [--hostname NAME] [--time SECONDS.NANOSECONDS]
 *                          [--mac OLD=NEW]... < seed
 *
 * Every clone of one snapshot wakes up with the same kernel RNG state, the
 * same host name and a clock stopped at the snapshot. The host runs this
 * (through the agent's own EXEC) right after a restore, before anything
 * else runs in the clone:
 *
 * - the bytes on stdin (up to 512, from the host's getrandom) are credited
 *   to the input pool (RNDADDENTROPY), then the CRNG is reseeded at once
 *   (RNDRESEEDCRNG), so /dev/urandom and getrandom() diverge from the
 *   other clones immediately rather than at the next periodic reseed;
 * - --hostname sets the host name (sethostname);
 * - --time sets CLOCK_REALTIME to the host's time (the guest's kvmclock
 *   carries on from the snapshot's moment otherwise);
 * - --mac gives the interface whose address is OLD the address NEW (clones
 *   of one snapshot share their virtio-net device's MAC).
 *
 * A VM Generation ID device makes the kernel reseed by itself as well; this
 * covers kernels and VMMs without one. The boot id
 * (/proc/sys/kernel/random/boot_id) cannot be changed from user space.
 *
 * Prints one line saying what it did; exits 1 with a message on stderr if
 * any step failed (the others are still done).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define MAX_SEED 512
#define MAX_MACS 16

struct seed_request {
	struct rand_pool_info info;
	unsigned char buf[MAX_SEED];
};

static int usage(void)
{
	fputs("usage: " AGENT_NAME " --identity [--hostname NAME] [--time SECONDS.NANOSECONDS]"
	      " [--mac OLD=NEW]... < seed\n",
	      stderr);
	return 2;
}

static int reseed(size_t *seeded)
{
	struct seed_request req;
	size_t n = 0;
	int fd, rc = 0;

	memset(&req, 0, sizeof(req));
	while (n < MAX_SEED) {
		ssize_t r = read(0, req.buf + n, MAX_SEED - n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
	}
	*seeded = n;
	if (n == 0)
		return 0;
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "identity: cannot open /dev/urandom: %s\n", strerror(errno));
		return -1;
	}
	req.info.entropy_count = (int)(n * 8);
	req.info.buf_size = (int)n;
	if (ioctl(fd, RNDADDENTROPY, &req) < 0) {
		fprintf(stderr, "identity: RNDADDENTROPY: %s\n", strerror(errno));
		rc = -1;
	} else if (ioctl(fd, RNDRESEEDCRNG) < 0) {
		fprintf(stderr, "identity: RNDRESEEDCRNG: %s\n", strerror(errno));
		rc = -1;
	}
	close(fd);
	return rc;
}

static int set_time(const char *text)
{
	struct timespec ts;
	char *end;
	long long sec;
	long nsec = 0;

	errno = 0;
	sec = strtoll(text, &end, 10);
	if (errno || end == text || sec < 0)
		goto bad;
	if (*end == '.') {
		const char *frac = end + 1;
		int digits = 0;

		for (; *frac >= '0' && *frac <= '9' && digits < 9; frac++, digits++)
			nsec = nsec * 10 + (*frac - '0');
		if (*frac || digits == 0)
			goto bad;
		for (; digits < 9; digits++)
			nsec *= 10;
	} else if (*end) {
		goto bad;
	}
	ts.tv_sec = (time_t)sec;
	ts.tv_nsec = nsec;
	if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
		fprintf(stderr, "identity: clock_settime: %s\n", strerror(errno));
		return -1;
	}
	return 0;
bad:
	fprintf(stderr, "identity: --time %s is not SECONDS[.FRACTION]\n", text);
	return -1;
}

static int parse_mac(const char *text, unsigned char mac[6])
{
	unsigned v[6];
	int used = 0;

	if (sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%n", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
		   &used) != 6 ||
	    used != 17)
		return -1;
	for (int i = 0; i < 6; i++)
		mac[i] = (unsigned char)v[i];
	return 0;
}

/* Give the interface whose hardware address is OLD the address NEW. */
static int change_mac(const char *spec)
{
	const char *eq = strchr(spec, '=');
	unsigned char old[6], new[6];
	struct if_nameindex *ifs, *it;
	int sock, rc = -1;

	if (!eq || eq - spec != 17 || parse_mac(spec, old) || parse_mac(eq + 1, new)) {
		fprintf(stderr, "identity: --mac %s is not OLD=NEW (aa:bb:cc:dd:ee:ff)\n", spec);
		return -1;
	}
	sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	ifs = if_nameindex();
	if (sock < 0 || !ifs) {
		fprintf(stderr, "identity: cannot list interfaces: %s\n", strerror(errno));
		goto out;
	}
	for (it = ifs; it->if_index; it++) {
		struct ifreq req;

		memset(&req, 0, sizeof(req));
		snprintf(req.ifr_name, sizeof(req.ifr_name), "%s", it->if_name);
		if (ioctl(sock, SIOCGIFHWADDR, &req) < 0 ||
		    memcmp(req.ifr_hwaddr.sa_data, old, 6))
			continue;
		req.ifr_hwaddr.sa_family = ARPHRD_ETHER;
		memcpy(req.ifr_hwaddr.sa_data, new, 6);
		if (ioctl(sock, SIOCSIFHWADDR, &req) < 0) {
			fprintf(stderr, "identity: cannot set the address of %s: %s\n", it->if_name,
				strerror(errno));
			goto out;
		}
		rc = 0;
		goto out;
	}
	fprintf(stderr, "identity: no interface has the address %.17s\n", spec);
out:
	if (ifs)
		if_freenameindex(ifs);
	if (sock >= 0)
		close(sock);
	return rc;
}

int identity_main(int argc, char **argv)
{
	const char *hostname = NULL, *time_text = NULL, *macs[MAX_MACS];
	int n_macs = 0, failed = 0, time_set = 0;
	size_t seeded = 0;

	for (int i = 1; i < argc; i += 2) {
		if (i + 1 >= argc)
			return usage();
		if (!strcmp(argv[i], "--hostname") && !hostname)
			hostname = argv[i + 1];
		else if (!strcmp(argv[i], "--time") && !time_text)
			time_text = argv[i + 1];
		else if (!strcmp(argv[i], "--mac") && n_macs < MAX_MACS)
			macs[n_macs++] = argv[i + 1];
		else
			return usage();
	}
	if (reseed(&seeded))
		failed = 1;
	if (hostname && sethostname(hostname, strlen(hostname)) < 0) {
		fprintf(stderr, "identity: sethostname %s: %s\n", hostname, strerror(errno));
		failed = 1;
	}
	if (time_text && set_time(time_text))
		failed = 1;
	else if (time_text)
		time_set = 1;
	for (int i = 0; i < n_macs; i++)
		if (change_mac(macs[i]))
			failed = 1;
	printf("identity: seeded %zu bytes, hostname %s, time %s, %d MAC(s)\n", seeded,
	       hostname ? hostname : "unchanged", time_set ? "set" : "unchanged", n_macs);
	return failed;
}
