"""The server's port forwarded on the home router, kept while the server runs: found by UPnP
IGD, PCP or NAT-PMP (``natpmp.find_gateway``), checked, renewed at half its lease, removed on
stop; ``reach.json``'s ``upnp`` says where it is, and the signed record advertises it. One of
the reach agent's jobs (``reach.ReachAgent``), in an object of its own.

TCP is the forward that counts (the record advertises it). UDP at the same port is asked
for beside it, where the router gives it: peers can then reach this node's UDP (its probe
answers, issue 24's punched paths) as they reach its TCP; without it, only TCP."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from p2prc_core.errors import P2PRCError
from p2prc_core.models import Address
from p2prc_core.reach_state import ReachState

log = logging.getLogger("p2prc")


class RouterPort:
    """Forwards ``port`` on the router to this server, as long as ``stop`` is not set."""

    def __init__(self, state: ReachState, stop: threading.Event):
        self.state = state
        self._stop = stop
        self.mapping: Any = None  # upnp.Mapping (TCP), while it is advertised
        self.udp: Any = None  # the UDP forward of the same port, where the router gave it
        self._mapper: Any = None  # what made it: upnp.PortMapper or natpmp.NatPmpMapper

    def map(self, port: int, description: str) -> None:
        """Find a gateway, forward ``port`` (the same external port) and keep it renewed.
        A forward the record cannot advertise (not a public address, another port) is
        removed again."""
        from p2prc_core.natpmp import find_gateway

        mapper = find_gateway(home=self.state.path.parent)  # UPnP IGD, else PCP, else NAT-PMP
        if mapper is None:
            log.info("no UPnP, PCP or NAT-PMP gateway answered: the port is not mapped")
            return
        try:
            mapping = mapper.map(port, port, description=description)
        except P2PRCError as err:
            log.warning("port mapping: %s", err)
            return
        if not self._advertisable(mapping, port, mapper):
            return
        self.mapping, self._mapper = mapping, mapper
        self.udp = self._map_udp(mapping, port, description)
        self.state.update(upnp={"external_ip": mapping.external_ip,
                                "external_port": mapping.external_port,
                                "gateway": mapping.gateway, "udp": self.udp is not None})
        log.info("%s forwards %s:%d to this server%s", mapping.gateway,
                 mapping.external_ip, mapping.external_port,
                 " (TCP and UDP)" if self.udp is not None else " (TCP)")
        threading.Thread(target=self._renew, args=(port,), name="p2prc-router-port",
                         daemon=True).start()

    def unmap(self) -> None:
        """Remove the forwards (the server stops)."""
        for mapping in (self.mapping, self.udp):
            if mapping is not None and self._mapper is not None:
                with contextlib.suppress(Exception):
                    self._mapper.unmap(mapping)
                    log.info("removed the %s mapping of port %d (%s)", mapping.protocol,
                             mapping.external_port, mapping.gateway)
        self.mapping = self.udp = None

    def _map_udp(self, tcp: Any, port: int, description: str) -> Any:
        """The UDP forward of ``port``, at the TCP forward's address and port; None where
        the router does not give it so (it is then removed again)."""
        try:
            udp = self._mapper.map(port, port, description=description, protocol="UDP")
        except (P2PRCError, ValueError) as err:
            log.info("%s: no UDP forward (%s): peers reach this node's UDP only through "
                     "its NAT's own mappings", tcp.gateway, err)
            return None
        if (udp.external_ip, udp.external_port) == (tcp.external_ip, tcp.external_port):
            return udp
        log.info("%s gave UDP port %d, not %d: not used", udp.gateway, udp.external_port, port)
        with contextlib.suppress(P2PRCError):
            self._mapper.unmap(udp)
        return None

    def _advertisable(self, mapping: Any, port: int, mapper: Any) -> bool:
        """Whether the record can say ``mapping``: a public address (not a second NAT's
        private or shared one, which nobody outside can dial), and ``port`` itself (the
        record has one port for all its addresses). If not, it is removed again."""
        try:
            kind = Address.parse(mapping.external_ip).kind
        except ValueError:
            kind = "invalid"
        if kind != "global":
            log.warning("%s: the router's external address %s is not a public one: not "
                        "advertised", mapping.gateway, mapping.external_ip)
        elif mapping.external_port != port:
            log.warning("%s gave port %d, not %d: not advertised", mapping.gateway,
                        mapping.external_port, port)
        else:
            return True
        with contextlib.suppress(P2PRCError):
            mapper.unmap(mapping)
        return False

    def _renew(self, port: int) -> None:
        """Renew at half the lease. A TCP forward that came back elsewhere (the router
        restarted: another address or port) is given up with its UDP one, as the record
        still says the old place; a UDP forward that did is dropped alone."""
        while self.mapping is not None and not self._stop.wait(
                max(30.0, self.mapping.lease_seconds / 2 or 1800)):
            try:
                renewed = self._renewed(self.mapping)
            except (P2PRCError, ValueError, OSError) as err:  # (no network now: next time)
                log.warning("port mapping renewal failed: %s", err)
                continue
            if renewed is None:
                self.mapping = None  # removed already, where it came back
                self.unmap()  # the UDP forward, if any
                self.state.update(upnp=None)
                return
            self.mapping = renewed
            if self.udp is not None:
                try:
                    self.udp = self._renewed(self.udp)
                except (P2PRCError, ValueError, OSError) as err:
                    log.warning("UDP forward renewal failed: %s", err)
                    continue
                if self.udp is None:
                    self.state.update(upnp={**(self.state.read().get("upnp") or {}),
                                            "udp": False})

    def _renewed(self, mapping: Any) -> Any:
        """``mapping`` renewed, at the TCP forward's address and port; None where it came
        back elsewhere (then it is removed again).

        :raises P2PRCError, ValueError: the renewal failed.
        """
        renewed = self._mapper.renew(mapping)
        if (renewed.external_ip, renewed.external_port) == \
                (self.mapping.external_ip, self.mapping.external_port):
            return renewed
        log.warning("%s now forwards %s:%d (%s): not advertised", renewed.gateway,
                    renewed.external_ip, renewed.external_port, renewed.protocol)
        with contextlib.suppress(P2PRCError):
            self._mapper.unmap(renewed)
        return None
