"""What p2prc's containers may reach, as firewall rules on their bridge.

Docker's own rules let a container open connections anywhere the host can route: to the
host itself, to the host's LAN, and to a cloud's metadata service (169.254.169.254 and its
kin), which hands out the host's credentials to whoever asks from the host. These rules,
put in place before every container starts (a firewall reload drops them), close:

- the host to its containers (INPUT: no new connection from the bridge);
- the metadata services, always (in DOCKER-USER, which Docker evaluates first and keeps
  across restarts, or FORWARD where there is none);
- container to container over IPv6 (IPv4 is closed by the network's enable_icc=false; IPv6
  only by Docker's default of no IPv6 in containers, which a daemon setting can change);
- the host's private networks, when the host says so (``containers_reach_lan = false``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
import shutil
import subprocess

log = logging.getLogger("p2prc.docker")

# Cloud metadata services: AWS, GCP, Azure, OpenStack and most others answer at the
# link-local 169.254.169.254 (the whole link-local block is refused), Alibaba at
# 100.100.100.200, AWS over IPv6 at fd00:ec2::254.
METADATA_V4 = ("169.254.0.0/16", "100.100.100.200/32")
METADATA_V6 = ("fd00:ec2::254/128", "fe80::/10")
AZURE_WIRESERVER = "168.63.129.16/32"
PRIVATE_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
PRIVATE_V6 = ("fc00::/7",)
_TAG = re.compile(r'--comment "?(p2prc-[0-9a-f]{12})"?')


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock (dockerd, firewalld or our other worker may hold it)
    return subprocess.run([tool, "-w", *args], capture_output=True, text=True)


def _chain(tool: str) -> str:
    """DOCKER-USER where Docker made it (its rules come after ours there), else FORWARD."""
    return "DOCKER-USER" if _run(tool, "-nL", "DOCKER-USER").returncode == 0 else "FORWARD"


def _tagged(rule: list[str]) -> list[str]:
    """The rule with a comment naming it, so that one listing tells which are in place."""
    tag = "p2prc-" + hashlib.sha256(" ".join(rule[1:]).encode()).hexdigest()[:12]
    return [*rule, "-m", "comment", "--comment", tag]


def _tag(rule: list[str]) -> str:
    return rule[-1]


def rules(bridge: str, reach_lan: bool, chain: str = "FORWARD",
          v6: bool = False) -> list[tuple[bool, list[str]]]:
    """One tool's rules as (wanted, rule): wanted ones are put in, others taken out."""
    metadata, private = (METADATA_V6, PRIVATE_V6) if v6 else (METADATA_V4, PRIVATE_V4)
    found = [(True, ["INPUT", "-i", bridge, "-m", "conntrack", "--ctstate", "NEW", "-j",
                     "REJECT"])]
    found += [(True, [chain, "-i", bridge, "-d", net, "-j", "REJECT"]) for net in metadata]
    if not v6:  # Azure's WireServer hands out the VM's keys too; its DNS (53) stays open
        found.append((True, [chain, "-i", bridge, "-d", AZURE_WIRESERVER, "-p", "tcp", "-m",
                             "multiport", "--dports", "80,32526", "-j", "REJECT"]))
    found += [(not reach_lan, [chain, "-i", bridge, "!", "-o", bridge, "-d", net, "-m",
                               "conntrack", "--ctstate", "NEW", "-j", "REJECT"])
              for net in private]
    # DNS stays: Docker's resolver asks the host's (often the home router) from the
    # container's own namespace. Listed after the refusals, so inserted above them.
    found += [(not reach_lan, [chain, "-i", bridge, "!", "-o", bridge, "-d", net, "-p", proto,
                               "--dport", "53", "-j", "ACCEPT"])
              for net in private for proto in ("udp", "tcp")]
    if v6:
        found.append((True, [chain, "-i", bridge, "-o", bridge, "-j", "DROP"]))
    return [(want, _tagged(rule)) for want, rule in found]


def _stale(listing: str, known: set[str]) -> list[list[str]]:
    """Rules of p2prc's (by their tag) that it no longer makes: an older version's, or one
    for another bridge; each as the arguments that delete it."""
    found = []
    for line in listing.splitlines():
        tag = _TAG.search(line)
        if tag and tag.group(1) not in known and line.startswith("-A "):
            found.append(["-D", *shlex.split(line)[1:]])
    return found


def _apply(tool: str, bridge: str, reach_lan: bool) -> str | None:
    """Bring one tool's rules in line; one listing when they are already (every create)."""
    listing = _run(tool, "-S").stdout
    wanted = rules(bridge, reach_lan, "FORWARD", tool == "ip6tables")
    # Out, from the listing whatever chain they are in: rules of an older version, and
    # those not wanted now (containers_reach_lan changed).
    for rule in _stale(listing, {_tag(rule) for want, rule in wanted if want}):
        _run(tool, *rule)
    if all(_tag(rule) in listing for want, rule in wanted if want):
        return None
    chain = _chain(tool)
    for want, rule in rules(bridge, reach_lan, chain, tool == "ip6tables"):
        if want and _run(tool, "-C", *rule).returncode != 0:
            added = _run(tool, "-I", *rule)
            if added.returncode != 0:
                return added.stderr.strip() or "failed"
    return None


def guard(bridge: str, reach_lan: bool = True) -> str | None:
    """Put the rules in place for ``bridge``; returns what went wrong, or None. IPv4 must
    work; IPv6 is best effort (p2prc's network has no IPv6 unless the daemon gives it)."""
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            if tool == "iptables":
                return "iptables is not installed"
            continue
        problem = _apply(tool, bridge, reach_lan)
        if problem and tool == "iptables":
            return f"iptables: {problem}"
        if problem:
            log.warning("could not put in place the IPv6 rules for containers: %s", problem)
    return None
