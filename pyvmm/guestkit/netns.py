"""Network namespaces and veth pairs on the host, through iproute2.

Made for tests that need a real peer on a real link, without touching the
host's own network: a :class:`NetNamespace` is a private network stack
(``ip netns add``), and :meth:`NetNamespace.veth_pair` joins it to the host
with a veth pair whose ends get an address each::

    with NetNamespace("pyvmm-t1") as ns:
        ns.veth_pair("pvh0", "pvn0", "10.252.0.1/24", "10.252.0.2/24")
        ns.run(["python3", "-c", "..."])  # runs inside the namespace

Leaving the ``with`` block removes the host ends of the pairs it made and
the namespace (which takes the inner ends with it), also when the block
raised; :meth:`NetNamespace.delete` is idempotent.

Errors are one-line :class:`~pyvmm.errors.HostError`: an invalid or taken
name, no permission (``ip netns add`` needs root: CAP_SYS_ADMIN to mount the
namespace file, CAP_NET_ADMIN for links), ``ip`` not installed, or ``ip``'s
own first error line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Sequence

from pyvmm.errors import HostError
from pyvmm.host.tap import check_name, run_ip

#: What ``ip netns`` accepts and a file name under /run/netns can be, kept simple.
_NETNS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_netns_name(name: str) -> None:
    """Reject a namespace name ``ip netns`` would refuse (or that is awkward as a file name)."""
    if not _NETNS_NAME_RE.fullmatch(name):
        raise HostError(
            f"network namespace name {name!r} is invalid (1 to 64 of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit)"
        )


def _check_cidr(cidr: str) -> None:
    try:
        ipaddress.ip_interface(cidr)
    except ValueError:
        raise HostError(f"address {cidr!r} is not an address/prefix like 10.0.0.1/24") from None


class NetNamespace:
    """A named network namespace: create on ``__enter__``, delete on ``__exit__``."""

    def __init__(self, name: str) -> None:
        check_netns_name(name)
        self.name = name
        self.created = False
        self._host_links: list[str] = []

    # --- lifecycle -----------------------------------------------------------------
    def create(self) -> NetNamespace:
        """``ip netns add NAME``, with the loopback interface up."""
        try:
            run_ip("netns", "add", self.name)
        except HostError as exc:
            raise HostError(self._add_message(str(exc))) from None
        self.created = True
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Remove the host ends of our veth pairs, then the namespace; idempotent."""
        links, self._host_links = self._host_links, []
        errors: list[str] = []
        for link in links:
            try:
                run_ip("link", "del", link)
            except HostError as exc:
                if "Cannot find device" not in str(exc):
                    errors.append(str(exc))
        if self.created:
            self.created = False
            try:
                run_ip("netns", "del", self.name)
            except HostError as exc:
                errors.append(str(exc))
        if errors:
            raise HostError(f"cleaning up network namespace {self.name}: {errors[0]}")

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(self, *exc_info: object) -> None:
        self.delete()

    # --- inside the namespace ---------------------------------------------------------
    def ip(self, *args: str) -> str:
        """``ip -n NAME ARGS...``: iproute2 acting inside the namespace; returns stdout."""
        return run_ip("-n", self.name, *args)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace (``ip netns exec``); text output captured.

        With ``check``, a non-zero exit is a HostError naming the command and
        its first line of stderr; a command still running after ``timeout``
        seconds is killed and reported the same way.
        """
        ip = shutil.which("ip")
        if ip is None:
            raise HostError("the 'ip' command (iproute2) is not installed")
        shown = " ".join(argv)
        try:
            result = subprocess.run(
                [ip, "netns", "exec", self.name, *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HostError(
                f"in network namespace {self.name}: {shown!r} did not finish within {timeout:g} s"
            ) from None
        if check and result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            detail = lines[-1].strip() if lines else f"exit status {result.returncode}"
            raise HostError(f"in network namespace {self.name}: {shown!r} failed: {detail}")
        return result

    def veth_pair(self, host_name: str, ns_name: str, host_cidr: str, ns_cidr: str) -> None:
        """A veth pair: ``host_name`` with ``host_cidr`` on the host, ``ns_name`` with
        ``ns_cidr`` in the namespace, both up. On failure nothing of it is left."""
        if not self.created:
            raise HostError(f"network namespace {self.name} does not exist (create it first)")
        for name in (host_name, ns_name):
            if not name:
                raise HostError("veth names must not be empty")
            check_name(name, "veth")
        _check_cidr(host_cidr)
        _check_cidr(ns_cidr)
        peer = f"name {ns_name} netns {self.name}".split()
        try:
            run_ip("link", "add", host_name, "type", "veth", "peer", *peer)
        except HostError as exc:
            if "File exists" in str(exc):
                raise HostError(
                    f"cannot create veth {host_name}/{ns_name}: an interface of that name exists"
                ) from None
            raise
        self._host_links.append(host_name)
        try:
            run_ip("addr", "add", host_cidr, "dev", host_name)
            run_ip("link", "set", host_name, "up")
            self.ip("addr", "add", ns_cidr, "dev", ns_name)
            self.ip("link", "set", ns_name, "up")
        except BaseException:
            self._host_links.remove(host_name)
            with contextlib.suppress(HostError):
                run_ip("link", "del", host_name)  # takes the namespace end with it
            raise

    # --- messages -----------------------------------------------------------------------
    def _add_message(self, detail: str) -> str:
        if "File exists" in detail:
            return f"network namespace {self.name} already exists"
        if "not permitted" in detail or "Permission denied" in detail:
            return (
                f"cannot create network namespace {self.name}: permission denied "
                "(needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            )
        return f"cannot create network namespace {self.name}: {detail}"
