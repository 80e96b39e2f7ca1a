"""Private network namespaces for the demo, the self-test and the live tests
(named ones through iproute2; anonymous ones with unshare(2))."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    pass


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class NetNS:
    """A named network namespace with loopback up; removed on exit.
    fin_timeout: its net.ipv4.tcp_fin_timeout (None: left as it is, where
    /proc/sys may be read-only, in a container)."""

    def __init__(self, name: str, fin_timeout: int | None = 1):
        self.name = name
        self.fin_timeout = fin_timeout

    def __enter__(self) -> NetNS:
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            # the client's FIN-WAIT-2 holds the port for tcp_fin_timeout (60 s by default)
            if self.fin_timeout is not None:
                self.sysctl("net.ipv4.tcp_fin_timeout", str(self.fin_timeout))
        except Exception:
            self.delete()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    @property
    def inode(self) -> int:
        return os.stat(self.path).st_ino

    def sysctl(self, key: str, value: str) -> None:
        _ip("netns", "exec", self.name, "sysctl", "-qw", f"{key}={value}")

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)


def veth(a: NetNS, b: NetNS, addrs_a: list[str], addrs_b: list[str], name: str = "tcv") -> None:
    """Join two namespaces with a veth pair and put addresses (with prefix) on each end."""
    _ip("link", "add", f"{name}a", "netns", a.name, "type", "veth", "peer", "name", f"{name}b", "netns", b.name)
    for ns, dev, addrs in ((a, f"{name}a", addrs_a), (b, f"{name}b", addrs_b)):
        for addr in addrs:
            ns.ip("addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
        ns.ip("link", "set", dev, "up")


def enter(name: str) -> None:
    """Move the calling thread into the named namespace (sockets created
    afterwards belong to it; existing ones keep theirs)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def unshare() -> None:
    """Move the calling process into a new, anonymous network namespace (it
    goes away with the last process and socket in it)."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        raise NetnsError(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # linux/sockios.h, linux/if.h


def loopback_up() -> None:
    """ip link set lo up, in the calling thread's namespace, without iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack_from("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))
