"""Port mapping on the home router (UPnP IGD), so that peers outside can dial this node.

Synchronous on purpose: the peer server calls it from a plain background thread, and each
call runs an event loop of its own for async-upnp-client. The router is on the LAN but its
answers are still untrusted input: every URL it gives must point back at the address it
answered from, its HTTP answers are bounded and never redirected, and what it reports (its
external address, where a port forwards) is checked before it is used. UPnP IGD only (found
by SSDP); NAT-PMP is ``natpmp``'s, and PCP ``pcp``'s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from async_upnp_client import exceptions as upnp_errors
from async_upnp_client.client import UpnpRequester, UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.const import HttpRequest, HttpResponse
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.utils import CaseInsensitiveDict

from p2prc_core.channel import read_capped_async
from p2prc_core.errors import P2PRCError

IGD_TYPES = ("urn:schemas-upnp-org:device:InternetGatewayDevice:1",
             "urn:schemas-upnp-org:device:InternetGatewayDevice:2")
# The services that map ports, best first.
WAN_SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:2",
                "urn:schemas-upnp-org:service:WANIPConnection:1",
                "urn:schemas-upnp-org:service:WANPPPConnection:1")
NEEDED_ACTIONS = ("AddPortMapping", "DeletePortMapping", "GetExternalIPAddress")
MAX_BODY = 256 * 1024  # a gateway's description or answer; real ones are a few KiB
MAX_LEASE = 604800  # IGD:2's longest lease, one week
OTHER_PORTS = 3  # random external ports tried when the one asked for is taken
PROTOCOL = "TCP"  # what is mapped unless asked otherwise
PROTOCOLS = ("TCP", "UDP")
UNKNOWN: tuple[str, object] = ("", None)  # a forward's holder, when the gateway cannot say

# The IGD error codes this module acts on.
NO_SUCH_ENTRY = 714
CONFLICT = 718
ONLY_PERMANENT_LEASES = 725

T = TypeVar("T")


@dataclass(frozen=True)
class Mapping:
    """A port forward on the gateway: external_ip:external_port reaches
    internal_ip:internal_port here."""

    external_ip: str  # as the gateway reports it
    external_port: int
    internal_ip: str  # this host's address toward the gateway
    internal_port: int
    protocol: str  # "TCP" or "UDP"
    lease_seconds: int  # what was asked; 0 = the gateway only offers permanent leases
    gateway: str  # a short description for `p2prc status`, e.g. "UPnP IGD at 10.199.1.1"


class UpnpError(P2PRCError):
    """The gateway could not be found, refused, or answered something unusable."""


class _Refused(UpnpError):
    """The gateway answered an action with a UPnP error code."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)
        self.code = code


class _Unreachable(UpnpError):
    """The gateway found before did not answer (it may have restarted on another port)."""


@dataclass(frozen=True)
class _Gateway:
    address: str  # the IPv4 address it answered from; all its URLs must point there
    internal_ip: str  # this host's address toward it
    service: UpnpService | None  # its WAN connection service
    actions: frozenset[str]

    @property
    def name(self) -> str:
        return f"the UPnP gateway at {self.address}"


class PortMapper:
    """Finds the home router by SSDP and maps, renews and removes TCP port forwards on it.

    Thread-safe; each call blocks for at most a few ``timeout``s. Do not call it from a
    thread that runs an event loop (each call runs its own with ``asyncio.run``).
    """

    def __init__(self, timeout: float = 3.0):
        self.timeout = timeout
        self._gateway: _Gateway | None = None
        # (protocol, external port) -> description, for renew
        self._descriptions: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def discover(self) -> bool:
        """Look for an Internet Gateway Device on the LAN; False if none answered usably
        within the timeout."""
        with self._lock:
            return self._find()

    def external_ip(self) -> str:
        """The gateway's external address, as it reports it (checked to be an IPv4
        address)."""
        return self._run(self._external_ip)

    def map(self, port: int, external_port: int | None = None, lease_seconds: int = 3600,
            description: str = "p2prc", protocol: str = PROTOCOL) -> Mapping:
        """Forward ``external_port`` (``port`` by default) on the gateway to ``port`` here,
        for ``protocol`` (TCP or UDP). When that port already forwards elsewhere, a few
        random ports are tried. A gateway that only offers permanent leases gets lease 0."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        _check_port(port, "port")
        preferred = port if external_port is None else external_port
        _check_port(preferred, "external_port")
        if not 0 <= lease_seconds <= MAX_LEASE:
            raise ValueError(f"lease_seconds must be 0 to {MAX_LEASE}, not {lease_seconds}")
        return self._run(lambda gw: self._map(gw, port, preferred, lease_seconds, description,
                                              protocol))

    def renew(self, mapping: Mapping) -> Mapping:
        """Extend a mapping's lease (asking again for the same forward); if the port went
        to another host meanwhile, or this host's address changed, map anew."""
        return self._run(lambda gw: self._renew(gw, mapping))

    def unmap(self, mapping: Mapping) -> None:
        """Remove a mapping; nothing happens when it is gone already or the port now
        forwards to someone else."""
        self._run(lambda gw: self._unmap(gw, mapping))
        self._descriptions.pop((mapping.protocol, mapping.external_port), None)

    # -- one gateway call each, with rediscovery when the gateway moved ----------------

    def _run(self, operation: Callable[[_Gateway], Coroutine[Any, Any, T]]) -> T:
        with self._lock:
            if self._gateway is None and not self._find():
                raise UpnpError("no UPnP gateway was found on this network within "
                                f"{self.timeout:g} s (is UPnP enabled on the router?)")
            assert self._gateway is not None
            try:
                return asyncio.run(operation(self._gateway))
            except _Unreachable as err:
                # A gateway that restarted answers on a new port: look for it once more.
                if not self._find():
                    raise UpnpError(f"{err}, and no UPnP gateway answered again") from err
                assert self._gateway is not None
                return asyncio.run(operation(self._gateway))

    def _find(self) -> bool:
        try:
            self._gateway = asyncio.run(self._search())
        except OSError:  # no network to send the search on
            self._gateway = None
        return self._gateway is not None

    async def _search(self) -> _Gateway | None:
        """Send SSDP searches for an IGD (again each second) and take the first answer
        whose device offers port mapping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        answers: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        def heard(headers: CaseInsensitiveDict) -> None:
            if headers.get("st") in IGD_TYPES:
                location = headers.get("_location_original") or headers.get("location")
                answers.put_nowait((str(location or ""), str(headers.get("_host") or "")))

        listener = SsdpSearchListener(callback=heard, loop=loop, timeout=1)
        await listener.async_start()
        tried: set[tuple[str, str]] = set()
        try:
            next_search = loop.time()
            while loop.time() < deadline:
                if loop.time() >= next_search:
                    for search_target in IGD_TYPES:
                        listener.search_target = search_target
                        listener.async_search()
                    next_search = loop.time() + 1
                wait = min(deadline, next_search) - loop.time()
                try:
                    answer = await asyncio.wait_for(answers.get(), max(wait, 0))
                except TimeoutError:
                    continue
                if answer in tried:
                    continue
                tried.add(answer)
                try:
                    async with asyncio.timeout_at(deadline):
                        gateway = await self._inspect(*answer)
                except TimeoutError:
                    return None
                except Exception:  # noqa: BLE001 - any stranger's device may fail anyhow
                    continue
                if gateway is not None:
                    return gateway
            return None
        finally:
            listener.async_stop()

    async def _inspect(self, location: str, host: str) -> _Gateway | None:
        """Read the device an SSDP answer points to: a gateway if it offers port mapping."""
        address = _gateway_address(location, host)
        factory = UpnpFactory(_GatewayRequester(address, self.timeout))
        device = await factory.async_create_device(location)
        for service_type in WAN_SERVICES:
            service = device.find_service(service_type)
            if service is not None and all(service.has_action(a) for a in NEEDED_ACTIONS):
                return _Gateway(address, local_address(address), service,
                                frozenset(service.actions))
        return None

    # -- the operations ----------------------------------------------------------------

    async def _action(self, gateway: _Gateway, name: str, **args: Any) -> dict[str, Any]:
        """Call one action; the gateway's failures become UpnpErrors."""
        if gateway.service is None or name not in gateway.actions:
            raise UpnpError(f"{gateway.name} does not offer {name}")
        try:
            return dict(await gateway.service.action(name).async_call(**args))
        except UpnpError:
            raise
        except upnp_errors.UpnpActionError as err:
            code = err.error_code if isinstance(err.error_code, int) else None
            raise _Refused(f"{gateway.name} refused {name}: error {code or '?'} "
                           f"({_clean(err.error_desc)})", code) from err
        except (upnp_errors.UpnpConnectionError, OSError) as err:
            raise _Unreachable(f"{gateway.name} did not answer {name}") from err
        except (upnp_errors.UpnpError, ValueError, KeyError, TypeError) as err:
            raise UpnpError(f"{gateway.name} gave an unusable answer to {name}") from err

    async def _external_ip(self, gateway: _Gateway) -> str:
        result = await self._action(gateway, "GetExternalIPAddress")
        return _external_address(result.get("NewExternalIPAddress"), gateway)

    async def _add(self, gateway: _Gateway, external_port: int, port: int, lease: int,
                   description: str, protocol: str) -> int:
        """Add (or refresh) one forward; the lease it got."""
        # Gateways (miniupnpd among them) let a host move its own forward to another
        # internal port silently: a port this host forwards elsewhere is a conflict too.
        holder = await self._holder(gateway, external_port, protocol)
        if holder not in (None, UNKNOWN, (gateway.internal_ip, port)):
            raise _Refused(f"{gateway.name} forwards port {external_port} elsewhere", CONFLICT)
        args: dict[str, Any] = {
            "NewRemoteHost": "", "NewExternalPort": external_port, "NewProtocol": protocol,
            "NewInternalPort": port, "NewInternalClient": gateway.internal_ip,
            "NewEnabled": True, "NewPortMappingDescription": description,
            "NewLeaseDuration": lease}
        try:
            await self._action(gateway, "AddPortMapping", **args)
        except _Refused as err:
            if err.code != ONLY_PERMANENT_LEASES or lease == 0:
                raise
            lease = 0
            await self._action(gateway, "AddPortMapping", **{**args, "NewLeaseDuration": 0})
        return lease

    async def _map(self, gateway: _Gateway, port: int, preferred: int, lease: int,
                   description: str, protocol: str) -> Mapping:
        external_ip = await self._external_ip(gateway)
        # IGD:2's AddAnyPortMapping is not used: miniupnpd answers it by moving this host's
        # own forward of that port, as AddPortMapping does.
        others = [1024 + secrets.randbelow(65536 - 1024) for _ in range(OTHER_PORTS)]
        for external in [preferred, *others]:
            try:
                used = await self._add(gateway, external, port, lease, description, protocol)
            except _Refused as err:
                if err.code == CONFLICT:
                    continue
                raise
            self._descriptions[(protocol, external)] = description
            return Mapping(external_ip, external, gateway.internal_ip, port, protocol, used,
                           f"UPnP IGD at {gateway.address}")
        raise UpnpError(f"{gateway.name} has port {preferred} and {OTHER_PORTS} others "
                        "forwarded elsewhere")

    async def _renew(self, gateway: _Gateway, mapping: Mapping) -> Mapping:
        description = self._descriptions.get((mapping.protocol, mapping.external_port),
                                             "p2prc")
        if mapping.internal_ip == gateway.internal_ip:
            external_ip = await self._external_ip(gateway)
            try:
                used = await self._add(gateway, mapping.external_port, mapping.internal_port,
                                       mapping.lease_seconds, description, mapping.protocol)
                return Mapping(external_ip, mapping.external_port, gateway.internal_ip,
                               mapping.internal_port, mapping.protocol, used,
                               f"UPnP IGD at {gateway.address}")
            except _Refused as err:
                if err.code != CONFLICT:
                    raise
        return await self._map(gateway, mapping.internal_port, mapping.external_port,
                               mapping.lease_seconds, description, mapping.protocol)

    async def _holder(self, gateway: _Gateway, external_port: int,
                      protocol: str) -> tuple[str, object] | None:
        """Where the gateway forwards ``external_port`` now: (internal client, internal
        port), None when nowhere, or UNKNOWN when it cannot say."""
        if "GetSpecificPortMappingEntry" not in gateway.actions:
            return UNKNOWN
        try:
            entry = await self._action(gateway, "GetSpecificPortMappingEntry",
                                       NewRemoteHost="", NewExternalPort=external_port,
                                       NewProtocol=protocol)
        except _Refused as err:
            return None if err.code == NO_SUCH_ENTRY else UNKNOWN
        return str(entry.get("NewInternalClient")), entry.get("NewInternalPort")

    async def _unmap(self, gateway: _Gateway, mapping: Mapping) -> None:
        holder = await self._holder(gateway, mapping.external_port, mapping.protocol)
        if holder is None:
            return
        if holder not in (UNKNOWN, (mapping.internal_ip, mapping.internal_port)):
            return  # it expired and the port went to someone else: not ours to remove
        try:
            await self._action(gateway, "DeletePortMapping", NewRemoteHost="",
                               NewExternalPort=mapping.external_port,
                               NewProtocol=mapping.protocol)
        except _Refused as err:
            if err.code != NO_SUCH_ENTRY:
                raise


class _GatewayRequester(UpnpRequester):
    """HTTP to the one gateway only: no other host, no redirects, no proxy, and answers of
    at most MAX_BODY bytes."""

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.timeout = timeout

    async def async_http_request(self, http_request: HttpRequest) -> HttpResponse:
        if urlsplit(http_request.url).hostname != self.address:
            raise UpnpError(f"the UPnP gateway at {self.address} pointed to another host")
        timeout = aiohttp.ClientTimeout(total=min(http_request.timeout or self.timeout,
                                                  self.timeout))
        try:
            async with aiohttp.ClientSession(trust_env=False) as session, session.request(
                    http_request.method, http_request.url, headers=http_request.headers,
                    data=http_request.body, allow_redirects=False, timeout=timeout) as response:
                body = await read_capped_async(
                    response.content.iter_chunked(65536), MAX_BODY, lambda: UpnpError(
                        f"the UPnP gateway at {self.address} sent an answer over "
                        f"{MAX_BODY // 1024} KiB"))
                try:
                    text = body.decode(response.charset or "utf-8", errors="replace")
                except LookupError:
                    text = body.decode("utf-8", errors="replace")
                return HttpResponse(response.status, response.headers, text)
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise upnp_errors.UpnpConnectionError(repr(err)) from err


def _gateway_address(location: str, host: str) -> str:
    """The IPv4 address of a gateway whose SSDP answer came from ``host`` and pointed to
    ``location``: both must name the same address, so a device on the LAN cannot make
    this node fetch URLs elsewhere."""
    try:
        parts = urlsplit(location)
        address = ipaddress.ip_address(parts.hostname or "")
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as err:
        raise UpnpError(f"an SSDP answer from {host} has an unusable location") from err
    if parts.scheme != "http" or address.version != 4 or str(address) != host:
        raise UpnpError(f"an SSDP answer from {host} points to another place")
    return host


def local_address(gateway: str) -> str:
    """This host's address on the route toward the gateway (no packet is sent): what the
    gateway forwards to, by UPnP or NAT-PMP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((gateway, 1900))
        address: str = probe.getsockname()[0]
        return address


def _external_address(value: object, gateway: _Gateway) -> str:
    """The external address a gateway reported, if it is a usable IPv4 unicast address."""
    if not value:
        raise UpnpError(f"{gateway.name} reports no external address (is it online?)")
    try:
        address = ipaddress.IPv4Address(str(value).strip())
    except ValueError:
        raise UpnpError(f"{gateway.name} reported an external address that is not an "
                        "IPv4 address") from None
    if address.is_unspecified or address.is_loopback or address.is_multicast or \
            address.is_link_local or address == ipaddress.IPv4Address("255.255.255.255"):
        raise UpnpError(f"{gateway.name} reported an unusable external address {address}")
    return str(address)


def _check_port(port: int, name: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{name} must be 1 to 65535, not {port!r}")


def _clean(text: object) -> str:
    """A gateway's own words, reduced to plain characters and a short length."""
    return re.sub(r"[^A-Za-z0-9 .,:_-]", "", str(text))[:60] or "no reason given"
