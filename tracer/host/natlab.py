"""A NAT lab: the collision through address translation, with real nftables,
in three network namespaces of one host (the live tests and
scripts/kernel-research build it).

    client ns  --veth--  router ns (nftables NAT)  --veth--  server ns
    .2 and .3            .1 inside, .1 outside               .2

The router's conntrack forgets a connection's mapping after 1 s once it
closes (its TCP timeouts are shortened), while the server's end lingers in
CLOSE_WAIT: the next client the router maps onto the same outside address
and port collides. Kinds:

- "masquerade": the router masquerades the clients onto its outside address
  (a Docker host, a Kubernetes node's pod traffic, a home router); a second
  client, on the other inside address, reuses the first one's port.
- "snat": `snat to ADDR:PORT-PORT` onto a range of one port (a NAT gateway
  short of ports: every connection gets the same outside port); the second
  client uses another address and another port.
- "dnat": a published port (as Docker publishes one): clients connect to the
  router's inside address, port 8080, and the router DNATs them onto the
  server's port 12345; the same client reconnects from the same port.

Variants of what the router does with the packets conntrack judges invalid:
`invalid="drop"` adds `ct state invalid drop` to its forward and input
chains; `liberal=True` sets nf_conntrack_tcp_be_liberal. The ruleset counts
what conntrack judged invalid and the resets the router's own stack sent
(counters()).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass

from tracer.host import netns
from tracer.pipeline.events import AF_INET, AF_INET6, format_addr

KINDS = ("masquerade", "snat", "dnat")
SERVER_PORT, PUBLISHED_PORT, SNAT_PORT = 12345, 8080, 40001
CLIENT_PORT, SECOND_PORT = 39836, 39837
# the router's conntrack forgets a closing connection after this long (seconds)
CT_TIMEOUTS = ("fin_wait", "close_wait", "last_ack", "time_wait", "close")
FORGET_S = 1


@dataclass(frozen=True)
class Plan:
    """The lab's addresses for one family."""

    family: int  # 4 or 6
    client: str
    second: str
    inside: str  # the router's inside address (the clients' gateway, the published address)
    outside: str  # the router's outside address (what masquerade maps onto)
    server: str
    prefix: int


PLANS = {
    4: Plan(4, "10.198.1.2", "10.198.1.3", "10.198.1.1", "10.198.2.1", "10.198.2.2", 24),
    6: Plan(6, "fd98:1::2", "fd98:1::3", "fd98:1::1", "fd98:2::1", "fd98:2::2", 64),
}


def endpoint(addr: str, port: int) -> str:
    """ADDR:PORT as the tracer writes it ([ADDR]:PORT for IPv6)."""
    ip = ipaddress.ip_address(addr)
    return format_addr(AF_INET6 if ip.version == 6 else AF_INET, ip.packed, port)


def nft(ns: netns.NetNS, script: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=script, text=True,
                       capture_output=True)
    if r.returncode != 0:
        raise netns.NetnsError(f"nft in {ns.name}: {r.stderr.strip()}")


class NatLab:
    """The three namespaces, their links and the router's ruleset; removed on exit."""

    def __init__(self, tag: str, kind: str = "masquerade", family: int = 4, invalid: str | None = None,
                 liberal: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
        self.kind, self.plan, self.invalid, self.liberal = kind, PLANS[family], invalid, liberal
        self.tag = tag
        self.client = netns.NetNS(f"{tag}-c")
        self.router = netns.NetNS(f"{tag}-r")
        self.server = netns.NetNS(f"{tag}-s")
        self.inodes: dict[str, int] = {}  # each namespace's inode (kept after they are removed)

    def __enter__(self) -> NatLab:
        made = []
        try:
            for ns in (self.client, self.router, self.server):
                ns.__enter__()
                made.append(ns)
            self._wire()
            self.inodes = {"client": self.client.inode, "router": self.router.inode, "server": self.server.inode}
        except Exception:
            for ns in made:
                ns.delete()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.client, self.router, self.server):
            ns.delete()

    def _wire(self) -> None:
        p = self.plan
        v6 = p.family == 6
        tag = f"{self.router.inode % 100000}"
        if v6:
            # no duplicate address detection on the links: a tentative link-local address delays neighbour
            # discovery by a second or so, long enough for a client's SYN to be retransmitted
            for ns in (self.client, self.router, self.server):
                ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        netns.veth(self.client, self.router, [f"{p.client}/{p.prefix}", f"{p.second}/{p.prefix}"],
                   [f"{p.inside}/{p.prefix}"], name=f"ti{tag}")
        netns.veth(self.router, self.server, [f"{p.outside}/{p.prefix}"], [f"{p.server}/{p.prefix}"],
                   name=f"to{tag}")
        ip = ["-6"] if v6 else []
        self.client.ip(*ip, "route", "add", "default", "via", p.inside)
        if self.kind == "dnat":  # no source translation: the server routes its replies back through the router
            self.server.ip(*ip, "route", "add", "default", "via", p.outside)
        self.router.sysctl("net.ipv6.conf.all.forwarding" if v6 else "net.ipv4.ip_forward", "1")
        nft(self.router, self.ruleset(f"ti{tag}b", f"to{tag}a"))
        # conntrack's sysctls exist in the namespace once its ruleset uses conntrack
        for name in CT_TIMEOUTS:
            self.router.sysctl(f"net.netfilter.nf_conntrack_tcp_timeout_{name}", str(FORGET_S))
        if self.liberal:
            self.router.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", "1")

    def ruleset(self, inside_dev: str, outside_dev: str) -> str:
        p = self.plan
        fam = "ip6" if p.family == 6 else "ip"
        out = f"[{p.outside}]" if p.family == 6 else p.outside
        srv = f"[{p.server}]" if p.family == 6 else p.server
        nat = {
            "masquerade": f'chain nat_post {{ type nat hook postrouting priority srcnat;\n    oifname "{outside_dev}" masquerade\n  }}',
            "snat": (f'chain nat_post {{ type nat hook postrouting priority srcnat;\n    oifname "{outside_dev}" '
                     f'meta l4proto tcp snat {fam} to {out}:{SNAT_PORT}-{SNAT_PORT}\n  }}'),
            "dnat": (f'chain nat_pre {{ type nat hook prerouting priority dstnat;\n    iifname "{inside_dev}" '
                     f'tcp dport {PUBLISHED_PORT} dnat {fam} to {srv}:{SERVER_PORT}\n  }}'),
        }[self.kind]
        drop = " drop" if self.invalid == "drop" else ""
        return f"""table inet tclab {{
  {nat}
  chain seen_invalid {{ type filter hook prerouting priority -150;
    ct state invalid counter comment "invalid"
  }}
  chain forwarded {{ type filter hook forward priority filter;
    ct state invalid counter{drop} comment "invalid_forward"
    iifname "{outside_dev}" tcp flags & (syn | ack | rst | fin) == ack counter comment "bare_ack_to_client"
    iifname "{inside_dev}" tcp flags & rst == rst counter comment "rst_from_client"
  }}
  chain to_router {{ type filter hook input priority filter;
    ct state invalid counter{drop} comment "invalid_input"
  }}
  chain from_router {{ type filter hook output priority filter;
    tcp flags & rst == rst counter comment "router_rst"
  }}
}}
"""

    def drop_bare_acks(self) -> None:
        """From now on the router drops bare ACKs from the server's side (a
        firewall on the path that loses the challenge ACK: the client never
        learns why its SYN goes unanswered)."""
        tag = f"{self.router.inode % 100000}"
        nft(self.router, f'add rule inet tclab forwarded iifname "to{tag}a" '
                         f'tcp flags & (syn | ack | rst | fin) == ack counter drop comment "dropped_ack"\n')

    def counters(self) -> dict[str, int]:
        """Packets counted by the ruleset's counters, by comment: invalid (all
        that conntrack judged invalid), invalid_forward, invalid_input (of
        those, forwarded or for the router itself: dropped with
        invalid="drop"), router_rst (resets the router's own stack sent),
        bare_ack_to_client (bare ACKs forwarded from the server's side to the
        client's: during a reconnect, the challenge ACK let through),
        rst_from_client (resets forwarded from the client's side)."""
        r = subprocess.run(["ip", "netns", "exec", self.router.name, "nft", "-j", "list", "table", "inet", "tclab"],
                           capture_output=True, text=True, check=True)
        out = {}
        for item in json.loads(r.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    out[rule["comment"]] = expr["counter"]["packets"]
        return out

    def scenario_args(self) -> list[str]:
        """python -m tracer.host.scenario's arguments for the lab's collision."""
        p = self.plan
        args = ["--server-ns", self.server.name, "--client-ns", self.client.name, "--fast",
                "--client-ip", p.client, "--client-port", str(CLIENT_PORT),
                "--reconnect-after", str(FORGET_S + 0.5)]
        if self.kind == "dnat":
            return args + ["--server-ip", p.inside, "--server-port", str(PUBLISHED_PORT),
                           "--listen-ip", p.server, "--listen-port", str(SERVER_PORT)]
        args += ["--server-ip", p.server, "--server-port", str(SERVER_PORT), "--second-ip", p.second]
        if self.kind == "snat":
            args += ["--second-port", str(SECOND_PORT)]
        return args

    def tuples(self) -> dict[str, dict[str, str]]:
        """The reconnecting client's connection as each end sees it:
        `before` the translation (the client's sockets) and `after` it (the
        server's)."""
        p = self.plan
        if self.kind == "dnat":
            return {"before": {"client": endpoint(p.client, CLIENT_PORT), "server": endpoint(p.inside, PUBLISHED_PORT)},
                    "after": {"client": endpoint(p.client, CLIENT_PORT), "server": endpoint(p.server, SERVER_PORT)}}
        port = SNAT_PORT if self.kind == "snat" else CLIENT_PORT
        cport = SECOND_PORT if self.kind == "snat" else CLIENT_PORT
        return {"before": {"client": endpoint(p.second, cport), "server": endpoint(p.server, SERVER_PORT)},
                "after": {"client": endpoint(p.outside, port), "server": endpoint(p.server, SERVER_PORT)}}
