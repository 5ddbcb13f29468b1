"""A NAT lab: homes behind routers that masquerade, on an "internet" of their own.

Every namespace here is linked only to other namespaces of the lab, never to the root
namespace: the internet side uses 11.0.0.0/24 (miniupnpd refuses private external
addresses), which is safe only because nothing outside the lab can route to it. Each home
sits behind its own router on 10.199.X.0/24 (X random per home). A router may run a real
miniupnpd, so that a home can map ports on it. Everything made here is removed again, also
when a test fails.

    lab = NatLab(tmp_path, upnp=True)       # home --- router (miniupnpd) --- internet
    friend = lab.add_internet_host("friend")  # 11.0.0.10 on the internet side
    other = lab.add_home("other")             # a second NATed home, behind a second router
    lab.home.serve(); lab.wait_listening(lab.home, 8088)   # netlab's Host, in a namespace
    ...
    lab.mappings()                            # the mappings on home's router (upnpc -l)
    lab.router.forwarded_ports()              # its DNAT rules, as the kernel has them
    lab.close()
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from netlab import Host, run

INTERNET = "11.0.0"  # the internet side's /24; reachable only inside the lab's namespaces
TOOLS = ("ip", "iptables", "sysctl", "ss")
UPNP_TOOLS = ("miniupnpd", "upnpc", "iptables-legacy")
NAT_KINDS = ("cone", "symmetric", "udp-dropped")  # what a lab router does (add_home)


def missing(upnp: bool = False) -> str | None:
    """The first tool this lab needs that is not installed, or None."""
    for tool in TOOLS + (UPNP_TOOLS if upnp else ()):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass(frozen=True)
class PortMap:
    """One mapping as the router's miniupnpd lists it."""

    protocol: str
    external_port: int
    internal_ip: str
    internal_port: int
    description: str
    lease_seconds: int


@dataclass
class Router:
    """A home's router: forwards and masquerades home -> internet, drops the other way
    unless a mapping (DNAT) lets a connection in."""

    namespace: str
    internal_if: str
    external_if: str
    internal_ip: str
    external_ip: str
    subnet: str
    miniupnpd: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    description_url: str | None = None  # miniupnpd's rootDesc.xml, once it answers

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def mappings(self) -> list[PortMap]:
        """The mappings miniupnpd holds now, as it lists them over UPnP (asked from inside
        the router, so no SSDP wait)."""
        if self.description_url is None:
            return []
        out = run(*self.command("upnpc", "-u", self.description_url, "-l")).stdout
        pattern = r"^\s*\d+\s+(TCP|UDP)\s+(\d+)->([\d.]+):(\d+)\s+'(.*)'\s+'.*'\s+(\d+)\s*$"
        return [PortMap(m[1], int(m[2]), m[3], int(m[4]), m[5], int(m[6]))
                for m in re.finditer(pattern, out, re.MULTILINE)]

    def block_pcp(self) -> None:
        """Drop PCP (version 2) at the router's UDP port 5351 and keep NAT-PMP (version 0):
        a router that speaks NAT-PMP only, as miniupnpd cannot be told to be."""
        run(*self.command("iptables", "-w", "-I", "INPUT", "-i", self.internal_if, "-p", "udp",
                          "--dport", "5351", "-m", "u32", "--u32", "0>>22&0x3C@8>>24=2",
                          "-j", "DROP"))

    def forwarded_ports(self) -> list[tuple[str, int]]:
        """(protocol, external port) of each DNAT rule in miniupnpd's nat chain: what the
        kernel forwards, whatever miniupnpd says."""
        out = run(*self.command("iptables-legacy", "-w", "-t", "nat", "-S", "MINIUPNPD"),
                  check=False).stdout
        return [(m[1].upper(), int(m[2]))
                for m in re.finditer(r"^-A MINIUPNPD .*-p (\w+) .*--dport (\d+)", out,
                                     re.MULTILINE)]


class NatLab:
    """Homes behind NAT routers, and hosts on the internet side, all in namespaces.

    ``NatLab(root, upnp)`` makes the internet segment and the first home (``lab.home``)
    behind its router; ``add_home`` adds more homes, each behind a router of its own on the
    same internet segment, and ``add_internet_host`` adds public hosts (11.0.0.10, .11 ...).
    """

    def __init__(self, root: Path, upnp: bool = False, nat: str = "cone",
                 natpmp_only: bool = False):
        self.root = root
        self.tag = secrets.token_hex(3)
        self.hosts: list[Host] = []
        self.routers: dict[str, Router] = {}  # home name -> its router
        self.namespaces: list[str] = []
        self.next_public = 10
        self.links = 0
        self.internet = f"p2nat-{self.tag}-inet"
        self.bridge = "inet0"  # inside the internet namespace only
        try:
            self._namespace(self.internet)
            self._in(self.internet, "ip", "link", "add", self.bridge, "type", "bridge")
            self._in(self.internet, "ip", "link", "set", self.bridge, "up")
            self.home = self.add_home("home", upnp=upnp, nat=nat, natpmp_only=natpmp_only)
        except BaseException:
            self.close()
            raise

    @property
    def router(self) -> Router:
        """The first home's router."""
        return self.routers[self.home.name]

    @property
    def router_external_ip(self) -> str:
        return self.router.external_ip

    def mappings(self, home: Host | None = None) -> list[PortMap]:
        """The mappings on the router of ``home`` (the first home by default)."""
        return self.routers[(home or self.home).name].mappings()

    def wait_listening(self, host: Host, port: int, timeout: float = 20) -> None:
        """Wait until something listens on TCP ``port`` in ``host``'s namespace.
        (``Host.wait_ready`` asks from the root namespace, which cannot reach this lab.)"""
        deadline = time.monotonic() + timeout
        while not run(*host.command("ss", "-Hltn", f"sport = :{port}")).stdout.strip():
            if time.monotonic() > deadline:
                log = host.home / "server.log"
                raise RuntimeError(f"nothing listens on port {port} in {host.name}:\n"
                                   + (log.read_text(errors="replace") if log.exists() else ""))
            time.sleep(0.05)

    def add_internet_host(self, name: str) -> Host:
        """A public host on the internet segment (11.0.0.10, then .11 ...)."""
        address = self._public_address()
        namespace = f"p2nat-{self.tag}-{name}"
        self._namespace(namespace)
        inside = self._link_to_internet(namespace)
        self._in(namespace, "ip", "addr", "add", f"{address}/24", "dev", inside)
        self._in(namespace, "ip", "link", "set", inside, "up")
        return self._host(name, namespace, address)

    def add_home(self, name: str, upnp: bool = False, nat: str = "cone",
                 natpmp_only: bool = False) -> Host:
        """A home behind a router of its own, whose external side is on the internet
        segment; with ``upnp`` the router runs miniupnpd and answers once this returns.
        ``nat``: "cone" (plain MASQUERADE, the common home router: one mapping per source
        port, whatever the destination), "symmetric" (MASQUERADE --random-fully: a mapping
        per destination) or "udp-dropped" (cone, and no UDP passes either way). With
        ``natpmp_only`` its miniupnpd speaks NAT-PMP and not UPnP (as many routers do)."""
        if nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {NAT_KINDS}, not {nat!r}")
        used = {r.subnet for r in self.routers.values()}
        subnet = next(s for s in iter(lambda: f"10.199.{secrets.randbelow(250) + 2}", None)
                      if s not in used)
        home_ns, router_ns = f"p2nat-{self.tag}-{name}", f"p2nat-{self.tag}-r{name}"
        self._namespace(router_ns)
        self._namespace(home_ns)
        external_ip = f"{INTERNET}.{len(self.routers) + 1}"
        ext_if = self._link_to_internet(router_ns)
        int_if, home_if = self._veth(router_ns, home_ns)
        router = Router(router_ns, int_if, ext_if, f"{subnet}.1", external_ip, subnet)
        self.routers[name] = router
        r = router.command
        run(*r("ip", "addr", "add", f"{external_ip}/24", "dev", ext_if))
        run(*r("ip", "addr", "add", f"{subnet}.1/24", "dev", int_if))
        for dev in (ext_if, int_if):
            run(*r("ip", "link", "set", dev, "up"))
        run(*r("sysctl", "-qw", "net.ipv4.ip_forward=1"))
        masquerade = ["-j", "MASQUERADE", *(["--random-fully"] if nat == "symmetric" else [])]
        rules = [["-t", "nat", "-A", "POSTROUTING", "-o", ext_if, *masquerade],
               ["-P", "FORWARD", "DROP"],
               ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                "-j", "ACCEPT"],
               ["-A", "FORWARD", "-i", int_if, "-o", ext_if, "-j", "ACCEPT"],
               # Without this, traffic that a UPnP mapping DNATs to home is dropped.
               ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"],
               # Nothing from the internet side for the router itself, as home routers do
               # (OpenWrt's wan zone: input REJECT). A packet that arrives before its hole
               # is punched is dropped, not taken in: it leaves no conntrack entry that
               # would make the router choose another port for the way out.
               ["-A", "INPUT", "-i", ext_if, "-m", "conntrack", "!", "--ctstate",
                "ESTABLISHED,RELATED", "-j", "DROP"]]
        if nat == "udp-dropped":
            rules.insert(1, ["-A", "FORWARD", "-p", "udp", "-j", "DROP"])
        for rule in rules:
            run(*r("iptables", "-w", *rule))
        self._in(home_ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", home_if)
        self._in(home_ns, "ip", "link", "set", home_if, "up")
        self._in(home_ns, "ip", "route", "add", "default", "via", f"{subnet}.1")
        host = self._host(name, home_ns, f"{subnet}.2")
        if upnp:
            self._start_miniupnpd(router, host, natpmp_only=natpmp_only)
        return host

    def close(self) -> None:
        """Stop every process the lab started (by pid), then delete its namespaces, which
        takes their veths, bridge and iptables rules (legacy and nft) with them."""
        for host in self.hosts:
            for proc in host.processes:
                host.stop(proc)
        for router in self.routers.values():
            if router.miniupnpd is not None:
                _stop(router.miniupnpd)
        for namespace in reversed(self.namespaces):
            run("ip", "netns", "del", namespace, check=False)
        self.namespaces.clear()

    # -- building blocks --------------------------------------------------------------------

    def _namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self._in(name, "ip", "link", "set", "lo", "up")

    def _in(self, namespace: str, *args: str) -> None:
        run("ip", "netns", "exec", namespace, *args)

    def _veth(self, a_ns: str, b_ns: str) -> tuple[str, str]:
        """A veth pair made directly inside two namespaces (never in the root one)."""
        self.links += 1
        a, b = f"n{self.tag}{self.links}a", f"n{self.tag}{self.links}b"
        run("ip", "-n", a_ns, "link", "add", a, "type", "veth", "peer", "name", b,
            "netns", b_ns)
        return a, b

    def _link_to_internet(self, namespace: str) -> str:
        """Plug ``namespace`` into the internet bridge; the name of its end there."""
        port, inside = self._veth(self.internet, namespace)
        self._in(self.internet, "ip", "link", "set", port, "master", self.bridge, "up")
        return inside

    def _public_address(self) -> str:
        address = f"{INTERNET}.{self.next_public}"
        self.next_public += 1
        return address

    def _host(self, name: str, namespace: str, ipv4: str) -> Host:
        home = self.root / name
        home.mkdir(parents=True)
        host = Host(name, namespace, ipv4, None, home)
        self.hosts.append(host)
        return host

    def _start_miniupnpd(self, router: Router, home: Host, timeout: float = 20,
                         natpmp_only: bool = False) -> None:
        """Run miniupnpd in the foreground in the router's namespace, with the legacy
        iptables chains it expects (made in the router's namespace, so they go with it),
        and wait until it has opened its sockets and answers ``home`` as a gateway."""
        legacy = router.command("iptables-legacy", "-w")
        ext = router.external_if
        for table, hook, match in (("nat", "PREROUTING", ["-i", ext]),
                                   ("nat", "POSTROUTING", ["-o", ext]),
                                   ("mangle", "PREROUTING", ["-i", ext]),
                                   ("filter", "FORWARD", ["-i", ext, "!", "-o", ext])):
            chain = "MINIUPNPD-POSTROUTING" if hook == "POSTROUTING" else "MINIUPNPD"
            run(*legacy, "-t", table, "-N", chain)
            run(*legacy, "-t", table, "-A", hook, *match, "-j", chain)
        folder = self.root / f"router-{home.name}"
        folder.mkdir(parents=True)
        conf = folder / "miniupnpd.conf"
        conf.write_text("\n".join([
            f"ext_ifname={ext}", f"listening_ip={router.internal_if}",
            f"ext_ip={router.external_ip}", "port=0",
            f"enable_upnp={'no' if natpmp_only else 'yes'}", "enable_natpmp=yes",
            "secure_mode=yes", f"uuid={uuid.uuid4()}", f"lease_file={folder / 'leases'}",
            f"allow 1024-65535 {router.subnet}.0/24 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535", ""]))
        router.log = folder / "miniupnpd.log"
        with open(router.log, "ab") as out:
            router.miniupnpd = subprocess.Popen(
                router.command("miniupnpd", "-f", str(conf), "-d",
                               "-P", str(folder / "miniupnpd.pid")),
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # miniupnpd logs its HTTP port, then opens its SSDP sockets, then logs NAT-PMP's:
        # once that last line is there, every socket it answers on is open.
        while "Listening for NAT-PMP" not in (log := router.log.read_text(errors="replace")):
            if router.miniupnpd.poll() is not None:
                raise RuntimeError(f"miniupnpd exited with {router.miniupnpd.returncode}:\n"
                                   + log)
            if time.monotonic() > deadline:
                raise RuntimeError(f"miniupnpd did not start within {timeout} s:\n{log}")
            time.sleep(0.05)
        if natpmp_only:
            return  # no UPnP to ask it by
        port = re.search(r"HTTP listening on port (\d+)", log)
        if port is None:
            raise RuntimeError(f"miniupnpd did not say its HTTP port:\n{log}")
        url = f"http://{router.internal_ip}:{port[1]}/rootDesc.xml"
        # And it answers home as a gateway with the right external address.
        probe = run(*home.command("upnpc", "-u", url, "-s"), check=False)
        if f"ExternalIPAddress = {router.external_ip}" not in probe.stdout:
            raise RuntimeError(f"miniupnpd does not answer from {home.name} at {url}:\n"
                               + probe.stdout + probe.stderr + log)
        router.description_url = url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
